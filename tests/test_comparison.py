"""esnb.comparison: outcome codes, tuning picks, and a shipped run read back (notebook 06)."""
import json

import pandas as pd
import pytest

from esnb.comparison import (Comparison, decode, final_outcomes, outcome_codes, pick, plan_testing, plan_tuning,
                             tuning_grids, tuning_table)
from esnb.tasks import countdown as cd
from esnb.tasks import get_task

PUZZLE = {"numbers": [3, 5], "target": 8}


def test_outcome_codes_separate_the_tags_from_the_arithmetic():
    texts = ["</think>\n<answer>3 + 5</answer>",   # right, in tags: 1 + 2 + 4
             "</think>\n<answer>3 * 5</answer>",   # wrong, in tags: 2
             "</think>\nAnswer: 5 + 3",            # right only ignoring the format: 4
             None]                                  # not text: nothing
    codes = outcome_codes(texts, [PUZZLE] * 4)
    assert codes == "7240"
    d = decode(codes)
    assert d["accuracy"].tolist() == [True, False, False, False]
    assert d["answers in tags"].tolist() == [True, True, False, False]
    assert d["accuracy ignoring format"].tolist() == [True, False, True, False]


def test_answers_in_tags_need_a_closed_block():
    texts = ["a<answer>1</answer>b<answer>2</answer>", "<answer>open", None]
    assert cd.format_outcomes(texts, [PUZZLE] * 3)["answers in tags"] == [True, False, False]
    assert outcome_codes(texts, [PUZZLE] * 3) == "200"


def test_pick_breaks_ties_by_reward_then_the_smaller_setting():
    grid = pd.DataFrame({"accuracy": [0.3, 0.3, 0.3, 0.1], "mean reward": [0.40, 0.45 + 1e-12, 0.45, 0.9]},
                        index=pd.Index([1e-5, 3e-5, 1e-4, 3e-4], name="lr"))
    assert pick(grid) == 3e-5   # 3e-5 and 1e-4 tie after rounding: the smaller wins


def test_plans_name_every_run_once():
    tune = plan_tuning([0.001, 0.002], [0.004], [1e-5, 3e-5], [100, 101], val=[PUZZLE])
    assert len(tune) == 2 * (2 * 1 + 2)
    assert tune["tune-es-sigma0.002-alpha0.004-seed101"] == (
        "ES", dict(sigma=0.002, alpha=0.004, run_seed=101, items=[PUZZLE], split="val", eval_every=0))
    test = plan_testing(0.002, 0.004, 1e-5, [0, 1], [PUZZLE], es_every=1, grpo_every=4)
    assert sorted(test) == ["es-seed0", "es-seed1", "grpo-seed0", "grpo-seed1"]
    assert test["grpo-seed1"][1]["eval_every"] == 4


def test_unequal_budgets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unequal budgets"):
        Comparison("tiny", tmp_path, None, [PUZZLE], es_population=4, es_batch=2, es_iterations=2,
                   grpo_generations=4, grpo_prompts=2, grpo_steps=3)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """One ES and one GRPO tuning run of 16 samples each on tiny, shipped into a folder."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train_all, test_all = cd.load_split()
    train, val = train_all[:4], train_all[4:8]
    comp = Comparison("tiny", tmp_path_factory.mktemp("runs"), get_task("countdown", prompt_style="compact"), train,
                      es_population=4, es_batch=2, es_iterations=2, grpo_generations=4, grpo_prompts=2, grpo_steps=2)
    plan = plan_tuning([0.002], [0.004], [1e-5], [100], val)
    comp.make_runs(plan, verbose=False)
    torch.set_num_threads(before)
    return comp, plan, val


def test_shipped_runs_read_back_with_their_outcomes(shipped):
    comp, plan, val = shipped
    runs = comp.load_plan(plan)
    for name, r in runs.items():
        assert sorted(p.name for p in r.run_dir.iterdir()) == ["config.json", "eval.jsonl", "log.jsonl",
                                                              "outcomes.jsonl"]
        assert [o["iteration"] for o in r.outcomes][0] == 0 and len(r.outcomes) == 2
        assert all(len(o["codes"]) == len(val) and o["split"] == "val" for o in r.outcomes)
    table = tuning_table(runs, plan)
    assert table["method"].tolist() == ["ES", "GRPO"]
    es_grid, grpo_grid = tuning_grids(table)
    assert pick(es_grid) == (0.002, 0.004) and pick(grpo_grid) == 1e-5
    # the mean reward the grid ranks by is the run's own last evaluation
    es_name = next(n for n in plan if "-es-" in n)
    assert table["mean reward"].iloc[0] == runs[es_name].eval_rows[-1]["test_reward"]
    out = final_outcomes({n: r for n, r in runs.items() if n == es_name})
    assert out["accuracy"].shape == (1, len(val))


def test_a_run_made_with_other_settings_is_refused(shipped):
    comp, plan, _ = shipped
    name, (method, kw) = next(iter(plan.items()))
    with pytest.raises(ValueError, match="other settings.*alpha"):
        comp.load_run(name, method, {**kw, "alpha": 0.008})
    other = Comparison("tiny-base", comp.runs_dir, comp.task, comp.train, es_population=4, es_batch=2,
                       es_iterations=2, grpo_generations=4, grpo_prompts=2, grpo_steps=2)
    with pytest.raises(ValueError, match="model or split"):
        other.load_run(name, method, kw)
    with pytest.raises(FileNotFoundError, match="retrain"):
        comp.load_run("no-such-run", method, kw)
    meta = json.loads((comp.runs_dir / name / "config.json").read_text())
    assert meta["model_name"] == "tiny" and meta["split"] == "val"
