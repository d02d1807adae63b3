"""analysis: the ES step-norm fact, shuffled-reward nulls and projections onto a direction."""
import math

import numpy as np
import pytest
import torch

from esnb import analysis
from esnb.es import ES, ESConfig
from esnb.runlog import replay


def test_es_step_norm_matches_monte_carlo_whatever_the_rewards():
    gen = torch.Generator().manual_seed(0)
    d, n, alpha = 100, 10, 0.5
    g = torch.randn(d, generator=gen)
    sq = {"linear": [], "random": []}
    for _ in range(2000):
        eps = torch.randn(n, d, generator=gen, dtype=torch.float64)
        for kind, r in (("linear", eps @ g.double()), ("random", torch.randn(n, generator=gen, dtype=torch.float64))):
            z = (r - r.mean()) / r.std(unbiased=False)
            sq[kind].append(float((alpha / n * (z[:, None] * eps).sum(0)).pow(2).sum()))
    expected = analysis.es_step_norm(alpha, d, n)
    assert expected == pytest.approx(alpha * math.sqrt(1 + (d - 2) / n))
    assert math.sqrt(np.mean(sq["linear"])) == pytest.approx(expected, rel=0.03)
    # rewards unrelated to the noise: exactly alpha * sqrt(d / N), within (N - 2)/N * alpha**2 of the above
    assert math.sqrt(np.mean(sq["random"])) == pytest.approx(alpha * math.sqrt(d / n), rel=0.03)
    with pytest.raises(ValueError, match="population"):
        analysis.es_step_norm(0.1, 10, 1)


def _small_run(antithetic: bool, iterations: int = 6, p: int = 4000):
    theta = torch.zeros(p)
    es = ES(theta, ESConfig(population_size=8, sigma=0.1, alpha=0.05, antithetic=antithetic, seed=3))
    target = torch.randn(p, generator=torch.Generator().manual_seed(1))
    for _ in range(iterations):
        pop = es.population()
        es.tell(-(pop - target).pow(2).sum(1))
    return es, target


@pytest.mark.parametrize("antithetic", [False, True])
def test_projection_of_a_run_and_of_its_shuffled_null(antithetic):
    torch.set_num_threads(1)
    es, target = _small_run(antithetic)
    entries = es.history
    delta = es.theta.double()                      # started at zero
    direction = [target.clone()]
    proj = analysis.noise_projections(es, entries, {"target": direction})["target"]
    assert proj.shape == (len(entries), 8)
    # the displacement along the direction, from the log alone, equals the actual one
    assert analysis.projection_of(entries, proj, es.config.alpha) == pytest.approx(float(delta @ target.double()), rel=1e-6)
    # a shuffled log replayed gives the displacement its shuffled weights predict
    null_log = analysis.shuffled_entries(entries, seed=5)
    assert [sorted(a["weights"]) for a in null_log] == [sorted(a["weights"]) for a in entries]
    # the null keeps every step's size (with antithetic pairs too: pairs move as units)
    assert np.allclose(analysis.logged_step_norms(null_log, es.config.alpha, target.numel()),
                       analysis.logged_step_norms(entries, es.config.alpha, target.numel()))
    null_es = replay(({**ES(torch.zeros(target.numel()), es.config).state_dict()}, null_log))
    got = float(null_es.params.master[0].double() @ target.double())
    assert analysis.projection_of(null_log, proj, es.config.alpha) == pytest.approx(got, rel=1e-6)
    # learning: the run moved towards the target far beyond the null's spread
    nulls = analysis.null_projections(entries, proj, es.config.alpha, draws=300, seed=0)
    real = analysis.projection_of(entries, proj, es.config.alpha)
    assert real > nulls.mean() + 4 * nulls.std()
    # the logged step sizes are what the weights alone predict (P >> N)
    norms = np.array([e["update_norm"] for e in entries])
    assert np.allclose(analysis.logged_step_norms(entries, es.config.alpha, target.numel()), norms, rtol=0.1)
    with pytest.raises(ValueError, match="directions"):
        analysis.noise_projections(es, entries, {"bad": [torch.zeros(3)]})


def test_walk_spread_and_a_walk_matched_step_by_step():
    assert analysis.walk_spread([3.0, 4.0], n_params=25) == pytest.approx(1.0)
    shifts = {"w": torch.zeros(200_000, dtype=torch.float64)}
    walk = analysis.matched_random_walk(shifts, 2, step_rms=[3e-3, 4e-3], seed=0)
    assert float(walk["w"].pow(2).mean().sqrt()) == pytest.approx(5e-3, rel=0.01)
    with pytest.raises(ValueError, match="step_rms"):
        analysis.matched_random_walk(shifts, 3, step_rms=[1.0, 2.0])


def test_summarize_change_keeps_stats_quantiles_a_sample_and_the_exact_cosine_with_an_es_run(tmp_path):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    # an ES run on the same shapes: its log alone gives its change
    es = ES(net, ESConfig(population_size=6, sigma=0.1, alpha=0.05, seed=2))
    for _ in range(4):
        es.tell(torch.randn(6, generator=gen))
    es_delta = torch.cat([(m.double() - before[k].double()).reshape(-1) for k, m in zip(es.params.names, es.params.master)])
    # another change (the "GRPO" one), summarized against the ES run's noise
    after = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in before.items()}
    s = analysis.summarize_change(before, after, sample=500, seed=3,
                                  noise=(ES(torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20)),
                                            es.config), es.history))
    delta = torch.cat([(after[k].double() - before[k].double()).reshape(-1) for k in before])
    assert s["numel"] == delta.numel() and s["norm"] == pytest.approx(float(delta.norm()))
    assert s["rms"] == pytest.approx(float(delta.pow(2).mean().sqrt()))
    assert s["stats"][0]["group"] == "all" and s["stats"][0]["rms"] == pytest.approx(s["rms"])
    assert np.allclose(s["quantiles"], np.quantile((delta / s["rms"]).numpy(), s["probabilities"]))
    idx = np.sort(np.random.default_rng(3).choice(delta.numel(), size=500, replace=False))
    assert s["sample"].dtype == np.float32 and np.allclose(s["sample"], delta[torch.from_numpy(idx)].numpy(), atol=1e-7)
    dot = analysis.projection_of(es.history, np.asarray(s["projections"]), es.config.alpha)
    assert dot == pytest.approx(float(es_delta @ delta), rel=1e-5)
    # written and read back
    analysis.save_change_summary(s, tmp_path)
    back = analysis.load_change_summary(tmp_path)
    assert back["stats"].loc["all", "rms"] == pytest.approx(s["rms"]) and np.array_equal(back["sample"], s["sample"])
    assert np.allclose(back["projections"], s["projections"]) and back["weights_rms"] == s["weights_rms"]
    with pytest.raises(ValueError, match="noise"):
        analysis.summarize_change(before, after, noise=(ES(torch.zeros(3), es.config), es.history))
