"""esnb.distributed: a 2-process torchrun run is bit-identical to the single-process run."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from esnb.distributed import (bytes_per_iteration, load_balance, member_share, population_evaluator,
                              ring_allreduce_bytes, weight_bytes)
from esnb.finetune import score_members

ARGS = ["--model", "tiny", "--task", "countdown", "--iterations", "3", "--population", "5", "--train-size", "8",
        "--test-size", "4", "--eval-every", "0", "--sigma", "0.01", "--alpha", "0.01", "--max-new-tokens", "48",
        "--threads", "1", "--no-progress"]


def _env():
    loopback = "lo0" if sys.platform == "darwin" else "lo"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME=loopback, HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def _log(path):
    rows = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("iteration", "seeds", "signs", "weights", "reward_mean", "reward_min",
                               "reward_max", "accuracy")} for r in rows]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def test_member_share_covers_the_population_once():
    for n in (1, 4, 5, 30):
        for w in (1, 2, 3, 8):
            got = sorted(i for r in range(w) for i in member_share(n, r, w))
            assert got == list(range(n))


def test_uneven_shares_n30_on_16_and_4_processes():
    # N need not be a multiple of W: 30 on 16 ranks is 14 ranks x 2 members + 2 ranks x 1
    sizes = [len(member_share(30, r, 16)) for r in range(16)]
    assert sizes == [2] * 14 + [1] * 2
    assert load_balance(30, 16) == {"slots": 2, "busy": 30 / 32}
    assert [len(member_share(30, r, 4)) for r in range(4)] == [8, 8, 7, 7]
    assert load_balance(30, 4)["slots"] == 8
    assert load_balance(32, 16) == {"slots": 2, "busy": 1.0}
    assert load_balance(3, 8) == {"slots": 1, "busy": 3 / 8}  # more ranks than members: some idle
    with pytest.raises(ValueError, match="rank"):
        member_share(30, 16, 16)
    with pytest.raises(ValueError, match="world"):
        load_balance(30, 0)


def test_ring_allreduce_bytes_by_hand():
    # 2 ranks: each sends half the buffer in the reduce-scatter and half in the all-gather
    assert ring_allreduce_bytes(480, 2) == 480
    # 8 ranks: 2 x 7/8 x 480 = 840; 16 ranks: 2 x 15/16 x 480 = 900; rounded up when not whole
    assert ring_allreduce_bytes(480, 8) == 840
    assert ring_allreduce_bytes(480, 16) == 900
    assert ring_allreduce_bytes(10, 3) == 14  # 40/3 = 13.3 -> 14
    assert ring_allreduce_bytes(480, 1) == 0


def test_bytes_per_iteration_counts_the_ring():
    assert bytes_per_iteration(30, 1) == 0
    # N=30: a 480-byte buffer (30 rewards + 30 accuracies, float64) + the 8-byte seed check
    assert bytes_per_iteration(30, 2) == 480 + 8
    assert bytes_per_iteration(30, 8) == 840 + 8
    assert bytes_per_iteration(30, 16) == 900 + 8
    assert bytes_per_iteration(30, 16, check_seeds=False) == 900
    assert weight_bytes(1_000_000) == 2_000_000


def test_one_process_world_is_score_members():
    assert population_evaluator().__name__ == "evaluate"  # no group: it falls back to score_members
    assert not torch.distributed.is_initialized()
    assert callable(score_members)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_two_processes_bit_identical_to_one(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    d = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "esnb.distributed", *ARGS,
                        "--output", str(dist_dir)], env=_env(), capture_output=True, text=True, timeout=240)
    assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-3000:]
    assert "2 processes, backend gloo" in d.stdout
    assert d.stdout.count("done:") == 1  # only rank 0 prints
    s = subprocess.run([sys.executable, "-m", "esnb.finetune", *ARGS, "--output", str(single_dir)],
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert s.returncode == 0, s.stdout[-3000:] + s.stderr[-3000:]

    assert _log(dist_dir) == _log(single_dir)  # same seeds, signs, weights and rewards
    a, b = _weights(dist_dir), _weights(single_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical final weights
    ca = torch.load(dist_dir / "checkpoint.pt", weights_only=False)["es"]["master"]
    cb = torch.load(single_dir / "checkpoint.pt", weights_only=False)["es"]["master"]
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))  # and the float32 master copies
    # the weights moved at all (otherwise the comparison would prove little)
    from esnb.models import load_model

    base, _ = load_model("tiny", device="cpu", dtype="fp32")
    assert any(not torch.equal(p.detach(), a[n]) for n, p in base.named_parameters() if n in a)


def _paper_like_file(path, target="7777"):
    """2,200 puzzles in the paper's schema (the first 200 train, the last 2,000 test), every test
    target set to ``target`` so a prompt shows which file it came from."""
    from esnb.tasks import countdown as cd

    train, test = cd.load_split()
    pool = train + test
    items = [{"id": i, "numbers": list(pool[i % len(pool)]["numbers"]),
              "target": str(pool[i % len(pool)]["target"]) if i < 200 else target} for i in range(2200)]
    path.write_text(json.dumps(items))
    return path


def test_distributed_trains_on_the_data_file_and_refuses_a_bad_one(tmp_path, monkeypatch, capsys):
    """torchrun -m esnb.distributed reads --data as python -m esnb.finetune does (it once trained on
    the shipped puzzles whatever --data said); a missing file stops before any model is loaded."""
    from esnb import distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    small = ["--model", "tiny", "--task", "countdown", "--iterations", "1", "--population", "2", "--train-size", "2",
             "--test-size", "2", "--eval-every", "0", "--max-new-tokens", "8", "--threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as stop:
        distributed.main([*small, "--data", str(tmp_path / "missing.json"), "--output", str(tmp_path / "bad")])
    assert stop.value.code == 2 and "--data" in capsys.readouterr().err
    data = _paper_like_file(tmp_path / "countdown.json")
    assert distributed.main([*small, "--data", str(data), "--output", str(tmp_path / "run")]) == 0
    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "run" / "samples_before.jsonl").read_text().splitlines() if x.strip()]
    assert prompts and all("7777" in p for p in prompts)  # the held-out items are the file's last 2,000


def test_torchrun_refuses_a_taken_folder_in_one_line_and_passes_overwrite_on(tmp_path):
    """A folder holding something else is refused by every rank before the group forms, in one line
    printed once (rank 0), with no traceback from esnb; --overwrite reaches the trainer (it once
    ended in FileExistsError and tracebacks from both ranks)."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"not a run")
    small = ["--model", "tiny", "--task", "countdown", "--iterations", "1", "--population", "2", "--train-size", "2",
             "--test-size", "1", "--eval-every", "0", "--max-new-tokens", "8", "--threads", "1", "--no-progress",
             "--output", str(out)]
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "esnb.distributed", *small]
    d = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert d.returncode != 0
    ours = [line for line in d.stderr.splitlines() if "esnb.distributed: error:" in line]
    assert len(ours) == 1 and "is not empty and holds no run" in ours[0], d.stderr[-3000:]
    assert "esnb/finetune.py" not in d.stderr and "esnb/distributed.py" not in d.stderr  # no esnb traceback
    assert (out / "model.safetensors").read_bytes() == b"not a run"
    d = subprocess.run(cmd + ["--overwrite"], env=_env(), capture_output=True, text=True, timeout=240)
    assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-3000:]
    assert (out / "log.jsonl").is_file()
