"""Solutions to the exercises of notebooks/08_a_real_llm.ipynb.

Each ``exercise_K`` runs its solution at a small size and checks its own answer (pure Python and
esnb's Countdown helpers; no model is loaded). Run them all: ``python solutions/08_a_real_llm.py``.
"""
from __future__ import annotations

GIB = 2**30


def memory_gib(n_params: float, method: str) -> float:
    """Bytes that live for the whole run, in GiB (activations, KV cache and buffers left out).

    * ``"es"`` (esnb's default): bf16 working weights (2 bytes) + float32 master copy (4 bytes);
    * ``"es-paper"`` (the paper's precision): bf16 weights only, perturbed and restored in place;
    * ``"grpo"``: bf16 weights + float32 master + float32 gradients + Adam's two float32 moments
      (2 + 4 + 4 + 8 bytes; a frozen bf16 reference model for the KL term adds 2 more).
    """
    per_param = {"es": 2 + 4, "es-paper": 2, "grpo": 2 + 4 + 4 + 8, "grpo+ref": 2 + 4 + 4 + 8 + 2}[method]
    return n_params * per_param / GIB


def exercise_1() -> None:
    """Implement a piece: the memory budget of a 7B model (Qwen2.5-7B-Instruct, 7.62e9 parameters)."""
    p = 7.62e9
    es, paper, grpo = memory_gib(p, "es"), memory_gib(p, "es-paper"), memory_gib(p, "grpo+ref")
    print(f"ES (bf16 + fp32 master) {es:.1f} GiB, ES as the paper (bf16 only) {paper:.1f} GiB, "
          f"GRPO with Adam and a reference model {grpo:.1f} GiB")
    assert round(paper, 1) == 14.2 and round(es, 1) == 42.6 and round(grpo, 1) == 141.9
    # the paper's precision fits one 24 GiB card; esnb's master copy needs a 48 GiB one; GRPO needs several
    assert paper < 24 < es < 48 < grpo


def my_paper_prompt(numbers: list[int], target: str) -> str:
    """The paper's Countdown prompt, written from the text of its data file's ``context`` field."""
    import numpy as np

    return ("You are a helpful assistant. You first think about the reasoning process in your mind and then "
            f"provide the user with the answer.Using the numbers {np.array(numbers)}, create an equation that "
            f"equals {target}. You can use basic arithmetic operations (+, -, *, /) and each number can only be "
            "used once. Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
            "tags, for example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.\n<think>")


def exercise_2() -> None:
    """Implement a piece: the paper's prompt for any puzzle (numbers printed as a numpy array)."""
    from esnb.tasks.countdown import paper_prompt

    for numbers, target in (([44, 19, 35], "98"), ([3, 78, 34, 2], "12"), ([83, 78, 1, 39], "82"), ([7, 8, 9], "-5")):
        assert my_paper_prompt(numbers, target) == paper_prompt(numbers, target)
    p = my_paper_prompt([3, 78, 34, 2], "12")
    assert "[ 3 78 34  2]" in p and "answer.Using" in p and p.endswith("step by step.\n<think>")
    print(repr(p[120:175]))


def exercise_3() -> None:
    """Predict, then run: a wrong answer, then a right one. Scored as the paper (generation runs on,
    the LAST answer block counts) and with esnb's early stop (generation ended at the first
    ``</answer>``)."""
    from esnb.tasks import get_task

    task = get_task("countdown")
    item = {"numbers": [44, 19, 35], "target": "98"}
    full = "44+19=63</think>\n<answer>44 - 19 + 35</answer> wait, that is 60. <answer>44 + 19 + 35</answer>"
    cut = full[:full.index("</answer>") + len("</answer>")]
    paper, early = task.score(full, item), task.score(cut, item)
    print(f"paper: reward {paper['reward']:.1f} (correct {paper['correct']}); "
          f"early stop: reward {early['reward']:.1f} (correct {early['correct']})")
    # the format regex's '.*?' spans the first block, so both texts count as well formed (1.0 x 0.1)
    assert paper["format_reward"] == early["format_reward"] == 1.0
    assert paper["correct"] and paper["reward"] == 1.1
    assert not early["correct"] and abs(early["reward"] - 0.1) < 1e-12


def decode_steps(population: int = 30, iterations: int = 500, max_new_tokens: int = 1024) -> int:
    """Batched greedy decoding, one batched call per member: the batch runs until its longest row
    stops, so at worst ``max_new_tokens`` steps per member per iteration."""
    return population * iterations * max_new_tokens


def exercise_4() -> None:
    """Change a knob: cap generation at 256 tokens instead of 1,024, or halve the population. Predict the
    factor on the number of decode steps of a Table 1 row (and so on its time at a fixed time per step)."""
    base = decode_steps()
    assert base == 15_360_000
    assert decode_steps(max_new_tokens=256) * 4 == base   # linear in the cap
    assert decode_steps(population=15) * 2 == base        # linear in N (ES's cost is N forward passes)
    # at 0.8 ms per step (a bandwidth bound for Qwen2.5-0.5B, 200 rows, on a ~3.35 TB/s GPU): hours
    print(f"{base:,} steps: {base * 0.8e-3 / 3600:.1f} h at 0.8 ms/step; "
          f"{decode_steps(max_new_tokens=256) * 0.8e-3 / 3600:.1f} h with a 256-token cap")


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("exercise_") and callable(fn):
            print(f"--- {name}")
            fn()
