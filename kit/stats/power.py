"""How many items a rule needs: minimum detectable effect and the sample size that decides.

:func:`items_to_decide` is what the memo prints for an undecided rule ("about N items
would decide it"). It is sized for 80% *predictive* power (Spiegelhalter, Freedman &
Blackburn 1986): the chance that a fresh study of N items decides the rule, averaged over
the truths this study still leaves plausible, N(estimate, variance / n) in the normal
approximation, with the per-item variance at least the variance the limit itself implies.
Sizing at the observed estimate instead (plain power) promises too small a rerun: an
undecided study is selected for an estimate near the limit, and
``benchmarks/verdict_calibration.py`` measured that only 43% of undecided studies rerun with
the plug-in figure decided (56% for truths 2 points or more from the limit), against 53% (72%)
with this one. An estimate exactly on the limit still gets a figure.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

from kit.errors import CompkitError

#: Power :func:`items_to_decide` plans for.
PLANNED_POWER = 0.8
#: Larger answers are reported as "no affordable number of items is likely to decide it".
MAX_ITEMS = 10**8


def _finish(n: float, observed_n: float) -> float:
    if not math.isfinite(n) or n > MAX_ITEMS:
        return math.nan
    return float(max(math.ceil(n), int(observed_n) + 1))


def _assurance(k: np.ndarray, t: np.ndarray, z: float) -> np.ndarray:
    """P(a study k^2 times larger decides), averaged over a truth u ~ N(t, 1) (s.e. units)."""
    from scipy.special import ndtr

    s = np.linspace(-8, 8, 641)
    w = np.exp(-(s**2) / 2)
    w /= w.sum()
    u = np.abs(t[:, None] + s[None, :])
    decide = ndtr(k[:, None] * u - z) + ndtr(-k[:, None] * u - z)
    return (decide * w).sum(axis=1)


@functools.cache
def _predictive_factor(confidence: float, power: float) -> tuple[np.ndarray, np.ndarray]:
    """(|t| grid, sqrt(N / n)) at which a fresh study reaches ``power`` predictive power."""
    grid = np.linspace(0, 6, 601)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    lo, hi = np.zeros_like(grid), np.full_like(grid, math.log(1e5))
    for _ in range(50):  # bisection on log k, all grid points at once
        mid = (lo + hi) / 2
        ok = _assurance(np.exp(mid), grid, z) >= power
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    return grid, np.exp(hi)


def _predictive_items(t: float, n: float, confidence: float, power: float) -> float:
    """Items for ``power`` predictive power, ``t`` = |estimate - limit| / standard error."""
    if not (0 < power < 1 and 0 < confidence < 1):
        raise CompkitError(f"power and confidence must be in (0, 1), got {power}, {confidence}")
    grid, factor = _predictive_factor(float(confidence), float(power))
    return _finish(n * float(np.interp(t, grid, factor)) ** 2, n)


def items_to_decide(
    *,
    estimate: float,
    limit: float,
    variance: float,
    null_variance: float,
    n: float,
    confidence: float = 0.95,
    power: float = PLANNED_POWER,
) -> float:
    """Items at which a fresh study decides a rule on a mean-like quantity with ``power``
    predictive power (module docstring).

    Parameters
    ----------
    estimate, limit
        The observed quantity and the rule's threshold (same scale).
    variance
        Per-item variance at the observed rates (for a paired 0/1 difference
        ``(b + c) / n - ((c - b) / n) ** 2``; for a proportion ``p (1 - p)``).
    null_variance
        Per-item variance at the limit (the variance the interval uses there).
    n
        Items observed (the answer is never below ``n + 1``).

    Returns
    -------
    float
        NaN when nothing was observed or the answer exceeds :data:`MAX_ITEMS` (more items
        alone will not decide it).
    """
    if not (math.isfinite(n) and n > 0 and math.isfinite(estimate) and math.isfinite(limit)):
        return math.nan
    var = max(variance, null_variance, 1e-12)
    t = abs(estimate - limit) / math.sqrt(var / n)
    return _predictive_items(t, n, confidence, power)


def paired_null_variance(limit: float, b: float, c: float, n: float) -> float:
    """Per-item variance of a paired 0/1 difference at ``limit`` (Tango's constrained MLE)."""
    d0 = float(np.clip(limit, -1 + 1e-9, 1 - 1e-9))
    a_ = 2 * n
    b_ = -b - c + (2 * n - c + b) * d0
    c_ = -b * d0 * (1 - d0)
    q = (math.sqrt(max(b_ * b_ - 4 * a_ * c_, 0.0)) - b_) / (2 * a_)
    return 2 * q + d0 * (1 - d0)


def scaled_items_to_decide(
    *,
    estimate: float,
    limit: float,
    half_width: float,
    n: float,
    confidence: float = 0.95,
    power: float = PLANNED_POWER,
) -> float:
    """Items to decide, from an interval's half-width towards the limit (its standard error
    is ``half_width / z``; 1/sqrt(n) scaling, predictive power as in :func:`items_to_decide`).

    For intervals without a closed-form variance (bootstrap, order statistics).
    """
    if not (math.isfinite(half_width) and half_width > 0 and math.isfinite(estimate)):
        return math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    t = abs(estimate - limit) / (half_width / z)
    return _predictive_items(t, n, confidence, power)


def minimum_detectable_effect(
    n: int | ArrayLike, *, p: float, alpha: float = 0.05, power: float = 0.8
) -> float | np.ndarray:
    """Smallest paired difference of a binary metric that ``n`` items detect.

    The per-item difference of a paired binary metric is -1, 0 or 1; with discordant rate
    ``p`` and true difference ``delta`` it has variance ``p - delta**2``. A two-sided test
    of mean zero with the normal approximation detects standardised effect
    ``es = delta / sqrt(p - delta**2)`` with the given power (``statsmodels``
    ``NormalIndPower``, one sample); solving gives ``delta = es * sqrt(p) / sqrt(1 + es**2)``.
    ``inf`` where even ``delta = p`` is not detectable.

    Examples
    --------
    >>> round(float(minimum_detectable_effect(1000, p=0.1)), 4)
    0.0279
    """
    from statsmodels.stats.power import NormalIndPower

    if not 0 < p <= 1:
        raise CompkitError(f"discordant rate p must be in (0, 1], got {p}")
    sizes = np.atleast_1d(np.asarray(n, dtype=np.float64))
    out = np.full(sizes.shape, np.inf)
    solver = NormalIndPower()
    for i, size in enumerate(sizes):
        if size < 2:
            continue
        es = solver.solve_power(effect_size=None, nobs1=size, alpha=alpha, power=power, ratio=0.0)
        delta = float(es) * math.sqrt(p) / math.sqrt(1 + float(es) ** 2)
        out[i] = delta if delta <= p else np.inf
    return float(out[0]) if np.ndim(n) == 0 else out
