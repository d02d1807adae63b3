"""The GRPO baseline (TRL's GRPOTrainer behind esnb's task/evaluation interface)."""
import json

import pytest
import torch

from esnb import tinylm
from esnb.generation import truncate_at_stops
from esnb.grpo import (GRPORunConfig, PeakRSS, load_result, train_grpo,
                       training_state_bytes)


class Digits:
    """A trivially learnable task: reward = fraction of digits in the completion; correct when
    the completion starts with a digit. A random model writes digits ~10% of the time."""

    name = "digits"
    max_new_tokens = 6
    stop_strings = ()

    def prompt(self, item, tokenizer=None):
        return item["prompt"]

    def score(self, completion, item):
        frac = sum(c.isdigit() for c in completion) / max(len(completion), 1)
        return {"reward": frac, "correct": completion[:1].isdigit()}


ITEMS = [{"prompt": f"q{i}>"} for i in range(8)]


def fresh_model(seed=0):
    torch.manual_seed(seed)
    tok = tinylm.build_tokenizer()
    model = tinylm.build_model(len(tok), hidden_size=64, layers=2, heads=4, intermediate_size=128, seed=seed)
    return model, tok


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("num_generations", 1), ("prompts_per_step", 0), ("learning_rate", 0.0),
    ("learning_rate", -1e-4), ("beta", -0.1), ("temperature", 0), ("eval_every", -1),
    ("loss_type", "ppo"), ("scale_rewards", "sometimes"), ("seed", -1), ("max_new_tokens", 0),
    ("steps", 2.5), ("num_generations", True), ("trl_args", {"beta": 0.1}), ("trl_args", [1]),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GRPORunConfig(**{field: value})


def test_samples_per_step():
    assert GRPORunConfig(num_generations=8).samples_per_step == 8
    assert GRPORunConfig(num_generations=4, prompts_per_step=3).samples_per_step == 12


def test_cut_keeps_the_stop_string():
    # GRPO scores completions cut exactly as esnb.generation cuts them for ES
    assert truncate_at_stops("a</answer>junk", ["</answer>"]) == "a</answer>"
    assert truncate_at_stops("no stop here", ["</answer>"]) == "no stop here"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    model, tok = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eos_before = model.generation_config.eos_token_id
    cfg = GRPORunConfig(steps=12, num_generations=4, prompts_per_step=2, learning_rate=3e-3,
                        eval_every=4, seed=0, progress=False, track_updates=True)
    res = train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=out)
    return res, before, eos_before, out


def test_grpo_learns_a_trivial_task_in_a_few_steps(trained):
    res = trained[0]
    assert res.accuracy_before == 0.0
    assert res.accuracy_after >= 0.75
    assert res.evals["test_reward"].iloc[-1] > res.evals["test_reward"].iloc[0] + 0.5


def test_sample_counting_matches_the_es_engine_unit(trained):
    res = trained[0]
    log, evals = res.log, res.evals
    assert list(log["iteration"]) == list(range(12))
    assert list(log["samples"]) == [8 * (i + 1) for i in range(12)]   # 2 prompts x 4 completions
    assert res.samples == 96
    assert list(evals["iteration"]) == [0, 4, 8, 12]
    assert list(evals["samples"]) == [0, 32, 64, 96]
    assert (log["seconds"].diff().dropna() > 0).all()
    assert {"reward_mean", "accuracy", "seconds", "samples", "loss", "update_rms"} <= set(log.columns)
    assert log["update_rms"].gt(0).all()


def test_memory_and_state_are_measured(trained):
    res = trained[0]
    n = sum(p.numel() for p in res.model.parameters())
    assert res.state_bytes["gradients"] == 4 * n
    assert res.state_bytes["optimizer"] >= 2 * 4 * n          # AdamW: two moments per weight
    assert res.state_bytes["reference_model"] == 0            # beta = 0: no reference
    assert res.peak_rss >= 0


