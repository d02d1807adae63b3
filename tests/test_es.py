import math

import pytest
import torch
from torch import nn

from esnb import ES, ESConfig, centered_ranks, es_gradient, get_landscape, shape_fitness, zscore
from esnb.es import iteration_seeds


# ---------------------------------------------------------------- config validation

def test_defaults_are_the_papers():
    cfg = ESConfig()
    assert (cfg.population_size, cfg.sigma, cfg.alpha) == (30, 1e-3, 5e-4)
    assert cfg.shaping == "zscore" and cfg.optimizer == "sgd" and cfg.antithetic is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("population_size", 0), ("population_size", -3), ("population_size", 2.5), ("population_size", "30"),
        ("population_size", True), ("sigma", 0.0), ("sigma", -1e-3), ("sigma", float("nan")), ("sigma", float("inf")),
        ("sigma", "big"), ("alpha", -1e-4), ("alpha", float("nan")), ("shaping", "softmax"), ("optimizer", "lbfgs"),
        ("momentum", 1.0), ("momentum", -0.1), ("adam_betas", (0.9,)), ("adam_betas", (0.9, 1.5)), ("adam_eps", 0.0),
        ("weight_decay", -1.0), ("seed", -1), ("seed", 1.5), ("antithetic", "yes"),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("[")[0]):
        ESConfig(**{field: value})


def test_antithetic_needs_even_population():
    with pytest.raises(ValueError, match="population_size"):
        ESConfig(population_size=7, antithetic=True)


# ---------------------------------------------------------------- shaping

def test_zscore_has_zero_mean_unit_std_and_handles_ties():
    z = zscore(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std(unbiased=False)) - 1) < 1e-6
    assert torch.all(zscore(torch.full((5,), 0.7)) == 0)  # no signal, no update


def test_centered_ranks_depend_only_on_order():
    r = torch.tensor([0.1, 5.0, -3.0, 1e9])
    cr = centered_ranks(r)
    assert torch.allclose(cr, torch.tensor([-1 / 6, 1 / 6, -0.5, 0.5], dtype=torch.float64))
    assert torch.equal(cr, centered_ranks(r**3))  # monotone transform, same weights
    ties = centered_ranks(torch.tensor([1.0, 1.0, 2.0]))
    assert ties[0] == ties[1] and float(ties.sum()) == pytest.approx(0.0)


def test_raw_shaping_keeps_rewards():
    r = torch.tensor([1.0, -2.0])
    assert torch.equal(shape_fitness(r, "raw"), r.double())


# ---------------------------------------------------------------- the estimate and the update

def test_gradient_estimate_approaches_true_gradient_as_population_grows():
    quad = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    f = lambda x: -0.5 * ((x @ quad) * x).sum(-1)  # noqa: E731
    true = -(quad @ theta)
    cosines = []
    for n in (10, 100, 10_000):
        gen = torch.Generator().manual_seed(0)
        g = es_gradient(f, theta, sigma=0.01, population_size=n, generator=gen, shaping="raw", antithetic=True)
        cosines.append(float(torch.nn.functional.cosine_similarity(g, true, dim=0)))
    assert cosines[-1] > 0.99 and cosines[-1] > cosines[0]
    # raw rewards with antithetic pairs: the estimate is unbiased, so its length matches too
    assert float(g.norm() / true.norm()) == pytest.approx(1.0, rel=0.05)


def test_update_is_alpha_times_mean_of_z_times_eps():
    theta = torch.zeros(5)
    es = ES(theta, ESConfig(population_size=6, sigma=0.1, alpha=0.3, seed=3))
    members = es.ask()
    eps = torch.stack([es.noise(m) for m in members])
    rewards = torch.arange(6.0)
    es.tell(rewards)
    z = zscore(rewards).float()
    expected = 0.3 * (z[:, None] * eps).mean(0)
    assert torch.allclose(es.theta, expected, atol=1e-7)
    assert torch.equal(theta, es.theta)  # the tensor given to ES is updated in place


def test_antithetic_pairs_share_noise_with_opposite_signs_and_cancel_constant_fitness():
    es = ES(torch.zeros(4), ESConfig(population_size=8, sigma=0.5, alpha=1.0, antithetic=True, shaping="raw"))
    members = es.ask()
    for a, b in zip(members[::2], members[1::2]):
        assert a.seed == b.seed and (a.sign, b.sign) == (1, -1)
        assert torch.equal(es.noise(a), -es.noise(b))
    es.tell(torch.full((8,), 42.0))  # raw rewards, no baseline: the pairs still cancel exactly
    assert torch.all(es.theta == 0)


def test_all_equal_rewards_leave_weights_unchanged():
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    es = ES(model, ESConfig(population_size=4, sigma=0.1, alpha=1.0))
    es.tell([1.0, 1.0, 1.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_rewards_raise_before_touching_weights():
    es = ES(torch.ones(3), ESConfig(population_size=4))
    with pytest.raises(ValueError, match="members \\[2\\]"):
        es.tell([0.0, 1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="4 members"):
        es.tell([0.0, 1.0])
    assert torch.equal(es.theta, torch.ones(3)) and es.iteration == 0


def test_seeds_are_a_function_of_run_seed_and_iteration():
    assert iteration_seeds(7, 3, 5) == iteration_seeds(7, 3, 5)
    assert iteration_seeds(7, 3, 5) != iteration_seeds(7, 4, 5) != iteration_seeds(8, 3, 5)


# ---------------------------------------------------------------- convergence

@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
def test_converges_on_sphere(shaping):
    land = get_landscape("sphere")
    es = ES(torch.tensor(land.start), ESConfig(population_size=20, sigma=0.1, alpha=0.05, shaping=shaping))
    for _ in range(300):
        es.tell(land.reward(es.population()))
    assert float(es.theta.norm()) < 0.05


def test_adam_converges_on_rosenbrock():
    land = get_landscape("rosenbrock")
    cfg = ESConfig(population_size=40, sigma=0.02, alpha=0.02, optimizer="adam", antithetic=True, shaping="centered_rank")
    es = ES(torch.tensor(land.start, dtype=torch.float64), cfg)
    start = float(land.value(es.theta))
    for _ in range(1500):
        es.tell(land.reward(es.population()))
    end = float(land.value(es.theta))
    assert end < 1e-2 < start and float((es.theta - torch.tensor([1.0, 1.0], dtype=torch.float64)).norm()) < 0.1


def test_module_step_improves_regression_and_restores_between_members():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(128, 2)
    y = x[:, :1] - 2 * x[:, 1:]
    def loss() -> float:
        with torch.no_grad():  # ES needs no graph (and float() of a graph tensor warns)
            return float(((model(x) - y) ** 2).mean())

    es = ES(model, ESConfig(population_size=20, sigma=0.05, alpha=0.05, optimizer="adam"))
    start = loss()
    for _ in range(150):
        es.step(lambda: -loss())
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), es.theta.float())
    assert loss() < 0.3 * start


def test_state_dict_round_trip_continues_identically():
    def run(split: int | None):
        torch.manual_seed(1)
        model = nn.Linear(4, 3)
        cfg = ESConfig(population_size=6, sigma=0.05, alpha=0.05, optimizer="adam")
        es = ES(model, cfg)
        for it in range(6):
            if it == split:
                state = es.state_dict()
                torch.manual_seed(99)
                model = nn.Linear(4, 3)
                es = ES(model, cfg)
                es.load_state_dict(state)
            es.tell([math.sin(it + k) for k in range(6)])
        return es.theta

    assert torch.equal(run(None), run(3))
