"""esnb.stats against values computed by hand."""
import math

import numpy as np
import pytest

from esnb.stats import binomial_se, mcnemar_exact, paired_bootstrap, paired_counts


def test_paired_counts_table():
    a = [1, 1, 0, 0, 1]
    b = [1, 0, 1, 0, 0]
    assert paired_counts(a, b) == {"both": 1, "only_a": 2, "only_b": 1, "neither": 1}
    assert paired_counts([True, False], [True, True]) == {"both": 1, "only_a": 0, "only_b": 1, "neither": 0}


def test_mcnemar_exact_by_hand():
    # 0 vs 5 discordant: P(X <= 0) = 1/32, two-sided 2/32
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    # 2 vs 8: P(X <= 2) = (1 + 10 + 45) / 1024 = 56/1024, two-sided 0.109375
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    # balanced or a single discordant pair: no evidence at all (capped at 1)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(1, 0) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # large counts: exact integer sums, no overflow (2 / 2**2000 rounds to 0.0 as a float)
    assert 0.0 <= mcnemar_exact(0, 2000) < 1e-300
    assert mcnemar_exact(1000, 1000) == 1.0


def test_mcnemar_rejects_bad_counts():
    for b, c in ((-1, 2), (1.5, 2), (True, 2)):
        with pytest.raises(ValueError, match="b"):
            mcnemar_exact(b, c)
    with pytest.raises(ValueError, match="c"):
        mcnemar_exact(1, -3)


def test_paired_bootstrap_by_hand():
    # per-item differences (1, 0, 0, 0): a resample's difference is K/4 with K ~ Binomial(4, 1/4).
    # P(K = 0) = 81/256 > 2.5%, so the lower end is 0; P(K >= 3) = 13/256 > 2.5% > P(K = 4) = 1/256,
    # so the upper end is 3/4. Bootstrap SE = sqrt(4 * 1/4 * 3/4) / 4 = 0.2165.
    r = paired_bootstrap([1, 0, 1, 0], [0, 0, 1, 0], n_boot=20_000, seed=1)
    assert r["diff"] == pytest.approx(0.25)
    assert (r["low"], r["high"]) == (0.0, 0.75)
    assert r["se"] == pytest.approx(math.sqrt(0.75) / 4, abs=0.01)


def test_paired_bootstrap_degenerate_and_runs():
    same = paired_bootstrap([1, 0, 1], [1, 0, 1], n_boot=200)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "se": 0.0}
    # rows are runs (seeds): the difference is of the means over runs and items
    a = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    b = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = paired_bootstrap(a, b, n_boot=500)
    assert r["diff"] == pytest.approx(3 / 8)
    assert 0 <= r["low"] <= r["diff"] <= r["high"] <= 1


def test_paired_bootstrap_rejects_mismatched_items():
    with pytest.raises(ValueError, match="b"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1, 0], [1, 0], n_boot=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1, 0], [1, 0], level=95)


def test_binomial_se():
    assert binomial_se(0.25, 200) == pytest.approx(math.sqrt(0.25 * 0.75 / 200))  # 0.0306
    assert binomial_se(0.0, 10) == 0.0
    with pytest.raises(ValueError, match="n"):
        binomial_se(0.5, 0)
    with pytest.raises(ValueError, match="p"):
        binomial_se(1.5, 10)


def test_two_level_bootstrap_by_hand():
    from esnb.stats import two_level_bootstrap

    # a's two runs disagree completely (all right / all wrong), b is always wrong: a draw picks
    # row 0 of a K times out of 2, K ~ Binomial(2, 1/2), so the difference is 0, 0.5 or 1
    # with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1]. Resampling items only
    # (paired_bootstrap) sees no spread at all.
    a = np.array([[1] * 6, [0] * 6])
    b = np.zeros((1, 6))
    r = two_level_bootstrap(a, b, n_boot=4_000, seed=0)
    assert r["diff"] == pytest.approx(0.5)
    assert (r["low"], r["high"]) == (0.0, 1.0)
    assert r["se"] == pytest.approx(math.sqrt(2 * 0.25) / 2, abs=0.02)
    assert paired_bootstrap(a, b, n_boot=500)["low"] == paired_bootstrap(a, b, n_boot=500)["high"] == 0.5
    same = two_level_bootstrap(np.ones((3, 4)), np.ones((2, 4)), n_boot=100)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "se": 0.0}


def test_two_level_bootstrap_one_run_is_the_item_bootstrap_and_wider_with_seeds():
    from esnb.stats import two_level_bootstrap

    rng = np.random.default_rng(3)
    x, y = rng.random((1, 400)) < 0.3, rng.random((1, 400)) < 0.25
    one = two_level_bootstrap(x, y, n_boot=4_000, seed=1)
    items = paired_bootstrap(x, y, n_boot=4_000, seed=1)
    assert one["diff"] == pytest.approx(items["diff"])
    assert one["se"] == pytest.approx(items["se"], rel=0.1)
    # runs that differ by a seed-level shift: the two-level interval is the wider one
    skill = rng.random(400)
    a = np.array([skill < p for p in (0.2, 0.3, 0.4, 0.25, 0.35)])
    b = np.array([skill < p for p in (0.22, 0.28, 0.33, 0.3, 0.27)])
    wide, narrow = two_level_bootstrap(a, b, n_boot=4_000), paired_bootstrap(a, b, n_boot=4_000)
    assert wide["high"] - wide["low"] > 1.5 * (narrow["high"] - narrow["low"])


def test_two_level_bootstrap_rejects_bad_input():
    from esnb.stats import two_level_bootstrap

    with pytest.raises(ValueError, match="a"):
        two_level_bootstrap([1, 0, 1], [[1, 0, 1]])
    with pytest.raises(ValueError, match="b"):
        two_level_bootstrap([[1, 0, 1]], [[1, 0]])
    with pytest.raises(ValueError, match="n_boot"):
        two_level_bootstrap([[1, 0]], [[1, 0]], n_boot=0)


def test_permutation_test_by_hand():
    from esnb.stats import permutation_test

    # {1, 2} vs {3, 4}: of the 6 splits only the observed one and its mirror reach |diff| = 2
    r = permutation_test([1, 2], [3, 4])
    assert r == {"diff": -2.0, "p": pytest.approx(2 / 6), "exact": True, "splits": 6}
    assert permutation_test([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    # 8 against 8 is exact (12,870 splits); the most extreme split of 16 distinct values: 2/12870
    r = permutation_test(np.arange(8) + 10.0, np.arange(8))
    assert r["exact"] and r["splits"] == 12_870 and r["p"] == pytest.approx(2 / 12_870)
    # sampled splits when there are too many: never 0, close to the exact value
    s = permutation_test(np.arange(8) + 10.0, np.arange(8), max_exact=10, n_perm=2_000, seed=0)
    assert not s["exact"] and 0 < s["p"] < 0.01
    with pytest.raises(ValueError, match="a, b"):
        permutation_test([], [1.0])
