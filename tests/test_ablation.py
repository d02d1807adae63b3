"""The pieces of esnb.ablation (notebook 11): budgets, fresh puzzles, drift, pair signal to noise."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from esnb.ablation import (FreshPuzzles, fresh_puzzles, fresh_run, iterations_for_budget, outcomes, pair_differences,
                           pair_snr, weight_drift)
from esnb.finetune import FinetuneConfig, rebuild
from esnb.models import load_model
from esnb.runlog import bit_equal
from esnb.tasks import countdown as cd
from esnb.tasks import get_task


def test_iterations_for_budget():
    assert iterations_for_budget(2048, 8, 16) == 16
    assert iterations_for_budget(2048, 128, 8) == 2
    assert iterations_for_budget(100, 2, 8) == 6
    with pytest.raises(ValueError, match="budget"):
        iterations_for_budget(64, 128, 8)


def test_fresh_puzzles_never_repeat():
    puzzles = [{"numbers": [i, 1], "target": str(i + 1)} for i in range(10)]
    fresh = FreshPuzzles(puzzles, batch_size=3)
    assert fresh.batch(0) == puzzles[:3] and fresh.batch(2) == puzzles[6:9]
    with pytest.raises(ValueError, match="run out"):
        fresh.batch(3)


def test_pair_snr_sees_signal_and_its_absence():
    rng = np.random.default_rng(0)
    noise_only = rng.normal(0, 1, size=(16, 400))
    assert pair_snr(noise_only)["signal_var"] < 0.01
    directions = rng.normal(0, 1, size=(16, 1))          # each pair's true difference
    with_signal = directions + rng.normal(0, 1, size=(16, 400))
    out = pair_snr(with_signal, batch_sizes=(1, 4))
    assert 0.4 < out["signal_var"] < 2.5
    assert math.isclose(out["snr"][4], 2 * out["snr"][1])
    assert pair_snr(np.zeros((3, 5)))["snr"][1] == 0.0
    assert pair_snr(np.zeros((3, 5)))["zero_share"] == 1.0


def test_weight_drift_counts_unchanged_bf16_entries():
    net = nn.Linear(4, 4).to(torch.bfloat16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight[0, 0] += 1.0
    d = weight_drift(before, net)
    assert math.isclose(d["unchanged_share"], 19 / 20)
    assert d["relative_drift"] > 0


def test_fresh_run_sees_new_puzzles_and_its_log_rebuilds(tmp_path):
    task = get_task("countdown", prompt_style="compact")
    _, test = cd.load_split()
    puzzles = fresh_puzzles(6, seed=1, exclude=test)
    assert not {cd.puzzle_key(p) for p in puzzles} & {cd.puzzle_key(p) for p in test}
    seen = []

    class Spy(FreshPuzzles):
        def __call__(self, es, members, model, tokenizer, task, prompts, items, *a, **k):
            seen.append([x["id"] for x in self.batch(es.iteration)])
            return super().__call__(es, members, model, tokenizer, task, prompts, items, *a, **k)

    model, tok = load_model("tiny", device="cpu")
    cfg = FinetuneConfig.of(population_size=2, antithetic=True, sigma=0.002, alpha=0.002, batch_size=2, iterations=3,
                         eval_every=0, test_size=3, save_final=False, train_size=2)
    import esnb.ablation as ab
    orig, ab.FreshPuzzles = ab.FreshPuzzles, Spy
    try:
        r = fresh_run(model, tok, task, cfg, puzzles, test, output_dir=tmp_path / "run")
    finally:
        ab.FreshPuzzles = orig
    assert seen == [[p["id"] for p in puzzles[2 * t:2 * t + 2]] for t in range(3)]
    assert [row["iteration"] for row in r.format_rows] == [0, 3]
    rows = [json.loads(x) for x in (tmp_path / "run" / "format.jsonl").read_text().splitlines()]
    assert rows == r.format_rows
    fresh, _ = load_model("tiny", device="cpu")
    rebuild(tmp_path / "run", fresh)
    assert bit_equal(fresh, model)
    out = outcomes(model, tok, task, test[:3])
    assert out["correct"].shape == (3,) and math.isclose(out["accuracy"], r.evals["test_accuracy"].iloc[-1])


def test_pair_differences_restore_the_model():
    task = get_task("countdown", prompt_style="compact")
    _, test = cd.load_split()
    model, tok = load_model("tiny", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = pair_differences(model, tok, task, test[:3], sigma=0.01, pairs=2)
    assert d["reward"].shape == (2, 3)
    assert np.allclose(d["reward"], d["format"] + d["answer"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
