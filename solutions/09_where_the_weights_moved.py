"""Solutions to the exercises of notebooks/09_where_the_weights_moved.ipynb.

Each ``exercise_K`` runs at a small size (synthetic tensors, a toy quadratic) and checks its own answer.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from esnb import analysis
from esnb.es import ES, ESConfig
from esnb.runlog import replay


def es_step(eps: torch.Tensor, rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha/N sum_n z_n eps_n with z the z-scored rewards (population std)."""
    z = (rewards - rewards.mean()) / rewards.std(unbiased=False)
    return alpha / eps.shape[0] * (z[:, None] * eps).sum(0)


def exercise_1() -> None:
    """The step norm is alpha*sqrt(1 + (P-2)/N) for linear rewards, alpha*sqrt(P/N) for random ones."""
    gen = torch.Generator().manual_seed(0)
    p, n, alpha, draws = 10_000, 8, 0.01, 300
    g = torch.randn(p, generator=gen, dtype=torch.float64)
    sq = {"linear": [], "random": []}
    for _ in range(draws):
        eps = torch.randn(n, p, generator=gen, dtype=torch.float64)
        sq["linear"].append(float(es_step(eps, eps @ g, alpha).pow(2).sum()))
        sq["random"].append(float(es_step(eps, torch.randn(n, generator=gen, dtype=torch.float64), alpha).pow(2).sum()))
    linear, random = math.sqrt(np.mean(sq["linear"])), math.sqrt(np.mean(sq["random"]))
    print(f"linear rewards {linear:.4f} (formula {analysis.es_step_norm(alpha, p, n):.4f}); "
          f"random rewards {random:.4f} (alpha*sqrt(P/N) {alpha * math.sqrt(p / n):.4f})")
    assert abs(linear / analysis.es_step_norm(alpha, p, n) - 1) < 0.02
    assert abs(random / (alpha * math.sqrt(p / n)) - 1) < 0.02
    # the two differ by less than 0.1%: the size of a step says nothing about what the rewards meant
    assert abs(linear / random - 1) < 0.01


def _toy_run(iterations: int, dims: int = 2000, seed: int = 0):
    """ES on f(theta) = -||theta - theta*||^2 from 0; returns the ES and theta*."""
    target = torch.randn(dims, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    es = ES(torch.zeros(dims, dtype=torch.float64),
            ESConfig(population_size=16, sigma=0.05, alpha=0.02, antithetic=False, seed=seed))
    for _ in range(iterations):
        es.tell(-(es.population() - target).pow(2).sum(1))
    return es, target


def exercise_2() -> None:
    """The displacement towards theta* tells the run from its shuffled null; the RMS change does not."""
    torch.set_num_threads(1)
    es, target = _toy_run(30)
    u = target / target.norm()
    real = es.theta.double()
    null_es = replay((ES(torch.zeros_like(target), es.config).state_dict(), analysis.shuffled_entries(es.history, seed=1)))
    null = null_es.params.master[0].double()
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    print(f"towards theta*: run {float(real @ u):.3f}, null {float(null @ u):.3f}; RMS change: run {rms(real):.4f}, null {rms(null):.4f}")
    assert float(real @ u) > 5 * abs(float(null @ u))
    # the RMS changes differ by a few percent (the learned component is one direction of 2,000),
    # the displacements towards theta* by a factor of twenty
    assert abs(rms(real) / rms(null) - 1) < 0.15


def exercise_3() -> None:
    """Learning grows like T, the null's spread like sqrt(T)."""
    torch.set_num_threads(1)
    rows = []
    for t in (10, 40, 160):
        es, target = _toy_run(t, dims=500)
        u = [target / target.norm()]
        proj = analysis.noise_projections(es, es.history, {"u": u})["u"]
        real = analysis.projection_of(es.history, proj, es.config.alpha)
        nulls = analysis.null_projections(es.history, proj, es.config.alpha, draws=300, seed=0)
        rows.append((t, real, nulls.std()))
        print(f"T={t:>3}: displacement {real:.3f}, null spread {nulls.std():.4f}")
    (t1, r1, s1), _, (t3, r3, s3) = rows
    # 16x the steps: the displacement grows about 16x (minus the slowdown near the optimum), the spread about 4x
    assert r3 / r1 > 8
    assert 2.5 < s3 / s1 < 6


def exercise_4() -> None:
    """A step in which every antithetic pair tied has norm zero."""
    entry = {"seeds": [11, 11, 22, 22, 33, 33], "signs": [1, -1, 1, -1, 1, -1],
             "weights": [1.2, 1.2, -0.3, -0.3, -0.9, -0.9]}
    tied = analysis.logged_step_norms([entry], alpha=0.01, n_params=1_000_000)[0]
    untied = analysis.logged_step_norms([{**entry, "weights": [1.2, -1.2, 0.3, -0.3, 0.9, -0.9]}], 0.01, 1_000_000)[0]
    print(f"every pair tied: {tied}; pairs split: {untied:.3f}")
    assert tied == 0.0 and untied > 0
    # checked against the real thing: an ES step with tied pairs leaves theta where it was
    es = ES(torch.zeros(1000), ESConfig(population_size=6, sigma=0.1, alpha=0.01, antithetic=True, seed=0))
    es.tell([1.0, 1.0, 0.0, 0.0, 2.0, 2.0])
    assert float(es.theta.abs().max()) == 0.0


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("exercise_") and callable(fn):
            print(f"--- {name}")
            fn()
