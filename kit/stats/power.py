"""How many items a rule needs: minimum detectable effect and the sample size that decides.

:func:`items_to_decide` is what the memo prints for an undecided rule ("about N items
would decide it"). It is sized for 80% power *if the observed rates are the truth*: the
normal approximation to the interval at the rule's limit, with the per-item variance at least
the variance the limit itself implies (so a sample that happened to show no variation does not
promise that a tiny rerun will decide). ``benchmarks/verdict_calibration.py`` reruns undecided
studies with that many items and reports how often they then decide.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

from kit.errors import CompkitError

#: Power :func:`items_to_decide` plans for.
PLANNED_POWER = 0.8
#: Larger answers are reported as "more items alone will not decide it".
MAX_ITEMS = 10**8


def _z(confidence: float, power: float) -> float:
    nd = NormalDist()
    return nd.inv_cdf(0.5 + confidence / 2) + nd.inv_cdf(power)


def _finish(n: float, observed_n: float) -> float:
    if not math.isfinite(n) or n > MAX_ITEMS:
        return math.nan
    return float(max(math.ceil(n), int(observed_n) + 1))


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
    """Items at which a rule on a mean-like quantity would be decided with ``power``.

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
        NaN when the estimate sits on the limit (more items alone will not decide it) or
        the answer exceeds :data:`MAX_ITEMS`.
    """
    margin = abs(estimate - limit)
    if margin <= 1e-12 or not math.isfinite(margin):
        return math.nan
    var = max(variance, null_variance, 1e-12)
    return _finish(_z(confidence, power) ** 2 * var / margin**2, n)


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
    """Items to decide, from an interval's half-width towards the limit (1/sqrt(n) scaling).

    For intervals without a closed-form variance (bootstrap, order statistics).
    """
    margin = abs(estimate - limit)
    if margin <= 1e-12 or not (math.isfinite(half_width) and half_width > 0):
        return math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return _finish(n * (half_width * _z(confidence, power) / (z * margin)) ** 2, n)


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
