"""Low-rank (EGGROLL) ES noise: factors are seeded, the batched population forward matches the
materialized per-member weights, the update is the mean of the low-rank noises, it learns."""
import math

import pytest
import torch

from esnb.es import ESConfig
from esnb.lowrank import (LowRankES, generate_population, lowrank_decoder, lowrank_factors, lowrank_noise,
                          score_population)
from esnb.generation import generate
from esnb.tinylm import build_model, build_tokenizer


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _model(tok):
    return build_model(len(tok), hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0).float().eval()


def test_factors_are_a_pure_function_of_seed_index_rank():
    a, b = lowrank_factors((6, 4), 7, 3, 2)
    a2, b2 = lowrank_factors((6, 4), 7, 3, 2)
    assert a.shape == (6, 2) and b.shape == (4, 2) and torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, lowrank_factors((6, 4), 8, 3, 2)[0])
    assert not torch.equal(a, lowrank_factors((6, 4), 7, 4, 2)[0])
    eps = lowrank_noise(torch.zeros(300, 200), 1, 0, 4)
    assert torch.linalg.matrix_rank(eps) == 4
    assert abs(float(eps.var()) - 1.0) < 0.15  # entries keep unit variance
    assert lowrank_noise(torch.zeros(5), 1, 0, 4).shape == (5,)  # vectors: full-rank noise


def test_rank_is_validated(tok):
    with pytest.raises(ValueError, match="rank"):
        LowRankES(_model(tok), ESConfig(population_size=4), rank=0)


def test_perturbed_materializes_the_low_rank_noise_and_restores_exactly(tok):
    model = _model(tok)
    es = LowRankES(model, ESConfig(population_size=4, sigma=0.1), rank=3)
    before = [p.detach().clone() for p in model.parameters()]
    m = es.ask()[1]
    flat = es.noise(m)
    with es.perturbed(m):
        delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert torch.allclose(delta, 0.1 * flat, atol=1e-6)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_update_is_alpha_times_mean_weighted_noise(tok):
    model = _model(tok)
    es = LowRankES(model, ESConfig(population_size=6, sigma=0.1, alpha=0.3), rank=2)
    theta0 = es.theta.clone()
    members = es.ask()
    rewards = torch.arange(6.0)
    w = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
    expected = theta0 + 0.3 * sum(float(wi) * es.noise(m) for wi, m in zip(w, members)) / 6
    es.tell(rewards)
    assert torch.allclose(es.theta, expected, atol=1e-5)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), es.theta)


def test_population_forward_matches_materialized_weights(tok):
    model = _model(tok)
    es = LowRankES(model, ESConfig(population_size=5, sigma=0.2), rank=2)
    members = es.ask()
    prompts = ["12 34>", "7 8 9>", "1>"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        dec = lowrank_decoder(model, es, members)
        logits = dec.prefill(enc["input_ids"], enc["attention_mask"], 4).view(len(members), len(prompts), -1)
        for j, m in enumerate(members):
            with es.perturbed(m):
                ref = model(**enc, position_ids=pos).logits[:, -1]
            assert torch.allclose(logits[j], ref, atol=1e-4), j
    pop = generate_population(es, members, model, tok, prompts, 12)
    for j, m in enumerate(members):
        with es.perturbed(m):
            assert generate(model, tok, prompts, 12) == pop[j]


class DigitTask:
    name, max_new_tokens, stop_strings = "digits", 8, ()

    def prompt(self, item, tokenizer=None):
        return item

    def score(self, completion, item):
        r = sum(ch.isdigit() for ch in completion) / 8
        return {"reward": r, "correct": r >= 0.5}


def test_low_rank_es_learns(tok):
    model = _model(tok)
    task = DigitTask()
    prompts = [f"{i} {3 * i}>" for i in range(6)]
    es = LowRankES(model, ESConfig(population_size=16, sigma=0.1, alpha=0.2, seed=1), rank=1)
    first = None
    for it in range(25):
        rewards, _ = score_population(es, es.ask(), model, tok, task, prompts, prompts, 8, batch_size=8)
        first = sum(rewards) / len(rewards) if first is None else first
        es.tell(rewards)
    final, _ = score_population(es, es.ask()[:1], model, tok, task, prompts, prompts, 8)
    with torch.no_grad():
        mean_now = sum(task.score(c, p)["reward"] for c, p in zip(generate(model, tok, prompts, 8), prompts)) / 6
    assert mean_now > first + 0.2, (first, mean_now)
    assert math.isfinite(final[0])


def test_replay_rebuilds_a_low_rank_run_bit_for_bit(tok):
    from esnb.lowrank import replay
    from esnb.runlog import bit_equal

    model = _model(tok)
    es = LowRankES(model, ESConfig(population_size=4, sigma=0.05, alpha=0.02, seed=3), rank=2)
    initial = es.state_dict()
    for t in range(3):
        es.tell(torch.arange(4.0).roll(t))
    fresh = _model(tok)
    again = replay((LowRankES(fresh, ESConfig(population_size=4, sigma=0.05, alpha=0.02, seed=3), rank=2).state_dict(),
                    es.history), fresh, rank=2)
    assert again.iteration == 3 and bit_equal(fresh, model)
    assert not bit_equal(fresh, _model(tok))  # it moved
    half = replay((initial, es.history), rank=2, until=2)  # fresh tensors, stopped early
    assert half.iteration == 2 and not torch.equal(half.theta, es.theta)
    wrong_rank = _model(tok)
    replay((initial, es.history), wrong_rank, rank=1)
    assert not bit_equal(wrong_rank, model)
