"""Statistics for comparing two methods scored on the same test items (paired comparisons).

When ES and GRPO are both evaluated on the same held-out puzzles, each puzzle gives a *pair* of
outcomes. Comparing two accuracies as if they came from independent samples throws that pairing
away; the tests here use it:

* :func:`paired_counts`: the 2x2 table of a paired comparison (both right, only A, only B, neither);
* :func:`mcnemar_exact`: McNemar's exact test, which looks only at the discordant pairs
  (only-A right ``b``, only-B right ``c``): under "no difference" each discordant pair is a fair
  coin, so ``min(b, c)`` is Binomial(b + c, 1/2) in its lower tail; two-sided p-value;
* :func:`paired_bootstrap`: a percentile bootstrap confidence interval of the difference in mean
  score, resampling the *items* (one draw keeps an item's scores under both methods and all
  seeds together, so puzzle difficulty shared by the runs is not counted as independent evidence);
* :func:`binomial_se`: the standard error of an accuracy measured on ``n`` items.
* :func:`two_level_bootstrap`: like :func:`paired_bootstrap`, but each draw also resamples each
  method's runs (seeds), so the interval includes the seed-to-seed variance as well as the items';
* :func:`permutation_test`: a two-sided permutation test of a difference in means between two
  groups of run-level scores (exact over all splits when there are few).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["paired_counts", "mcnemar_exact", "paired_bootstrap", "binomial_se", "two_level_bootstrap",
           "permutation_test"]


def _as_binary(name: str, x: Sequence) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of 0/1 outcomes, got shape {a.shape}")
    if a.dtype == bool:
        return a
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name}: expected 0/1 (or boolean) outcomes")
    return a.astype(bool)


def paired_counts(a: Sequence, b: Sequence) -> dict:
    """The 2x2 table of two methods' outcomes on the same items: ``{"both", "only_a", "only_b",
    "neither"}`` (counts). ``a`` and ``b``: 0/1 or boolean, one entry per item, same length."""
    x, y = _as_binary("a", a), _as_binary("b", b)
    if x.shape != y.shape:
        raise ValueError(f"b: expected as many outcomes as a ({x.size}), got {y.size}")
    return {"both": int((x & y).sum()), "only_a": int((x & ~y).sum()),
            "only_b": int((~x & y).sum()), "neither": int((~x & ~y).sum())}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test from the discordant counts ``b`` (only the first
    method right) and ``c`` (only the second right): ``min(1, 2 P(X <= min(b, c)))`` with
    ``X ~ Binomial(b + c, 1/2)``. No discordant pair at all gives 1.0."""
    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}: expected a count (integer >= 0), got {v!r}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0:
        return 1.0
    # exact integer arithmetic: no float underflow for large n
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(a: Sequence, b: Sequence, n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Percentile bootstrap of ``mean(a) - mean(b)`` resampling items (columns).

    ``a``, ``b``: scores of the two methods on the same items, shape ``(items,)`` or
    ``(runs, items)`` (e.g. one row per seed; rows may differ between ``a`` and ``b`` in number,
    columns must be the same items in the same order). Each bootstrap draw picks ``items``
    columns with replacement and recomputes the difference of the two overall means.

    Returns ``{"diff", "low", "high", "se"}``: the observed difference, the ``level`` interval
    and the bootstrap standard error.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    x = x[None, :] if x.ndim == 1 else x
    y = y[None, :] if y.ndim == 1 else y
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"a: expected shape (items,) or (runs, items), got {np.asarray(a).shape}")
    if y.ndim != 2 or y.shape[1] != x.shape[1]:
        raise ValueError(f"b: expected the same items (columns) as a ({x.shape[1]}), got shape {np.asarray(b).shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot: expected an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    # per item: mean over runs of A minus mean over runs of B; the bootstrap resamples these
    d = x.mean(axis=0) - y.mean(axis=0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(int(n_boot), d.size))
    boots = d[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "se": float(boots.std(ddof=1)) if n_boot > 1 else 0.0}


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` items."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"p: expected a share in [0, 1], got {p!r}")
    return math.sqrt(p * (1 - p) / n)


def two_level_bootstrap(a: Sequence, b: Sequence, n_boot: int = 10_000, seed: int = 0,
                        level: float = 0.95, chunk: int = 1_000) -> dict:
    """Percentile bootstrap of ``mean(a) - mean(b)`` resampling the runs of each method *and* the items.

    ``a``: shape ``(runs_a, items)``, ``b``: ``(runs_b, items)``: one row per run (seed) of each
    method, the columns the same items in the same order. Each draw picks ``runs_a`` rows of ``a``
    and ``runs_b`` rows of ``b`` with replacement, independently (the two methods' seeds share
    nothing), and ``items`` columns with replacement, the same columns for both methods (the
    pairing by item is kept); the statistic is the difference of the two overall means.

    :func:`paired_bootstrap` holds the runs fixed and resamples items only, so its interval
    leaves out how much a method's result moves from seed to seed; this one includes both
    sources of variation (a two-stage, hierarchical bootstrap; slightly conservative when the
    items are many). With one run per method it is :func:`paired_bootstrap` again.

    Returns ``{"diff", "low", "high", "se"}``: the observed difference, the ``level`` interval
    and the bootstrap standard error. ``chunk``: draws computed at once (memory only).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"a: expected shape (runs, items), got {x.shape}")
    if y.ndim != 2 or y.shape[0] == 0 or y.shape[1] != x.shape[1]:
        raise ValueError(f"b: expected shape (runs, {x.shape[1]}) (the same items as a), got {y.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot: expected an integer >= 1, got {n_boot!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk: expected an integer >= 1, got {chunk!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    ra, rb, n = x.shape[0], y.shape[0], x.shape[1]
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot))
    for start in range(0, int(n_boot), int(chunk)):
        k = min(int(chunk), int(n_boot) - start)
        # multinomial counts = how often each run / item is picked in a draw with replacement
        wa = rng.multinomial(ra, np.full(ra, 1 / ra), size=k) / ra
        wb = rng.multinomial(rb, np.full(rb, 1 / rb), size=k) / rb
        items = rng.multinomial(n, np.full(n, 1 / n), size=k) / n
        boots[start:start + k] = ((wa @ x - wb @ y) * items).sum(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return {"diff": float(x.mean() - y.mean()), "low": float(lo), "high": float(hi),
            "se": float(boots.std(ddof=1)) if n_boot > 1 else 0.0}


def permutation_test(a: Sequence, b: Sequence, n_perm: int = 10_000, seed: int = 0,
                     max_exact: int = 100_000) -> dict:
    """Two-sided permutation test of ``mean(a) - mean(b)`` for two groups of scores, one per run
    (e.g. each seed's test accuracy): under "no difference" the group labels are exchangeable.

    Exact when the number of splits ``C(len(a) + len(b), len(a))`` is at most ``max_exact``
    (8 runs against 8: 12,870 splits); otherwise ``n_perm`` random splits (the observed one
    counted in, so p is never 0). p = share of splits whose |difference| is at least the
    observed one. Returns ``{"diff", "p", "exact", "splits"}``.
    """
    import itertools

    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if x.size == 0 or y.size == 0:
        raise ValueError(f"a, b: expected two non-empty groups, got {x.size} and {y.size} scores")
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"n_perm: expected an integer >= 1, got {n_perm!r}")
    pooled, na = np.concatenate([x, y]), x.size
    total = pooled.sum()
    observed = x.mean() - y.mean()
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    splits = math.comb(pooled.size, na)
    if splits <= max_exact:
        idx = np.array(list(itertools.combinations(range(pooled.size), na)))
        sa = pooled[idx].sum(axis=1)
        diffs = sa / na - (total - sa) / y.size
        p = float(np.mean(np.abs(diffs) >= abs(observed) - tol))
        return {"diff": float(observed), "p": p, "exact": True, "splits": int(splits)}
    rng = np.random.default_rng(seed)
    hits = 1  # the observed split
    for _ in range(int(n_perm)):
        perm = rng.permutation(pooled)
        hits += abs(perm[:na].mean() - perm[na:].mean()) >= abs(observed) - tol
    return {"diff": float(observed), "p": hits / (int(n_perm) + 1), "exact": False, "splits": int(n_perm) + 1}
