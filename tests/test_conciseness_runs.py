"""conciseness_runs: notebook 07's runs written small, read back, and an ES run rebuilt from its files."""
import json

import numpy as np
import pytest

from esnb import conciseness_runs as cr

SMALL = cr.Settings(model="tiny", max_new_tokens=8, heldout=8, es_population=4, es_iterations=2, grpo_generations=2,
                    grpo_steps=2, es_sigma=0.05, es_alpha=0.02, grpo_lr=1e-3, threads=1)


def test_run_names_round_trip():
    assert cr.run_name("ES", 2) == "es-seed2" and cr.run_name("GRPO", 0, 0.05) == "grpo-beta0.05-seed0"
    assert cr.parse_run_name("grpo-beta0.2-seed1") == ("GRPO", 0.2, 1)
    assert cr.parse_run_name("es-seed3") == ("ES", None, 3)
    with pytest.raises(ValueError, match="name"):
        cr.parse_run_name("ppo-seed0")


def test_runs_are_written_small_and_an_es_run_rebuilds_to_its_last_evaluation(tmp_path):
    from esnb.finetune import rebuild
    from esnb.models import load_model

    base, tok = load_model("tiny", device="cpu", dtype="fp32")
    es_dir = cr.train_run(SMALL, "es-seed0", tmp_path, base=base, tokenizer=tok)
    g_dir = cr.train_run(SMALL, "grpo-beta0-seed0", tmp_path, base=base, tokenizer=tok, summarize_against=es_dir)
    assert sorted(p.name for p in es_dir.iterdir()) == ["config.json", "eval.jsonl", "log.jsonl", "trajectory.json"]
    assert {"weight_change.json", "weight_change_sample.npy", "trajectory.json"} <= {p.name for p in g_dir.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no staging folder left
    es, g = cr.load_run(es_dir), cr.load_run(g_dir)
    assert es["settings"] == json.loads(json.dumps(SMALL.__dict__)) and g["beta"] == 0.0
    assert list(es["traj"]["iteration"]) == [0, 1, 2] and list(g["traj"]["iteration"]) == [0, 1, 2]
    assert len(es["traj"]["answers"].iloc[0]) == 8 and len(g["traj"]["kl_exact_sum"].iloc[-1]) == 8
    # both start from the same base model, whose KL to itself is 0
    assert es["traj"]["answers"].iloc[0] == g["traj"]["answers"].iloc[0] and max(es["traj"]["kl_exact"].iloc[0]) == 0
    assert "update_rms" in g["log"] and len(g["log"]) == 2
    # the ES run's weights, rebuilt from its seed log, give its last evaluation again
    model, _ = load_model("tiny", device="cpu", dtype="fp32")
    rebuild(es_dir, model)
    task = cr._task(SMALL)
    again = cr.evaluation_row(model, base, tok, task, task.test_items, SMALL.max_new_tokens)
    last = es["traj"].iloc[-1]
    assert again["answers"] == last["answers"] and again["reward"] == last["reward"]
    assert np.allclose(again["kl_exact"], last["kl_exact"], rtol=1e-5, atol=1e-9)
