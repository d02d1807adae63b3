"""Solutions to the exercises of notebooks/06_es_vs_grpo.ipynb (each checks its own answer)."""
from __future__ import annotations

import math

import numpy as np

from esnb import stats


def mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts only."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def exercise_1() -> None:
    # both 10, only A 3, only B 12, neither 15: only the 15 discordant puzzles carry evidence
    # (a puzzle both solve, or neither, says nothing about which method is better)
    p = mcnemar_by_hand(3, 12)
    assert p == 2 * (1 + 15 + 105 + 455) / 2**15  # = 0.03515625
    assert abs(p - stats.mcnemar_exact(3, 12)) < 1e-15
    # concordant puzzles never enter; a single discordant pair is no evidence at all
    assert mcnemar_by_hand(0, 1) == 1.0
    print(f"exercise 1: p = {p:.5f} (only the 3 + 12 discordant puzzles count)")


def exercise_2() -> None:
    # SE = sqrt(p (1 - p) / n): on the 256 puzzles 05 never scored, at p = 0.30; quadrupling the
    # puzzles halves it; SE 0.01 at p = 0.30 takes n = 0.3 * 0.7 / 0.01**2 = 2,100 puzzles
    se256 = stats.binomial_se(0.30, 256)
    assert abs(se256 - math.sqrt(0.3 * 0.7 / 256)) < 1e-12
    assert abs(stats.binomial_se(0.30, 4 * 256) - se256 / 2) < 1e-12
    n = math.ceil(0.30 * 0.70 / 0.01**2 - 1e-9)
    assert n == 2100 and stats.binomial_se(0.30, n) <= 0.01 + 1e-12
    # p (1 - p) grows towards p = 0.5: the SE at a starting accuracy near 0.1 understates the
    # noise of an evaluation at the compared accuracy (0.25-0.30) by about a third
    assert stats.binomial_se(0.1, 256) < 0.7 * se256
    print(f"exercise 2: 256 puzzles -> SE {se256:.4f}; 1,024 -> {se256 / 2:.4f}; SE 0.01 needs {n:,} puzzles")


def exercise_3() -> None:
    # the more two methods agree puzzle by puzzle, the fewer discordant pairs and the narrower the
    # paired interval; the unpaired interval ignores the agreement and stays wide
    widths, discordant = {}, {}
    for agreement in (0.5, 0.8, 0.95):
        rng = np.random.default_rng(0)
        a = rng.random(512) < 0.25
        b = np.where(rng.random(512) < agreement, a, rng.random(512) < 0.25)
        t = stats.paired_counts(a, b)
        ci = stats.paired_bootstrap(a, b, n_boot=2000, seed=0)
        widths[agreement], discordant[agreement] = ci["high"] - ci["low"], t["only_a"] + t["only_b"]
    unpaired = 2 * 1.96 * math.sqrt(2) * stats.binomial_se(0.25, 512)
    assert discordant[0.5] > discordant[0.8] > discordant[0.95]
    assert widths[0.5] > widths[0.8] > widths[0.95]
    assert all(w < unpaired for w in widths.values())
    print(f"exercise 3: paired widths {', '.join(f'{k}: {v:.3f}' for k, v in widths.items())}; unpaired {unpaired:.3f}")


def budget_ways(total: int, fixed: int) -> list[tuple[int, int]]:
    """Every (updates, prompts per update) with updates * prompts * fixed == total."""
    per = total // fixed
    assert per * fixed == total, "the budget must be a multiple of the fixed factor"
    return [(per // p, p) for p in range(per, 0, -1) if per % p == 0]


def exercise_4() -> None:
    # ES: an iteration costs N x batch samples (N = 32, even for mirrored pairs);
    # GRPO: a step costs prompts x G samples (G = 8)
    budget, n_es, g = 4096, 32, 8
    es_ways, grpo_ways = budget_ways(budget, n_es), budget_ways(budget, g)
    assert es_ways == [(1, 128), (2, 64), (4, 32), (8, 16), (16, 8), (32, 4), (64, 2), (128, 1)]
    # GRPO with G = 8 and at least 8 steps: steps x prompts = 512
    at_least_8 = [(u, p) for u, p in grpo_ways if u >= 8]
    assert at_least_8 == [(8, 64), (16, 32), (32, 16), (64, 8), (128, 4), (256, 2), (512, 1)]
    # the notebook's 16 prompts per update: 8 ES iterations, 32 GRPO steps; with 8 prompts per update
    assert (dict((p, u) for u, p in es_ways)[16], dict((p, u) for u, p in grpo_ways)[16]) == (8, 32)
    es_iters, grpo_steps = dict((p, u) for u, p in es_ways)[8], dict((p, u) for u, p in grpo_ways)[8]
    assert (es_iters, grpo_steps) == (16, 64)
    assert es_iters * n_es * 8 == grpo_steps * 8 * g == budget
    # the old comparison: ES 8 x 32 x 16 = 4,096 against GRPO 60 x 8 x 8 = 3,840
    old_gap = 8 * 32 * 16 - 60 * 8 * 8
    assert old_gap == 256 and abs(old_gap / (60 * 8 * 8) - 1 / 15) < 1e-12  # ES had 6.7% more than GRPO
    print(f"exercise 4: ES ways {es_ways}; GRPO ways with >= 8 steps: {at_least_8}; at 8 prompts per update "
          f"ES makes {es_iters} updates, GRPO {grpo_steps}; the old budgets differed by {old_gap} samples "
          f"({old_gap / (60 * 8 * 8):.1%} of GRPO's)")


if __name__ == "__main__":
    for fn in (exercise_1, exercise_2, exercise_3, exercise_4):
        fn()
