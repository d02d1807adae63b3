"""Toy tasks: seeded data, and batched population evaluation equal to the in-place loop."""
import pytest
import torch

from esnb.es import ES, ESConfig
from esnb.toy import (MLP, batched_forward, make_dataset, population_params, population_scores, score, sine_regression,
                      spirals, split, train_backprop, train_es, two_moons)


@pytest.mark.parametrize("name", ["moons", "spirals", "sine"])
def test_datasets_are_seeded(name):
    a, b, c = make_dataset(name, 100, seed=1), make_dataset(name, 100, seed=1), make_dataset(name, 100, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (100, 2 if name != "sine" else 1) and a.x.dtype == torch.float32


def test_classes_are_balanced():
    assert two_moons(101).y.bincount().tolist() == [50, 51]
    assert spirals(90, classes=3).y.bincount().tolist() == [30, 30, 30]
    with pytest.raises(ValueError):
        make_dataset("nope")


@pytest.mark.parametrize("antithetic", [False, True])
def test_population_params_equal_in_place_perturbation(antithetic):
    model = MLP(2, 8, 2, 2)
    es = ES(model, ESConfig(population_size=6, sigma=0.1, antithetic=antithetic, seed=3))
    stacked = population_params(es)
    for n, member in enumerate(es.ask()):
        with es.perturbed(member):
            for name, p in model.named_parameters():
                assert torch.equal(stacked[name][n], p)


@pytest.mark.parametrize("name", ["moons", "sine"])
def test_batched_scores_equal_loop(name):
    data = make_dataset(name, 64, seed=0)
    model = MLP(data.x.shape[1], 16, data.num_outputs, 2)
    es = ES(model, ESConfig(population_size=10, sigma=0.05, antithetic=True, seed=1))
    batched = population_scores(es, model, data, batched=True)
    looped = population_scores(es, model, data, batched=False)
    assert batched.shape == (10,)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    # the model is untouched afterwards
    assert torch.equal(es.params.flat_master(), torch.cat([p.reshape(-1) for p in model.parameters()]))


def test_batched_forward_matches_module():
    data = two_moons(32)
    model = MLP(2, 8, 2, 1)
    stacked = {k: v.detach().unsqueeze(0).repeat(3, *[1] * v.dim()) for k, v in model.named_parameters()}
    out = batched_forward(model, stacked, data.x)
    torch.testing.assert_close(out[1], model(data.x))


def test_es_and_backprop_learn_moons():
    train, test = split(two_moons(200, seed=0))
    model = MLP(2, 16, 2, 2, seed=0)
    before = float((model(test.x).argmax(-1) == test.y).float().mean())
    es = ES(model, ESConfig(population_size=20, sigma=0.05, alpha=0.05, antithetic=True, seed=0, optimizer="adam"))
    log = train_es(model, train, test, es, iterations=60, eval_every=30)
    assert log.rows[-1]["forwards"] == 60 * 20 and log.rows[-1]["test"] > max(before, 0.8)
    bp = train_backprop(MLP(2, 16, 2, 2, seed=0), train, test, steps=60, eval_every=30)
    assert bp.rows[-1]["test"] > 0.8


def test_score_shapes():
    y = torch.tensor([0, 1, 1])
    out = torch.randn(4, 3, 2)
    assert score(out, y, "classification").shape == (4,)
    s = sine_regression(5)
    assert score(torch.zeros(4, 5, 1), s.y, "regression").shape == (4,)
