"""Solutions to the exercises of notebooks/04_tiny_language_model.ipynb.

Each ``exercise_K`` runs the solution at a small size and checks its own answer (tests/test_solutions.py
runs them all). Run them by hand with ``python solutions/04_tiny_language_model.py``.
"""
from __future__ import annotations

import re

from esnb.tasks import countdown as cd

NUMBERS, TARGET = [1, 12, 38], "51"


def exercise_1() -> None:
    """The reward on tricky completions: the LAST answer counts; every number exactly once; the
    prompt's <think> counts as the opening of the think block."""
    tricky = {  # the notebook's keys c1-c4, in the order of its list
        "c1": "12+38=50,50+1=51</think>\n<answer>12</answer>\n<answer>(12+38)+1</answer>",  # two answers, the last right
        "c2": "12+38=50,50+1=51</think>\n<answer>(12+38)+1</answer>\n<answer>12</answer>",  # two answers, the last wrong
        "c3": "x</think>\n<answer>(38+12)/1+1</answer>",                                    # the number 1 used twice
        "c4": "<answer>(12+38)+1</answer>",                                                   # no think block closed
    }
    got = {k: cd.reward(v, NUMBERS, TARGET) for k, v in tricky.items()}
    for k, r in got.items():
        print(f"{k:4s} {r}")
    assert got["c1"]["answer_reward"] == 1.0        # the last answer block is read
    assert got["c2"]["answer_reward"] == 0.0        # ... even when an earlier one was right
    assert got["c3"]["answer_reward"] == 0.0        # 1 appears twice, though the value is 51
    assert got["c4"]["format_reward"] == 0.5        # an answer block, but no closed think block
    assert abs(got["c4"]["reward"] - 1.05) < 1e-12  # 0.1 * 0.5 + 1.0


def uses_each_number_once(expression: str, numbers: list[int]) -> bool:
    """True when the numbers written in ``expression`` are exactly ``numbers``, each once (any order)."""
    return sorted(int(x) for x in re.findall(r"\d+", expression)) == sorted(int(n) for n in numbers)


def exercise_2() -> None:
    """uses_each_number_once agrees with the reward: a correct answer always passes it."""
    cases = ["(12+38)+1", "12+38+1+0", "(38+12)/1+1", "1+12", "38-12+1*1", "51", "12*1+38+1"]
    for expr in cases:
        completion = f"x</think>\n<answer>{expr}</answer>"
        correct = cd.reward(completion, NUMBERS, TARGET)["answer_reward"] > 0
        mine = uses_each_number_once(expr, NUMBERS)
        print(f"{expr:12s} uses each once: {mine!s:5s} correct: {correct}")
        if correct:
            assert mine, expr
    assert uses_each_number_once("(12+38)+1", NUMBERS) and not uses_each_number_once("12+38", NUMBERS)
    assert not uses_each_number_once("(38+12)/1+1", NUMBERS)


def exercise_3() -> None:
    """A trace is ~57 characters but only ~30 tokens (each tag is one token): 24 new tokens cut most
    traces before their answer block closes, and accuracy falls with it."""
    from esnb.generation import generate
    from esnb.models import load_model
    from esnb.tasks import get_task

    model, tok = load_model("tiny", device="cpu")
    task = get_task("countdown", prompt_style="compact")
    items = cd.load_split()[1][:16]
    prompts = [task.prompt(x) for x in items]
    share = {}
    for budget in (task.max_new_tokens, 32, 24):
        out = generate(model, tok, prompts, max_new_tokens=budget, stop_strings=task.stop_strings, threads=1)
        share[budget] = (sum("</answer>" in c for c in out) / len(out),
                         sum(task.score(c, x)["correct"] for c, x in zip(out, items)) / len(out))
        print(f"max_new_tokens={budget}: {100 * share[budget][0]:.0f}% with an answer block, "
              f"accuracy {100 * share[budget][1]:.0f}%")
    full = share[task.max_new_tokens]
    assert full[0] == 1.0 and share[32][0] >= 0.5      # 32 tokens: most traces still fit (tags are one token each)
    assert share[24][0] < 0.5 and share[24][1] < full[1]


if __name__ == "__main__":
    for name in ("exercise_1", "exercise_2", "exercise_3"):
        print(f"--- {name}")
        globals()[name]()
