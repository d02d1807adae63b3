"""Solutions to the exercises of notebooks/11_questions_reviewers_asked.ipynb.

Each ``exercise_K`` runs the solution at a small size (vectors, random weights and, in exercise 3,
the tiny model's weights without generating anything; a few seconds in all) and checks its own answer (tests/test_solutions.py runs them all).
Run them by hand with ``python solutions/11_questions_reviewers_asked.py``.
"""
from __future__ import annotations

import math

import torch

from esnb.analysis import es_step_norm
from esnb.models import load_model
from esnb.es import ES, ESConfig, iteration_seeds
from esnb.noise import noise_like
from esnb.zeroth_order import mezo_config


def reward(theta: torch.Tensor) -> float:
    """The notebook's reward on a vector (to maximise)."""
    return float(-((theta - 1.0) ** 2).sum() + torch.sin(3 * theta).sum())


def mezo_step(theta: torch.Tensor, reward, lr: float, sigma: float, seeds: list[int]) -> torch.Tensor:
    """One MeZO step averaging the projected gradients of the pairs of ``seeds``; returns the new theta."""
    g = torch.zeros_like(theta)
    for s in seeds:
        eps = noise_like(theta, s, 0)            # regenerated from its seed, never stored
        g += (reward(theta + sigma * eps) - reward(theta - sigma * eps)) / (2 * sigma) * eps
    return theta + lr * g / len(seeds)


def exercise_1() -> None:
    """MeZO with n pairs equals ES(mezo_config(lr, sigma, pairs=n)) step for step (measured:
    max difference 7.9e-16 over 10 steps, n = 3), and ``lr`` does not change with n: raw ES with
    N = 2n members steps ``alpha/(2n) sum_k (R+_k - R-_k) eps_k = alpha * (1/n) sum_k (R+_k - R-_k)/2 eps_k``,
    MeZO ``lr * (1/n) sum_k (R+_k - R-_k)/(2 sigma) eps_k``: equal at alpha = lr / sigma for every n."""
    lr, sigma, n, seed = 0.01, 0.05, 3, 4
    theta0 = torch.linspace(-1, 1, 10, dtype=torch.float64)
    es = ES(theta0.clone(), mezo_config(lr, sigma, pairs=n, seed=seed))
    theta = theta0.clone()
    for t in range(10):
        es.step(lambda pop: torch.tensor([reward(x) for x in pop], dtype=torch.float64))
        theta = mezo_step(theta, reward, lr, sigma, iteration_seeds(seed, t, n))
    diff = float((es.theta - theta).abs().max())
    assert diff < 1e-12, diff
    assert reward(theta) > reward(theta0)
    assert math.isclose(es.config.alpha, lr / sigma)
    print(f"exercise 1: max |ES - MeZO by hand| over 10 steps with {n} pairs = {diff:.1e}")


def exercise_2() -> None:
    """One z-scored pair keeps only the sign: rewards [1.0, 0.99] and [1.0, 0.0] give the SAME
    update norm, a tie gives 0. Raw rewards give norms in the ratio 0.01 : 1 : 0.

    When a pair's difference usually rests on one or two flipped puzzles of its batch (section 5:
    about 92% of the per-puzzle answer differences are 0), z-scoring takes a full step on such a
    difference, whose sign is mostly the luck of the batch; raw rewards step in proportion to it
    (one flipped answer out of 16 prompts moves the mean reward by about 1/16, a sixteenth of the
    step a difference of 1 would give). So raw rewards put less weight on the noisiest pairs, at the
    price of a learning rate tied to the reward scale; z-scoring makes every non-tied pair count
    the same. Neither helps on tied pairs: both step zero."""
    pair_rewards = [[1.0, 0.99], [1.0, 0.0], [0.4, 0.4]]
    norms = {}
    for shaping in ("zscore", "raw"):
        norms[shaping] = []
        for r in pair_rewards:
            es = ES(torch.zeros(1000, dtype=torch.float64),
                    ESConfig(population_size=2, antithetic=True, sigma=0.01, alpha=0.1, shaping=shaping))
            norms[shaping].append(es.tell(r)["update_norm"])
    z, raw = norms["zscore"], norms["raw"]
    assert math.isclose(z[0], z[1], rel_tol=1e-4) and z[2] == 0.0  # eps=1e-8 in the z-score: 0.999998
    assert math.isclose(raw[0] / raw[1], 0.01, rel_tol=1e-6) and raw[2] == 0.0
    print(f"exercise 2: z-score norms {[round(x, 3) for x in z]}, raw {[round(x, 4) for x in raw]}")


