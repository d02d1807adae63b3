"""Solutions to the exercises of notebooks/09_where_the_weights_moved.ipynb.

Each ``exercise_K`` runs at a small size (synthetic tensors, a toy quadratic) and checks its own answer.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from esnb import analysis
from esnb.es import ES, ESConfig
from esnb.runlog import replay


def es_step(eps: torch.Tensor, rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha/N sum_n z_n eps_n with z the z-scored rewards (population std)."""
    z = (rewards - rewards.mean()) / rewards.std(unbiased=False)
    return alpha / eps.shape[0] * (z[:, None] * eps).sum(0)


def exercise_1() -> None:
    """The step norm is alpha*sqrt(1 + (P-2)/N) for linear rewards, alpha*sqrt(P/N) for random ones."""
    gen = torch.Generator().manual_seed(0)
    p, n, alpha, draws = 10_000, 8, 0.01, 300
    g = torch.randn(p, generator=gen, dtype=torch.float64)
    sq = {"linear": [], "random": []}
    for _ in range(draws):
        eps = torch.randn(n, p, generator=gen, dtype=torch.float64)
        sq["linear"].append(float(es_step(eps, eps @ g, alpha).pow(2).sum()))
        sq["random"].append(float(es_step(eps, torch.randn(n, generator=gen, dtype=torch.float64), alpha).pow(2).sum()))
    linear, random = math.sqrt(np.mean(sq["linear"])), math.sqrt(np.mean(sq["random"]))
    print(f"linear rewards {linear:.4f} (formula {analysis.es_step_norm(alpha, p, n):.4f}); "
          f"random rewards {random:.4f} (alpha*sqrt(P/N) {alpha * math.sqrt(p / n):.4f})")
    assert abs(linear / analysis.es_step_norm(alpha, p, n) - 1) < 0.02
    assert abs(random / (alpha * math.sqrt(p / n)) - 1) < 0.02
    # the two differ by less than 0.1%: the size of a step says nothing about what the rewards meant
    assert abs(linear / random - 1) < 0.01


def _toy_run(iterations: int, dims: int = 2000, seed: int = 0):
    """ES on f(theta) = -||theta - theta*||^2 from 0; returns the ES and theta*."""
    target = torch.randn(dims, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    es = ES(torch.zeros(dims, dtype=torch.float64),
            ESConfig(population_size=16, sigma=0.05, alpha=0.02, antithetic=False, seed=seed))
    for _ in range(iterations):
        es.tell(-(es.population() - target).pow(2).sum(1))
    return es, target


def my_shuffle(entries: list[dict], seed: int) -> list[dict]:
    """Each logged iteration's shaped weights permuted among its members (no antithetic pairs)."""
    gen = np.random.default_rng(seed)
    return [{**e, "weights": list(np.asarray(e["weights"], dtype=float)[gen.permutation(len(e["weights"]))])}
            for e in entries]


def exercise_2() -> None:
    """The toy run sits about 24 null SDs out towards theta*; its RMS change is about 11% above the nulls."""
    torch.set_num_threads(1)
    es, target = _toy_run(30)
    u = target / target.norm()
    real = es.theta.double()
    start = ES(torch.zeros_like(target), es.config).state_dict()
    along, rms_null = [], []
    for k in range(50):
        null = replay((start, my_shuffle(es.history, seed=k))).params.master[0].double()
        along.append(float(null @ u))
        rms_null.append(float(null.pow(2).mean().sqrt()))
    # my_shuffle agrees with the library's shuffle in what matters: the same multiset of weights per iteration
    assert all(sorted(a["weights"]) == sorted(b["weights"]) for a, b in zip(my_shuffle(es.history, 0), es.history))
    z = (float(real @ u) - np.mean(along)) / np.std(along)
    rms_gap = float(real.pow(2).mean().sqrt()) / np.mean(rms_null) - 1
    print(f"towards theta*: run {float(real @ u):.3f}, nulls {np.mean(along):+.3f} +/- {np.std(along):.3f} (z = {z:.0f}); "
          f"RMS change: run {float(real.pow(2).mean().sqrt()):.4f}, nulls {np.mean(rms_null):.4f} ({rms_gap:+.1%})")
    # measured (seed 0): z = 24, RMS gap +10.6%: the displacement separates them by far, the RMS by a tenth
    assert z > 10
    assert abs(rms_gap) < 0.15


def exercise_3() -> None:
    """Learning grows like T, the null's spread like sqrt(T)."""
    torch.set_num_threads(1)
    rows = []
    for t in (10, 40, 160):
        es, target = _toy_run(t, dims=500)
        u = [target / target.norm()]
        proj = analysis.noise_projections(es, es.history, {"u": u})["u"]
        real = analysis.projection_of(es.history, proj, es.config.alpha)
        nulls = analysis.null_projections(es.history, proj, es.config.alpha, draws=300, seed=0)
        rows.append((t, real, nulls.std()))
        print(f"T={t:>3}: displacement {real:.3f}, null spread {nulls.std():.4f}")
    (t1, r1, s1), _, (t3, r3, s3) = rows
    # 16x the steps: the displacement grows about 16x (minus the slowdown near the optimum), the spread about 4x
    assert r3 / r1 > 8
    assert 2.5 < s3 / s1 < 6


def exercise_4() -> None:
    """One pair of 16 splits, the rest tie: the step is alpha*sqrt(P/(N-1)), a little ABOVE alpha*sqrt(P/N)."""
    n, p, alpha = 32, 100_000, 0.01
    rewards = np.zeros(n)
    rewards[0] = 1.0                      # pair 0: +eps scored 1, -eps scored 0; every other member 0
    z = (rewards - rewards.mean()) / rewards.std()
    seeds = [s for s in range(n // 2) for _ in range(2)]
    entry = {"seeds": seeds, "signs": [1, -1] * (n // 2), "weights": z.tolist()}
    predicted = analysis.logged_step_norms([entry], alpha=alpha, n_params=p)[0]
    # z+ - z- = 1/std = n/sqrt(n-1): norm^2 = alpha^2 P/n^2 * n^2/(n-1)
    ratio = predicted / (alpha * math.sqrt(p / n))
    print(f"one pair split: {predicted:.4f} = {ratio:.4f} x alpha*sqrt(P/N) (sqrt(N/(N-1)) = {math.sqrt(n / (n - 1)):.4f})")
    assert abs(ratio - math.sqrt(n / (n - 1))) < 1e-9
    # checked against the real thing: one ES step from zeros with these rewards
    es = ES(torch.zeros(p), ESConfig(population_size=n, sigma=0.1, alpha=alpha, antithetic=True, seed=0))
    es.tell(rewards.tolist())
    measured = float(es.theta.double().norm())
    print(f"ES.tell: step norm {measured:.4f}")
    assert abs(measured / predicted - 1) < 0.02


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("exercise_") and callable(fn):
            print(f"--- {name}")
            fn()
