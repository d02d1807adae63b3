"""A run is its seed log: replay == live run bit for bit; atomic checkpoints; bit-identical resume."""
import json
import os

import pytest
import torch
from torch import nn

from esnb.es import ES, ESConfig
from esnb.runlog import (RunLog, bit_equal, load_checkpoint, load_run, max_abs_diff, read_log, replay, run_size,
                         save_checkpoint, save_run)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


_X = torch.linspace(-1, 1, 32).reshape(8, 4)


def _fitness(model):
    with torch.no_grad():
        return -float(model(_X.to(next(model.parameters()).dtype)).float().pow(2).mean())


def _run(es, model, iterations, log=None):
    for _ in range(iterations):
        entry = es.step(lambda: _fitness(model))
        if log is not None:
            log.append(entry)


CONFIGS = [
    dict(population_size=8, sigma=0.05, alpha=0.02, seed=1),
    dict(population_size=8, sigma=0.05, alpha=0.01, seed=2, optimizer="adam", antithetic=True),
    dict(population_size=6, sigma=0.05, alpha=0.02, seed=3, momentum=0.9, weight_decay=0.01, shaping="centered_rank"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_equals_live_run_bit_exactly(tmp_path, cfg, dtype):
    model = _model(dtype)
    es = ES(model, ESConfig(**cfg))
    with RunLog.create(tmp_path / "run", es) as log:
        _run(es, model, 12, log)
    assert len(read_log(tmp_path / "run" / "log.jsonl")) == 12
    fresh = _model(dtype)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()  # the replay must take the weights from initial.pt, not from the module
    rebuilt = replay(tmp_path / "run", fresh)
    assert rebuilt.iteration == 12
    assert bit_equal(rebuilt.params.master, es.params.master)
    assert bit_equal(fresh, model) and max_abs_diff(fresh, model) == 0.0
    # without a module: plain tensors
    assert bit_equal(replay(tmp_path / "run").params.master, es.params.master)
    # part of the way
    part = replay(tmp_path / "run", until=5)
    assert part.iteration == 5 and not bit_equal(part.params.master, es.params.master)


def test_save_run_after_the_fact_and_size(tmp_path):
    model = _model()
    es = ES(model, ESConfig(population_size=10, sigma=0.05, alpha=0.02))
    initial = es.state_dict()
    _run(es, model, 5)
    save_run(tmp_path / "r", initial, es.history)
    sizes = run_size(tmp_path / "r")
    assert set(sizes) == {"initial.pt", "config.json", "log.jsonl"}
    assert sizes["log.jsonl"] < 5 * 10 * 60  # tens of bytes per member and iteration
    assert bit_equal(replay(tmp_path / "r").params.master, es.params.master)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, optimizer):
    cfg = ESConfig(population_size=8, sigma=0.05, alpha=0.02, seed=5, optimizer=optimizer, momentum=0.5 if optimizer == "sgd" else 0.0)
    straight = _model()
    es = ES(straight, cfg)
    _run(es, straight, 10)

    model = _model()
    es1 = ES(model, cfg)
    log = RunLog.create(tmp_path / "run", es1)
    _run(es1, model, 4, log)
    save_checkpoint(tmp_path / "ckpt.pt", {"es": es1.state_dict()})
    _run(es1, model, 2, log)  # work after the checkpoint that the "crash" loses
    log.close()
    del es1, model

    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # whatever the module held, the checkpoint decides
    es2 = ES(model, cfg)
    es2.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["es"])
    with RunLog.open(tmp_path / "run", resume_at=es2.iteration) as log:
        assert log.next_iteration == 4
        _run(es2, model, 6, log)
    assert es2.iteration == 10
    assert bit_equal(model, straight)
    assert bit_equal(replay(tmp_path / "run").params.master, es.params.master)


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"a": torch.arange(3)})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"a": torch.arange(5), "b": Boom()})
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temp file left behind
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_cut_off_last_line_is_dropped_and_bad_lines_name_the_line(tmp_path):
    model = _model()
    es = ES(model, ESConfig(population_size=4, sigma=0.05, alpha=0.02))
    with RunLog.create(tmp_path / "run", es) as log:
        _run(es, model, 3, log)
    path = tmp_path / "run" / "log.jsonl"
    with open(path, "a") as f:
        f.write('{"iteration": 3, "seeds": [1')
    with pytest.warns(UserWarning, match="incomplete"):
        assert len(read_log(path)) == 3
    with RunLog.open(tmp_path / "run") as log:
        assert log.next_iteration == 3
    assert len(read_log(path)) == 3
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl:2"):
        read_log(path)


def test_log_lines_round_trip_floats_exactly(tmp_path):
    model = _model()
    es = ES(model, ESConfig(population_size=6, sigma=0.05, alpha=0.02, shaping="zscore"))
    initial = es.state_dict()
    _run(es, model, 2)
    save_run(tmp_path / "r", initial, es.history)
    _, entries = load_run(tmp_path / "r")
    for e, h in zip(entries, es.history):
        assert e["weights"] == h["weights"] and e["seeds"] == h["seeds"] and e["signs"] == h["signs"]
    json.loads((tmp_path / "r" / "config.json").read_text())


def test_create_refuses_to_overwrite(tmp_path):
    es = ES(_model(), ESConfig(population_size=4))
    RunLog.create(tmp_path / "run", es).close()
    with pytest.raises(FileExistsError):
        RunLog.create(tmp_path / "run", es)
