"""Solutions to the exercises of notebooks/07_conciseness_and_reward_hacking.ipynb.

Each ``exercise_K`` runs at a small size (the tiny model, not SmolLM2) and checks its own answer.
"""
from __future__ import annotations

import copy
import math

import torch

from esnb.tasks import conciseness as cc

PROMPT = "Solve: 3 + 5 ="


def _tiny_pair(scale: float = 0.05):
    """The tiny model and a perturbed copy of it (the "fine-tuned" model)."""
    from esnb.models import load_model

    base, tok = load_model("tiny", device="cpu")
    moved = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return moved, base, tok


def stop_decision_kl(logits_model: torch.Tensor, logits_base: torch.Tensor, eos_id: int) -> tuple[float, float]:
    """(exact KL over the vocabulary, r - log r - 1 estimate) of the decision to stop now."""
    lp = torch.log_softmax(logits_model.double(), -1)
    lq = torch.log_softmax(logits_base.double(), -1)
    exact = float((lp.exp() * (lp - lq)).sum())
    log_r = float(lq[eos_id] - lp[eos_id])
    return exact, math.exp(log_r) - log_r - 1


def exercise_1() -> None:
    """The KL of an empty answer is the KL of its one decision, at the last prompt position."""
    torch.set_num_threads(1)
    moved, base, tok = _tiny_pair()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        exact, estimate = stop_decision_kl(moved(ids).logits[0, -1], base(ids).logits[0, -1], tok.eos_token_id)
    got = cc.kl_to_base(moved, base, tok, [PROMPT], [""])
    print(f"stop decision: exact KL {exact:.5f} (kl_to_base {got['kl_exact']:.5f}), "
          f"estimate {estimate:.5f} (kl_to_base {got['kl']:.5f})")
    assert exact > 0 and got["tokens"] == 1 and got["stops"] == 1
    assert abs(exact - got["kl_exact"]) < 1e-4 * max(1.0, exact)
    assert abs(estimate - got["kl"]) < 1e-4 * max(1.0, estimate)


def exercise_2() -> None:
    """Under the script's reward (prompt + completion), the empty completion is the best one."""
    target = "8"
    rewards = {n: cc.paper_script_reward(PROMPT, "8" * n, target) for n in range(21)}
    best = max(rewards, key=rewards.get)
    print(f"best completion length under the script's reward: {best} (reward {rewards[best]:.0f}); "
          f"the completion-only reward of that answer: {cc.reward('', target):.0f}")
    # the prompt alone is 14 characters, 13 more than the target: nothing can do better than adding nothing
    assert best == 0 and rewards[0] == -float(len(PROMPT) - len(target))
    # under that reward both methods would be taught to stop at once: the "hack" is the optimum


def exercise_3() -> None:
    """slack=0 keeps only degenerate answers of exactly the target's length; empty ones stay."""
    base = ["13\n\nThis is a classic example", "", "\n\nThe answer is no."]
    targets = ["13", "Paris", "No"]
    after = ["12.", "", ""]        # wrong, right length +1; empty (like the base); newly empty
    loose = cc.hacked(after, base, targets, slack=2)
    strict = cc.hacked(after, base, targets, slack=0)
    print(f"slack 2: {loose}; slack 0: {strict}")
    assert loose == [True, False, True]
    assert strict == [False, False, True]   # "12." is 3 characters against 2: no longer flagged
    # an empty answer is degenerate whatever the slack (it is never the answer), so it stays
    assert all(cc.degenerate("", t, slack=0) for t in targets)


def exercise_4() -> None:
    """Pooled over tokens, one long answer drowns three empty ones; per prompt, it does not."""
    torch.set_num_threads(1)
    moved, base, tok = _tiny_pair(scale=0.03)
    prompts = ["12 5 3>20<think>", "7 8 9>24<think>", "2 4 6>12<think>", "9 3 1>27<think>"]
    long = "12+5=17,17+3=20</think>\n<answer>12+5+3</answer>" * 2
    got = cc.kl_to_base(moved, base, tok, prompts, [long, "", "", ""])
    print(f"per-token KL of the long answer {got['per_prompt'][0]:.4f}, of the empty ones "
          f"{[round(x, 4) for x in got['per_prompt'][1:]]}; pooled {got['kl_pooled']:.4f}, per prompt {got['kl']:.4f}")
    assert abs(got["kl"] - sum(got["per_prompt"]) / 4) < 1e-9
    # the pooled value sits near the long answer's own per-token KL (it has most of the tokens)
    assert abs(got["kl_pooled"] - got["per_prompt"][0]) < abs(got["kl"] - got["per_prompt"][0])


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("exercise_") and callable(fn):
            print(f"--- {name}")
            fn()
