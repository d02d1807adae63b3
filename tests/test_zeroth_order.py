"""MeZO / SPSA is ES with one antithetic pair and raw fitness (esnb.zeroth_order.mezo_config), checked
against a few-line independent implementation (notebook 11)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from esnb.ablation import mezo_finetune_config
from esnb.es import ES, ESConfig, iteration_seeds
from esnb.zeroth_order import mezo_config
from esnb.noise import noise_like


def f(theta: torch.Tensor) -> float:
    """A reward to maximise (any function will do)."""
    return float(-((theta - 1.0) ** 2).sum() + torch.sin(3 * theta).sum())


def mezo_by_hand(theta: torch.Tensor, lr: float, sigma: float, steps: int, seed: int, pairs: int = 1) -> torch.Tensor:
    """MeZO (Malladi et al. 2023, Alg. 1) for a reward: the noise regenerated from its seed, never stored."""
    theta = theta.clone().double()
    for t in range(steps):
        g = torch.zeros_like(theta)
        for s in iteration_seeds(seed, t, pairs):        # the seed trick: eps is a function of s
            eps = noise_like(theta, s, 0)
            projected = (f(theta + sigma * eps) - f(theta - sigma * eps)) / (2 * sigma)
            g += projected * eps / pairs
        theta += lr * g
    return theta


@pytest.mark.parametrize("pairs", [1, 3])
def test_mezo_is_es_with_one_antithetic_pair_and_raw_fitness(pairs):
    lr, sigma, steps = 0.01, 0.05, 5
    theta0 = torch.linspace(-1, 1, 7, dtype=torch.float64)
    es = ES(theta0.clone(), mezo_config(lr, sigma, pairs=pairs, seed=3))
    for _ in range(steps):
        es.step(lambda pop: torch.tensor([f(row) for row in pop], dtype=torch.float64))
    expected = mezo_by_hand(theta0, lr, sigma, steps, seed=3, pairs=pairs)
    assert torch.allclose(es.theta, expected, rtol=0, atol=1e-12)
    assert es.config.population_size == 2 * pairs and es.config.antithetic and es.config.shaping == "raw"
    assert math.isclose(es.config.alpha, lr / sigma)


def test_mezo_on_a_module_matches_by_hand():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    reward = lambda: float(-(net(x).detach() ** 2).mean())  # noqa: E731
    theta0 = [p.detach().clone() for p in net.parameters()]
    lr, sigma = 0.1, 0.01
    es = ES(net, mezo_config(lr, sigma, seed=1))
    rewards = []
    for m in es.ask():
        with es.perturbed(m):
            rewards.append(reward())
    es.tell(rewards)
    (s,) = iteration_seeds(1, 0, 1)
    step = lr * (rewards[0] - rewards[1]) / (2 * sigma)
    for i, (p, p0) in enumerate(zip(net.parameters(), theta0)):
        assert torch.allclose(p, p0 + step * noise_like(p0, s, i), atol=1e-12)


def test_zscore_with_one_pair_keeps_only_the_sign():
    theta0 = torch.zeros(4, dtype=torch.float64)
    norms = []
    for rewards in ([1.0, 0.9], [1.0, 0.0], [0.0, 1.0]):
        es = ES(theta0.clone(), ESConfig(population_size=2, antithetic=True, sigma=0.1, alpha=0.5))
        entry = es.tell(rewards)
        assert np.allclose(np.abs(entry["weights"]), 1.0, atol=1e-6)
        norms.append(entry["update_norm"])
    assert np.allclose(norms, norms[0])
    es = ES(theta0.clone(), ESConfig(population_size=2, antithetic=True, sigma=0.1, alpha=0.5))
    assert es.tell([0.3, 0.3])["update_norm"] == 0.0  # a tie: no step


def test_mezo_config_refuses_what_it_fixes():
    with pytest.raises(ValueError, match="population_size"):
        mezo_config(0.1, 0.01, population_size=4)
    with pytest.raises(ValueError, match="pairs"):
        mezo_config(0.1, 0.01, pairs=0)
    with pytest.raises(ValueError, match="sigma"):
        mezo_config(0.1, 0.0)
    cfg = mezo_finetune_config(2e-5, 0.002, iterations=3, batch_size=4, train_size=8, seed=5)
    assert (cfg.es.population_size, cfg.es.antithetic, cfg.es.shaping, cfg.es.seed) == (2, True, "raw", 5)
    assert math.isclose(cfg.es.alpha, 0.01) and cfg.iterations == 3