def exercise_3() -> None:
    """bf16 keeps 8 significant bits: near w the gap is 2**(floor(log2|w|) - 7), and an update
    below half of it rounds away. For w ~ N(0, 0.05^2) the predicted shares left unchanged by one
    addition agree with torch to within 0.01 (measured: 0.937, 0.535 and 0.0 for
    u = 1e-5, 1e-4, 1e-3: no weight of this spread has a gap above 2e-3).

    Section 4's column: a run there makes 8 steps, each moving a weight by a Gaussian amount of
    spread about alpha * 1.15 / sqrt(N) = 8.1e-4 (alpha = 0.002, N = 8), between the 1e-4 and 1e-3
    rows above. Simulated on tiny-base's own bf16 weights, 8 such steps leave 3.2% of them unchanged,
    both when rounding to bf16 after every step (the paper's engine) and with a float32 master copy
    (esnb's; the two differ by less than 0.1 point), against 2.98% and 2.99% measured in section 4
    (a share of a few percent in both: most steps are larger than half a weight's bf16 gap, and a
    weight stays unchanged only where every step, or their sum, is smaller)."""
    w = (torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    wf = w.float()
    gap = torch.exp2(torch.floor(torch.log2(wf.abs())) - 7)
    shares = []
    for u in (1e-5, 1e-4, 1e-3):
        predicted = float((u < gap / 2).float().mean())
        measured = float(((w.float() + u).to(torch.bfloat16) == w).float().mean())
        assert abs(predicted - measured) < 0.01, (u, predicted, measured)
        shares.append((u, round(predicted, 3), round(measured, 3)))
    assert shares[0][2] > shares[1][2] > shares[2][2]
    print(f"exercise 3: (u, predicted, measured) unchanged shares: {shares}")
    model, _ = load_model("tiny-base", device="cpu", dtype="bf16")
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = 0.002 * 1.15 / math.sqrt(8)
    g = torch.Generator().manual_seed(0)
    paper, master = w0.clone(), w0.float()
    for _ in range(8):
        u = torch.randn(w0.numel(), generator=g) * step
        paper = (paper.float() + u).to(torch.bfloat16)   # the paper's engine: bf16 after every step
        master = master + u                               # esnb's: a float32 master copy
    unchanged = {"paper": float((paper == w0).float().mean()), "esnb": float((master.to(torch.bfloat16) == w0).float().mean())}
    assert 0.02 < unchanged["paper"] < 0.05 and abs(unchanged["paper"] - unchanged["esnb"]) < 0.001, unchanged
    print(f"exercise 3: 8 simulated steps of spread {step:.1e} leave unchanged {unchanged} (section 4 measured 0.0298, 0.0299)")


def exercise_4() -> None:
    """At a fixed budget (2,048 completions, 8 prompts per member) and P = 1,287,840 parameters, the
    random walk sqrt(T) * es_step_norm(alpha, P, N) with alpha_N = 0.002 N / 8 is the same for every N
    (T = 2048 / (8N) iterations); with a fixed alpha = 0.002 it shrinks like 1/N: 64 times from
    N = 2 to N = 128. The mean part (along the smoothed gradient) adds up linearly over the T
    steps, so with a fixed alpha it shrinks like 1/N too. Section 2's N = 128 runs would have moved
    the weights about 1/64 as far as the N = 2 runs, and 1/16 as far as section 2's N = 8: hardly
    at all, and the comparison would have measured that."""
    p, budget, batch = 1_287_840, 2048, 8
    fixed, scaled = {}, {}
    for n in (2, 8, 32, 128):
        t = budget // (n * batch)
        fixed[n] = math.sqrt(t) * es_step_norm(0.002, p, n)
        scaled[n] = math.sqrt(t) * es_step_norm(0.002 * n / 8, p, n)
    assert max(scaled.values()) / min(scaled.values()) < 1.001
    assert math.isclose(fixed[2] / fixed[128], 64, rel_tol=0.01)
    print(f"exercise 4: fixed alpha {[round(v, 2) for v in fixed.values()]}, scaled {[round(v, 2) for v in scaled.values()]}")


if __name__ == "__main__":
    for ex in (exercise_1, exercise_2, exercise_3, exercise_4):
        ex()