def test_model_is_left_clean_and_saved_run_reloads(trained):
    from transformers import AutoModelForCausalLM

    res, before, eos_before, out = trained
    model = res.model
    assert "forward" not in vars(model)                        # TRL's fused head removed
    assert model.generation_config.eos_token_id == eos_before
    assert not model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = AutoModelForCausalLM.from_pretrained(out / "final")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    loaded = load_result(out)
    assert loaded.log_rows == json.loads(json.dumps(res.log_rows))
    assert loaded.accuracy_after == res.accuracy_after
    assert loaded.config == res.config
    assert json.loads((out / "summary.json").read_text())["samples"] == 96
    from esnb.runlog import umask

    mask = umask()  # every file as an ordinary open() makes it (safetensors alone writes 0600)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (out / "final").iterdir()} == \
        {p.name: oct(0o666 & ~mask) for p in (out / "final").iterdir()}


def test_kl_penalty_uses_an_in_memory_reference():
    model, tok = fresh_model(1)   # a model that exists nowhere on disk
    cfg = GRPORunConfig(steps=3, num_generations=4, learning_rate=3e-3, beta=0.1, eval_every=0,
                        seed=1, progress=False)
    res = train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg)
    assert "kl" in res.log.columns and res.log["kl"].iloc[-1] > 0
    n = sum(p.numel() for p in model.parameters())
    assert res.state_bytes["reference_model"] == 4 * n


def test_same_seed_same_run():
    runs = []
    for _ in range(2):
        model, tok = fresh_model(2)
        cfg = GRPORunConfig(steps=3, num_generations=4, learning_rate=1e-3, eval_every=0,
                            seed=5, progress=False)
        res = train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg)
        runs.append((res.log["reward_mean"].tolist(), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_peak_rss_sees_a_large_allocation():
    with PeakRSS(interval=0.001) as mem:
        x = torch.ones(64 * 2**20 // 4)   # 64 MiB
        x.add_(1)
        import time
        time.sleep(0.02)
        del x
    assert mem.peak >= 48 * 2**20


def test_training_state_bytes_for_adam():
    m = torch.nn.Linear(10, 10)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 10)).sum().backward()
    opt.step()
    s = training_state_bytes(m, opt)
    assert s["weights"] == s["gradients"] == 110 * 4
    assert s["optimizer"] >= 2 * 110 * 4


def test_shipped_tiny_on_countdown_stops_at_answer():
    from esnb.models import ModelNotAvailable, load_model
    from esnb.tasks import countdown as cd
    from esnb.tasks import get_task

    try:
        model, tok = load_model("tiny", device="cpu")
    except ModelNotAvailable:
        pytest.skip("the tiny model is not in data/tiny yet")
    task = get_task("countdown", prompt_style="compact")
    train, test = cd.load_split()
    eos_before = model.generation_config.eos_token_id
    cfg = GRPORunConfig(steps=2, num_generations=4, learning_rate=1e-4, eval_every=0, seed=0,
                        progress=False)
    res = train_grpo(model, tok, task, train[:8], test[:8], cfg)
    assert res.samples == 8
    assert model.generation_config.eos_token_id == eos_before
    assert res.log["mean_length"].max() <= task.max_new_tokens


# ---------------------------------------------------------------- weight-shift helpers (notebook 09)

def test_layer_types_of_llama_names():
    from esnb.analysis import group_shifts, layer_type

    model, _ = fresh_model()
    kinds = {layer_type(k) for k, _ in model.named_parameters()}
    assert kinds == {"embeddings", "attention", "mlp", "norms"}
    assert layer_type("model.layers.3.self_attn.k_proj.weight") == "attention"
    assert layer_type("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert layer_type("model.layers.3.post_attention_layernorm.weight") == "norms"
    assert layer_type("lm_head.weight") == "embeddings"
    shifts = {k: torch.ones(p.numel()) for k, p in model.named_parameters()}
    groups = group_shifts(shifts)
    assert groups["all"].numel() == sum(p.numel() for p in model.parameters())
    assert sum(groups[k].numel() for k in groups if k != "all") == groups["all"].numel()


def test_matched_random_walk_matches_size_and_is_seeded():
    from esnb.analysis import matched_random_walk

    shifts = {"a": torch.randn(200, 50) * 0.01, "b": torch.randn(3000) * 0.01}
    walk = matched_random_walk(shifts, steps=25, seed=3)
    assert {k: v.shape for k, v in walk.items()} == {k: v.shape for k, v in shifts.items()}
    rms = lambda d: float(torch.cat([v.reshape(-1).double() for v in d.values()]).pow(2).mean().sqrt())
    assert abs(rms(walk) / rms(shifts) - 1) < 0.05
    again = matched_random_walk(shifts, steps=25, seed=3)
    assert all(torch.equal(walk[k], again[k]) for k in walk)
    fixed = matched_random_walk(shifts, steps=16, step_rms=0.002, seed=0)
    assert abs(rms(fixed) - 0.002 * 4) < 0.0005
    with pytest.raises(ValueError, match="steps"):
        matched_random_walk(shifts, steps=0)


def test_displacement_ratio_tells_a_walk_from_a_drift():
    from esnb.analysis import displacement_ratio

    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(20000, generator=gen) * 0.01 for _ in range(16)]
    walk = {"w": torch.stack(steps).sum(0)}
    drift = {"w": steps[0] * 16}
    sizes = [0.01] * 16
    assert abs(displacement_ratio(walk, sizes) - 1) < 0.05
    assert abs(displacement_ratio(drift, sizes) - 4) < 0.2


def test_shift_stats_kurtosis_separates_gaussian_from_sparse():
    from esnb.analysis import shift_stats

    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(50000, generator=gen)
    sparse = torch.zeros(50000)
    sparse[:500] = torch.randn(500, generator=gen) * 10
    stats = shift_stats({"gauss": gauss, "sparse": sparse})
    assert abs(stats.loc["gauss", "excess_kurtosis"]) < 0.2
    assert stats.loc["sparse", "excess_kurtosis"] > 50
    assert stats.loc["sparse", "small_fraction"] > 0.9


def test_token_embedding_shifts_single_out_the_tokens_that_moved():
    from esnb.analysis import token_embedding_shifts
    from esnb.models import load_model

    base, tok = load_model("tiny", device="cpu")
    after, _ = load_model("tiny", device="cpu")
    emb = after.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb.add_(1e-3 * torch.randn(emb.shape, generator=gen))           # every row a little
        emb[tok.convert_tokens_to_ids("<answer>")] += 0.05                  # one row a lot
    table = token_embedding_shifts(base, after, tok, top=3)
    assert list(table.columns) == ["token", "change / median row"] and len(table) == 3
    assert table["token"].iloc[0] == "<answer>" and table["change / median row"].iloc[0] > 20
    assert table["change / median row"].iloc[1] < 2


def test_an_output_folder_that_is_not_empty_is_never_written_over(trained, tmp_path):
    """A finished GRPO run, a model folder or any other files: refused before any training,
    each file left as it was; overwrite=True is the explicit way to reuse a folder."""
    import shutil

    from esnb.models import TINY_DIR

    out = trained[3]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    model_dir = shutil.copytree(TINY_DIR, tmp_path / "a_model")
    cfg = GRPORunConfig(steps=1, num_generations=2, prompts_per_step=2, eval_every=0, progress=False)
    for folder in (out, model_dir):
        model, tok = fresh_model()
        with pytest.raises(FileExistsError, match="not empty"):
            train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=folder)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (model_dir / "log.jsonl").exists()
    model, tok = fresh_model()
    res = train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=model_dir, overwrite=True)
    assert load_result(model_dir).config == res.config


