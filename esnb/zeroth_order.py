"""Zeroth-order SGD (SPSA / MeZO) written as a configuration of the ES core.

MeZO (Malladi et al. 2023, arXiv 2305.17333) estimates a gradient from one antithetic pair of
perturbed copies and steps along the pair's noise; with a raw (unshaped) reward that is exactly
ES with ``N = 2``, mirrored sampling and ``alpha = lr / sigma``, so esnb runs it on the same engine,
seed log and replay as ES (notebook 11 compares the two).
"""
from __future__ import annotations

from numbers import Integral

from .es import ESConfig, check_real

__all__ = ["mezo_config"]


def mezo_config(lr: float, sigma: float, pairs: int = 1, **kwargs) -> ESConfig:
    """Zeroth-order SGD (SPSA; MeZO, Malladi et al. 2023, arXiv 2305.17333) as an :class:`esnb.es.ESConfig`.

    MeZO's step, written for a reward ``R`` to maximise (MeZO descends a loss ``L = -R``)::

        theta <- theta + lr * (R(theta + sigma eps) - R(theta - sigma eps)) / (2 sigma) * eps

    with ``eps`` regenerated from its seed (no stored noise). ES with one antithetic pair and raw
    fitness steps ``alpha * (1/2) * (R+ eps + R- (-eps)) = alpha * (R+ - R-) / 2 * eps``: the same
    step when ``alpha = lr / sigma``. ``pairs > 1`` averages the projected gradients of that many
    pairs (MeZO's ``n``). Other ``ESConfig`` fields (``seed``, ``noise``, ...) pass through
    ``kwargs``. With ``shaping="zscore"`` instead of ``"raw"`` the two rewards of a pair become
    +1 and -1, so the step keeps only the sign of ``R+ - R-`` (and is zero on a tie).
    """
    if isinstance(pairs, bool) or not isinstance(pairs, Integral) or pairs < 1:
        raise ValueError(f"pairs must be an integer >= 1, got {pairs!r}")
    lr, sigma = check_real("lr", lr, nonnegative=True), check_real("sigma", sigma, positive=True)
    for name in ("population_size", "antithetic", "shaping", "alpha"):
        if name in kwargs:
            raise ValueError(f"{name}: fixed by mezo_config (N = 2 * pairs, antithetic, raw, alpha = lr / sigma)")
    return ESConfig(population_size=2 * int(pairs), sigma=sigma, alpha=lr / sigma, antithetic=True,
                    shaping="raw", **kwargs)
