"""Conciseness: prompts, reward, correctness and the KL estimator (on the tiny model)."""
import copy

import pytest
import torch

from esnb.tasks import Task, get_task
from esnb.tasks import conciseness as cc


def test_prompts_and_reward():
    assert [p["prompt"] for p in cc.TRAIN_PROMPTS] == [
        "Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
    assert [p["target"] for p in cc.TRAIN_PROMPTS] == ["8", "No"]
    assert len(cc.HELDOUT_PROMPTS) == 8
    assert not {p["prompt"] for p in cc.TRAIN_PROMPTS} & {p["prompt"] for p in cc.HELDOUT_PROMPTS}
    assert cc.reward("8", "8") == 0.0
    assert cc.reward("The answer is 8.", "8") == -15.0
    assert cc.reward("", "No") == -2.0
    assert cc.reward(None, "No") == -2.0


def test_task_interface_and_correctness():
    task = get_task("conciseness")
    assert isinstance(task, Task) and task.name == "conciseness"
    item = task.train_items[1]
    assert task.prompt(item) == item["prompt"]
    assert task.score(" No.", item) == {"reward": -2.0, "correct": True, "length": 4}
    hacked = task.score("X", task.train_items[0])        # right length, wrong answer
    assert hacked["reward"] == 0.0 and hacked["correct"] is False
    with pytest.raises(ValueError, match="tokenizer"):
        get_task("conciseness", chat=True).prompt(item, None)


def test_kl_is_zero_for_the_same_model_and_positive_after_a_change():
    from esnb.models import load_model

    model, tok = load_model("tiny", device="cpu")
    prompts = ["12 5 3>20<think>", "7 8 9>24<think>"]
    completions = ["12+5=17,17+3=20</think>\n<answer>12+5+3</answer>", "7+8=15"]
    same = cc.kl_to_base(model, model, tok, prompts, completions)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["tokens"] > 20
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = cc.kl_to_base(moved, model, tok, prompts, completions)
    assert kl["kl"] > 1e-4 and len(kl["per_prompt"]) == 2 and all(x >= 0 for x in kl["per_prompt"])
    # batching must not change the estimate
    kl1 = cc.kl_to_base(moved, model, tok, prompts, completions, batch_size=1)
    assert kl1["kl"] == pytest.approx(kl["kl"], rel=1e-4)