def test_a_run_folder_locked_by_another_process_is_refused(tmp_path):
    import subprocess
    import sys

    from esnb.runlog import RunLocked

    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib; from esnb.runlog import RunLock\n"
        f"RunLock(pathlib.Path({str(tmp_path / 'run')!r})).acquire()\n"
        f"pathlib.Path({str(ready)!r}).write_text('1'); time.sleep(60)\n")])
    try:
        for _ in range(600):
            if ready.exists():
                break
            __import__("time").sleep(0.05)
        model, tok = fresh_model()
        cfg = GRPORunConfig(steps=1, num_generations=2, prompts_per_step=2, eval_every=0, progress=False)
        with pytest.raises(RunLocked):
            train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    """checkpoint_every=2: a run stopped after step 3 leaves TRL's state at step 2 and the log so
    far; resume=True continues it, and it ends with the rows and weights of an uninterrupted run."""
    cfg = GRPORunConfig(steps=4, num_generations=4, learning_rate=1e-3, eval_every=2, checkpoint_every=2,
                        seed=5, progress=False)
    model, tok = fresh_model(2)
    whole = train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=tmp_path / "whole")
    whole_weights = [p.detach().clone() for p in model.parameters()]

    def stop_after_step_3(result):
        if len(result.log_rows) == 3:
            raise KeyboardInterrupt

    model, tok = fresh_model(2)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=tmp_path / "killed", callback=stop_after_step_3)
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-2").is_dir()
    from esnb.runlog import umask

    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "killed" / "checkpoints").rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask()}
    assert len(load_result(tmp_path / "killed").log_rows) == 2  # what the checkpoint holds
    with pytest.raises(FileExistsError, match="resume=True"):  # a killed run is still a run
        train_grpo(*fresh_model(2), Digits(), ITEMS, ITEMS, cfg, output_dir=tmp_path / "killed")
    with pytest.raises(ValueError, match="learning_rate"):  # other settings: refused in one line
        train_grpo(*fresh_model(2), Digits(), ITEMS, ITEMS, GRPORunConfig(**{**cfg.to_dict(), "learning_rate": 2e-3}),
                   output_dir=tmp_path / "killed", resume=True)
    model, tok = fresh_model(7)  # other starting weights: the checkpoint's are loaded
    resumed = train_grpo(model, tok, Digits(), ITEMS, ITEMS, cfg, output_dir=tmp_path / "killed", resume=True)
    keys = ["iteration", "reward_mean", "accuracy", "samples", "loss"]
    assert [[r[k] for k in keys] for r in resumed.log_rows] == [[r[k] for k in keys] for r in whole.log_rows]
    assert [(r["iteration"], r["test_accuracy"]) for r in resumed.eval_rows] == \
        [(r["iteration"], r["test_accuracy"]) for r in whole.eval_rows]
    assert all(torch.equal(a, p.detach()) for a, p in zip(whole_weights, model.parameters()))
    assert load_result(tmp_path / "killed").log["seconds"].is_monotonic_increasing


