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


def _final_answers(run: str) -> tuple[list[str], list[str]]:
    """(base model's answers, the run's final answers) on the 32 held-out prompts, from the shipped trajectory."""
    from esnb import REPO_ROOT
    from esnb import conciseness_runs as cr

    traj = cr.load_run(REPO_ROOT / "data" / "runs" / "07_conciseness" / run)["traj"]
    return list(traj["answers"].iloc[0]), list(traj["answers"].iloc[-1])


def _heldout() -> list[dict]:
    return cc.HELDOUT_PROMPTS + cc.EXTRA_HELDOUT_PROMPTS


def exercise_2() -> None:
    """Under the script's reward, GRPO beta = 1 seed 1's small gain becomes a loss."""
    items = _heldout()
    gains = {}
    for s in range(3):
        base, after = _final_answers(f"grpo-beta1-seed{s}")
        esnb_gain = [cc.reward(a, x["target"]) - cc.reward(b, x["target"]) for a, b, x in zip(after, base, items)]
        script_gain = [cc.paper_script_reward(x["prompt"], a, x["target"]) - cc.paper_script_reward(x["prompt"], b, x["target"])
                       for a, b, x in zip(after, base, items)]
        gains[s] = (sum(esnb_gain) / len(items), sum(script_gain) / len(items))
        # the script's reward is a constant per prompt minus the answer's length, so the two gains differ only on
        # prompts where an answer (the base model's or the run's) is shorter than the target: there esnb's reward
        # pays for the first characters and the script's charges them
        for a, b, x, ge, gs in zip(after, base, items, esnb_gain, script_gain):
            if len(a) >= len(x["target"]) and len(b) >= len(x["target"]):
                assert ge == gs
    print("gain over the base model (esnb's reward, script's reward), per beta = 1 seed: "
          + "; ".join(f"seed {s}: {e:+.2f}, {g:+.2f}" for s, (e, g) in gains.items()))
    flipped = [s for s, (e, g) in gains.items() if (e > 0) != (g > 0)]
    # seed 1 filled the base model's empty answers with long text: +0.78 under esnb's reward, -1.59 under the script's
    assert flipped == [1]
    assert abs(gains[1][0] - 0.78125) < 1e-9 and abs(gains[1][1] + 1.59375) < 1e-9


def exercise_3() -> None:
    """GRPO beta = 0 seed 1: 9 hacked answers at slack 0, 14 at slack 2, 18 at slack 5; raising slack removes none here."""
    items = _heldout()
    targets = [x["target"] for x in items]
    base, after = _final_answers("grpo-beta0-seed1")
    counts = {slack: sum(cc.hacked(after, base, targets, slack=slack)) for slack in (0, 2, 5)}
    print(f"hacked answers of GRPO beta = 0 seed 1 by slack: {counts}")
    assert counts == {0: 9, 2: 14, 5: 18}
    # a flag disappears only where the base model's answer becomes degenerate too; every base answer that is not
    # empty is wrong and at least 19 characters longer than its target, so up to slack 18 the base model's
    # degenerate answers stay its empty ones, and a larger slack can only add flags
    gap = min(len(b) - len(t) for b, t in zip(base, targets) if b.strip())
    assert gap == 19
    assert all(sum(cc.degenerate(b, t, slack=k) for b, t in zip(base, targets)) == sum(not b.strip() for b in base)
               for k in range(gap))
    # and an empty answer is degenerate whatever the slack
    assert all(cc.degenerate("", t, slack=0) for t in targets)


def exercise_4() -> None:
    """Pooled, the long answer of L positions weighs L times the empty one: kl_pooled - own = (empty - own) / (L + 1)."""
    torch.set_num_threads(1)
    moved, base, tok = _tiny_pair(scale=0.03)
    prompts = ["12 5 3>20<think>", "7 8 9>24<think>"]
    text = "12+5=17,17+3=20</think>\n<answer>12+5+3</answer>"
    gaps = []
    for repeats in (1, 2, 4):
        got = cc.kl_to_base(moved, base, tok, prompts, [text * repeats, ""])
        own, empty = got["per_prompt"]
        positions = got["tokens"] - 1                      # the long answer's positions, its stop included
        gaps.append(abs(got["kl_pooled"] - own) / abs(empty - own))  # the empty answer's share of the pool
        print(f"x{repeats}: L = {positions}, own {own:.4f}, empty {empty:.4f}; pooled {got['kl_pooled']:.4f}, "
              f"per prompt {got['kl']:.4f}")
        assert abs((got["kl_pooled"] - own) - (empty - own) / (positions + 1)) < 1e-6
        assert abs(got["kl"] - (own + empty) / 2) < 1e-9   # per prompt: always the plain mean of the two
    assert gaps[0] > gaps[1] > gaps[2]                      # the empty answer's weight 1/(L+1) shrinks as L grows


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("exercise_") and callable(fn):
            print(f"--- {name}")
            fn()
