"""ES fine-tuning of a language model: it learns, it resumes bit-exactly, its CLI and saved models work."""
import json

import pytest
import torch

from esnb.finetune import FinetuneConfig, batch_indices, finetune, load_result, main, rebuild
from esnb.runlog import bit_equal, replay
from esnb.tinylm import build_model, build_tokenizer


class DigitTask:
    """Trivially learnable: reward = fraction of digits among 8 generated characters."""

    name = "digits"
    max_new_tokens = 8
    stop_strings = ()

    def prompt(self, item, tokenizer=None):
        return item["p"]

    def score(self, completion, item):
        r = sum(ch.isdigit() for ch in completion) / 8
        return {"reward": r, "correct": r >= 0.5}


ITEMS = [{"p": f"{i} {3 * i}>"} for i in range(16)]
TRAIN, TEST = ITEMS[:8], ITEMS[8:]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, dtype=torch.float32):
    # a randomly initialised micro Llama: it echoes '>' and writes no digits at first
    return build_model(len(tokenizer), hidden_size=32, layers=1, heads=2, intermediate_size=64, seed=0).to(dtype).eval()


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_config_defaults_are_the_papers():
    c = FinetuneConfig()
    assert (c.es.population_size, c.es.sigma, c.es.alpha, c.train_size, c.batch_size) == (30, 1e-3, 5e-4, 200, None)
    assert c.es.shaping == "zscore" and not c.es.antithetic and c.es.optimizer == "sgd"
    assert FinetuneConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("field,value", [
    ("population_size", 0), ("sigma", 0.0), ("sigma", float("nan")), ("alpha", -1.0), ("iterations", -1),
    ("iterations", 2.5), ("train_size", 0), ("batch_size", 0), ("eval_every", -1), ("checkpoint_every", True),
    ("max_new_tokens", 0), ("gen_batch_size", 0), ("device", "toaster"), ("dtype", "int8"), ("shaping", "best"),
    ("seed", -3), ("save_final", "yes"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig.of(**{field: value})
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneConfig.of(train_size=10, batch_size=11)


def test_batches_are_a_pure_function_of_seed_and_iteration():
    assert batch_indices(0, 3, 10, None) == list(range(10))
    a = batch_indices(0, 3, 100, 16)
    assert a == batch_indices(0, 3, 100, 16) and len(set(a)) == 16
    assert a != batch_indices(0, 4, 100, 16) and a != batch_indices(1, 3, 100, 16)


def test_es_improves_reward_on_a_learnable_task(tokenizer):
    model = _model(tokenizer)
    cfg = FinetuneConfig.of(population_size=16, sigma=0.1, alpha=0.2, iterations=30, train_size=8, eval_every=0)
    res = finetune(model, tokenizer, DigitTask(), TRAIN, TEST, cfg, progress=False)
    log, evals = res.log, res.evals
    assert list(evals.iteration) == [0, 30]
    assert evals.test_reward.iloc[0] == 0.0 and evals.test_reward.iloc[-1] >= 0.8  # held-out items
    assert log.reward_mean.iloc[-5:].mean() > log.reward_mean.iloc[:5].mean() + 0.3
    assert log.samples.iloc[-1] == 30 * 16 * 8  # completions scored: iterations x N x prompts
    assert {"reward_min", "reward_max", "accuracy", "seconds", "update_norm"} <= set(log.columns)
    assert res.accuracy_after > res.accuracy_before


def _run(tokenizer, out, dtype, iterations, stop_after=None, **kw):
    model = _model(tokenizer, dtype)
    cfg = FinetuneConfig.of(population_size=6, sigma=0.1, alpha=0.2, iterations=iterations, train_size=8,
                         batch_size=4, eval_every=2, checkpoint_every=2, seed=7, **kw)

    def crash(result):
        if stop_after is not None and len(result.log_rows) >= stop_after and result.eval_rows[-1]["iteration"] < stop_after:
            raise KeyboardInterrupt  # "killed" after the log line of iteration stop_after-1 was written

    res = finetune(model, tokenizer, DigitTask(), TRAIN, TEST, cfg, output_dir=out, callback=crash,
                   resume=True, progress=False)
    return model, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_killed_run_resumes_bit_identically(tokenizer, tmp_path, dtype):
    ref_model, ref = _run(tokenizer, tmp_path / "ref", dtype, 7)
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, tmp_path / "cut", dtype, 7, stop_after=5)  # last checkpoint: iteration 4
    assert len(open(tmp_path / "cut" / "log.jsonl").readlines()) == 5  # one line past the checkpoint
    model, res = _run(tokenizer, tmp_path / "cut", dtype, 7)
    assert res.resumed_from == 4
    assert bit_equal(model, ref_model)
    assert bit_equal(res.es.params.master, ref.es.params.master)
    drop = ["iter_seconds", "seconds"]
    assert res.log.drop(columns=drop).equals(ref.log.drop(columns=drop))
    assert res.evals.drop(columns=["seconds", "eval_seconds"]).equals(ref.evals.drop(columns=["seconds", "eval_seconds"]))
    # the seed log on disk replays to the same weights, without generating anything
    assert bit_equal(replay(tmp_path / "cut").params.master, ref.es.params.master)
    fresh = _model(tokenizer, dtype)
    (tmp_path / "cut" / "initial.pt").rename(tmp_path / "initial.pt")  # a shipped log has no initial.pt
    rebuild(tmp_path / "cut", fresh)
    assert bit_equal(fresh, ref_model)
    (tmp_path / "initial.pt").rename(tmp_path / "cut" / "initial.pt")
    # and reads back
    back = load_result(tmp_path / "cut")
    assert list(back.log.iteration) == list(range(7)) and list(back.evals.iteration) == [0, 2, 4, 6, 7]
    # resuming a finished run with more iterations continues it
    more_model, more = _run(tokenizer, tmp_path / "cut", dtype, 9)
    assert more.resumed_from == 7 and len(more.log_rows) == 9


def test_resume_refuses_different_settings(tokenizer, tmp_path):
    _run(tokenizer, tmp_path / "run", torch.float32, 2)
    cfg = FinetuneConfig.of(population_size=6, sigma=0.05, alpha=0.2, iterations=4, train_size=8, batch_size=4, seed=7)
    with pytest.raises(ValueError, match="sigma"):
        finetune(_model(tokenizer), tokenizer, DigitTask(), TRAIN, TEST, cfg, output_dir=tmp_path / "run",
                 resume=True, progress=False)
    with pytest.raises(FileExistsError):
        finetune(_model(tokenizer), tokenizer, DigitTask(), TRAIN, TEST, cfg, output_dir=tmp_path / "run",
                 progress=False)


def test_resume_refuses_other_puzzles_or_prompts(tokenizer, tmp_path):
    """A resume that would train on other puzzles (another --data file, another prompt style) or
    evaluate other held-out ones is refused; the same prompts resume, a smaller test_size too."""
    _run(tokenizer, tmp_path / "run", torch.float32, 2)
    cfg = FinetuneConfig.of(population_size=6, sigma=0.1, alpha=0.2, iterations=3, train_size=8, batch_size=4,
                         eval_every=2, checkpoint_every=2, seed=7)
    other_train = [{"p": f"{i} {5 * i}>"} for i in range(8)]
    with pytest.raises(ValueError, match="training prompts differ"):
        finetune(_model(tokenizer), tokenizer, DigitTask(), other_train, TEST, cfg, output_dir=tmp_path / "run",
                 resume=True, progress=False)
    with pytest.raises(ValueError, match="held-out prompts differ"):
        finetune(_model(tokenizer), tokenizer, DigitTask(), TRAIN, TEST[::-1], cfg, output_dir=tmp_path / "run",
                 resume=True, progress=False)
    fewer = FinetuneConfig(**{**cfg.to_dict(), "test_size": 4})
    res = finetune(_model(tokenizer), tokenizer, DigitTask(), TRAIN, TEST, fewer, output_dir=tmp_path / "run",
                   resume=True, progress=False)
    assert res.resumed_from == 2 and len(res.log_rows) == 3


def test_saved_model_reloads_with_identical_logits(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, res = _run(tokenizer, tmp_path / "run", torch.float32, 3)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    ids = tok(["12 36>", "3 9>"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**ids).logits
        b = back(**ids).logits
    assert torch.equal(a, b)
    assert bit_equal(model, back)


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("micro")
    _model(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("argv,needle", [
    (["--population", "0"], "--population"),
    (["--sigma", "abc"], "--sigma"),
    (["--sigma", "-1"], "--sigma"),
    (["--model", "tiny"], "required"),
    (["--model", "tiny", "--task", "countdown", "--output", "X", "--batch-size", "300"], "batch_size"),
    (["--model", "tiny", "--task", "sudoku", "--output", "X"], "--task"),
    (["--resume", "does/not/exist"], "--resume"),
    (["--bogus"], "unrecognized"),
    (["--pop", "3"], "unrecognized"),  # no abbreviations
])
def test_cli_argument_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_cli_runs_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", str(model_dir), "--task", "countdown", "--task-option", "prompt_style=compact",
            "--population", "4", "--sigma", "0.05", "--alpha", "0.02", "--train-size", "4", "--test-size", "4",
            "--max-new-tokens", "6", "--eval-every", "1", "--checkpoint-every", "1", "--no-progress"]
    assert main(base + ["--iterations", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "iteration 1:" in text and "held-out after 2 iterations" in text
    for name in ("config.json", "initial.pt", "log.jsonl", "eval.jsonl", "checkpoint.pt", "log.csv", "eval.csv"):
        assert (out / name).is_file(), name
    assert (out / "final" / "config.json").is_file()
    # a second start into the same directory is refused; --resume continues it
    with pytest.raises(SystemExit):
        main(base + ["--iterations", "2", "--output", str(out)])
    assert main(["--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    assert "resumed from the checkpoint at iteration 2" in capsys.readouterr().out
    assert len(load_result(out).log_rows) == 3
    assert json.loads((out / "config.json").read_text())["finetune"]["iterations"] == 3
    with pytest.raises(SystemExit):
        main(["--resume", str(out), "--sigma", "0.5"])
    assert "--sigma" in capsys.readouterr().err


# ---------------------------------------------------------------- the arithmetic task (notebook 08)


def test_arithmetic_task_scores_without_raising():
    from esnb.tasks import get_task

    task = get_task("arithmetic", ops="+-", n_test=20)
    train, test = task.train_items, task.test_items
    assert len(test) == 20 and len(train) == 100 + 55 - 20
    assert not {(x["a"], x["op"], x["b"]) for x in train} & {(x["a"], x["op"], x["b"]) for x in test}
    item = {"a": 7, "b": 5, "op": "+", "answer": 12}
    assert task.score("12</answer>", item) == {"reward": 1.1, "format_reward": 1.0, "answer_reward": 1.0,
                                                       "correct": True}
    assert task.score(" 12 </answer>", item)["correct"]
    assert task.score("13</answer>", item)["reward"] == pytest.approx(0.1)
    assert task.score("7 + 5 = 12</answer>", item)["correct"]  # working allowed, the last number decides
    assert not task.score("12 - 5 = 7</answer>", item)["correct"]
    assert not task.score("12", item)["correct"]  # the block must be closed
    assert task.score("12", item)["reward"] == 0.0
    for junk in (None, "1" + "0" * 5000 + "</answer>", "١٢</answer>", "", "<answer></answer>", "x" * 100 + " 12</answer>"):
        assert task.score(junk, item)["reward"] <= 0.1
    assert task.prompt(item).startswith("Question: What is 7 + 5?") and task.prompt(item).endswith("<answer>")
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic", ops="/")


def test_arithmetic_split_keeps_commuted_twins_together():
    from esnb.tasks import get_task
    from esnb.tasks.arithmetic import twin_key

    for ops, n_test in (("+", 50), ("+*", 40), ("+-", 20)):
        task = get_task("arithmetic", ops=ops, n_test=n_test)
        train, test = task.train_items, task.test_items
        assert len(test) in (n_test, n_test - 1)
        assert not {twin_key(x) for x in train} & {twin_key(x) for x in test}  # 7 + 5 held out: 5 + 7 too
        assert {(x["a"], x["op"], x["b"]) for x in train} | {(x["a"], x["op"], x["b"]) for x in test} == \
            {(x["a"], x["op"], x["b"]) for x in task._items}
    assert twin_key({"a": 5, "b": 7, "op": "+"}) == twin_key({"a": 7, "b": 5, "op": "+"})
    assert twin_key({"a": 7, "b": 5, "op": "-"}) != twin_key({"a": 5, "b": 7, "op": "-"})


def test_saved_cli_settings_give_back_the_command_that_made_the_run():
    from esnb.finetune import build_parser, cli_arguments, cli_settings, config_from_settings

    argv = ["--model", "tiny-base", "--task", "countdown", "--population", "8", "--antithetic", "--sigma", "0.002",
            "--task-option", "prompt_style=compact", "--paper-faithful", "--no-early-stop", "--seeds", "esnb",
            "--iterations", "3", "--output", "somewhere"]
    ap = build_parser()
    _, settings, _ = cli_settings(ap, ap.parse_args(argv))
    again = ap.parse_args(cli_arguments(settings) + ["--output", "somewhere"])
    assert config_from_settings(vars(again)) == config_from_settings(settings)
    assert config_from_settings(settings).es.population_size == 8
    # a run folder written before the ES settings had their field names
    legacy = {"population": 32, "sigma": 0.002, "antithetic": True, "model": "tiny-base", "task": "countdown"}
    assert cli_arguments(legacy)[:2] == ["--population", "32"]