# ---------------------------------------------------------------- python -m esnb.grpo

_CLI = ["--model", "tiny-base", "--task", "countdown", "--num-generations", "2", "--prompts-per-step", "2",
        "--test-size", "2", "--eval-every", "1", "--checkpoint-every", "1", "--max-new-tokens", "12",
        "--threads", "1", "--no-progress"]


def _cli(argv, capsys):
    from esnb.grpo import main

    code = main(argv)
    return code, capsys.readouterr()


def test_cli_run_resumes_to_the_uninterrupted_runs_rows_and_weights(tmp_path, capsys):
    from esnb.models import load_model

    assert _cli(_CLI + ["--steps", "3", "--output", str(tmp_path / "whole")], capsys)[0] == 0
    assert _cli(_CLI + ["--steps", "2", "--output", str(tmp_path / "cut")], capsys)[0] == 0
    code, out = _cli(["--resume", str(tmp_path / "cut"), "--steps", "3"], capsys)  # settings from config.json
    assert code == 0 and "done: 3 steps" in out.out
    whole, cut = load_result(tmp_path / "whole"), load_result(tmp_path / "cut")
    timing = ("iter_seconds", "seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in cut.log_rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in whole.log_rows]
    assert [r["test_reward"] for r in cut.eval_rows] == [r["test_reward"] for r in whole.eval_rows]
    assert cut.metadata["cli"]["model"] == "tiny-base" and cut.config.steps == 3
    a, _ = load_model(str(tmp_path / "whole" / "final"))
    b, _ = load_model(str(tmp_path / "cut" / "final"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("argv,says", [
    (["--task", "countdown", "--output", "OUT"], "--model"),
    (["--model", "tiny-base", "--task", "countdown", "--output", "OUT", "--lr", "-1"], "--lr"),
    (["--model", "tiny-base", "--task", "countdown", "--output", "OUT", "--num-generations", "1"], "num_generations"),
    (["--model", "tiny-base", "--task", "nope", "--output", "OUT"], "--task"),
    (["--resume", "MODEL"], "--resume"),
    (["--model", "tiny-base", "--task", "countdown", "--output", "MODEL", "--steps", "1"], "not empty"),
])
def test_cli_refuses_bad_input_in_one_line(argv, says, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        _cli(argv, capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert (model_dir / "model.safetensors").read_bytes() == b"weights"
