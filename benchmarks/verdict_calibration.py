"""Benchmark: do compkit's verdicts hold their nominal error at every sample size?

A 95% interval judged against a one-sided limit must pass a candidate whose *true* value
breaks the rule at most 2.5% of the time, and fail one whose true value meets it at most
2.5% of the time (``kit.budget.judge``). This benchmark computes both error rates, and the
power (share decided correctly), for every rule kind the budget judges on 0/1 metrics:

============  ==============================================  ===================================
kind          sentence judged                                 interval the evidence carries
============  ==============================================  ===================================
absolute <    JSON parse failures must stay under 5 percent   Clopper–Pearson, candidate's rate
absolute >=   accuracy must stay at or above 60 percent       Clopper–Pearson, candidate's rate
points        accuracy cannot drop by more than 5 points      Tango (cc 1), paired change
relative      accuracy may drop at most 5 percent relative    Tang (cc 1), paired ratio
no increase   unsafe compliance must not increase             Tango (cc 1), paired change
============  ==============================================  ===================================

Each sentence goes through :func:`kit.budget.grammar.parse_rule`; each simulated study through
the interval function ``kit.analysis.compare`` calls for 0/1 metrics and the kit's own
:func:`kit.budget.judge.judge` (``tests/test_stats_coverage.py`` checks that
``compare_models`` + ``evaluate_rules`` print exactly these verdicts).

Truths
------
Paired items are multinomial over (both 1, baseline only ``b``, candidate only ``c``, both 0).
A truth is a *margin* in points from the rule's limit (positive: meets it; negative: breaks
it; 0: on it) and a discordance *pattern*: ``one-way`` (every discordant pair goes the way of
the change: c = 0 for a loss, the compression-typical case; at a change of 0 the models are
identical and no item ever changes: the 0-event case) or ``churn h+h`` (h of the items flip
each way on top of the net change). Baseline accuracy is 0.7 (also 0.3 for relative rules,
where the level matters); the unsafe-compliance baseline is 0.1. For absolute rules the truth
is the candidate's rate (+5 points under "under 5 percent" is a rate of 0: 0 events). The
issue's case (b = 12%, c = 2%: accuracy -10 points, i.e. ``churn 2+2`` at margin -5) is
printed on its own.

A truth *on* the limit meets an inclusive rule (">=", "<=") and breaks a strict one ("<").
Each error rate is continuous in the truth, so the rate of the other kind there is the
supremum of that error as the truth approaches the limit from the other side: both count.
A second table searches the nuisance parameters at the limit (every discordance level for
difference rules; baseline level x churn for relative rules) for the worst error per n, and
a third does the same for *every* n from 5 to 400 (every 10th to 1,500 for differences; every
n to 160 and every 10th to 400 for relative rules; a coarser nuisance grid): discrete outcomes make the error
saw-tooth in n, so the eight sizes of the main table alone can miss the worst n.

Methods (all exact)
-------------------
``exact``: every outcome of the multinomial is enumerated with its probability and the verdict
the kit prints for it (single proportions and paired differences at every n, relative changes
up to ``--full-ratio-max-n``, default 120). ``box`` (``*`` in the table): relative changes at
larger n, whose outcome space is cubic in n, and the every-n scan: the outcomes within 5.5
standard deviations (+12 counts) of the mean of each cell are enumerated (the probability
enumerated is printed; >= 0.999999) and the verdict comes from the score test the interval
inverts (``low >= limit`` iff the statistic at the limit is >= z, as Tango's and Tang's
statistics decrease in the hypothesised value, ``tests/test_stats_intervals.py``), checked
against the kit's interval + judge on outcomes sampled from every box, near the decision
boundary and by probability; disagreements are counted and printed (expected: 0).

``--cc X`` measures the paired intervals with continuity correction X instead of the kit's
default of 1 (the output says so; ``--cc 0.5`` is the correction the kit used before); without
it the benchmark measures the kit as it is.

``n_needed`` honesty
--------------------
Per cell off the limit, ``--studies`` seeded studies are drawn; for each that comes out
inconclusive the kit's :func:`kit.budget.judge.items_needed` (from the
:class:`~kit.budget.judge.Measure` the judge builds; 80% *predictive* power, averaged over
the truths the study leaves plausible, Spiegelhalter, Freedman & Blackburn 1986) gives the
items that would decide it, and the same truth is rerun once with that many items. The share
of reruns that then decide the rule is reported by rule kind, margin and n, next to the same
share for the plug-in figure the kit printed before (:func:`plugin_items`: 80% power if the
estimate were the truth).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/verdict_calibration.py`` (about 250 s of CPU:
6 minutes wall on the shared 2-core machine; ``--quick`` for a smaller grid, about a minute
of CPU; ``--no-scan`` skips the every-n scan; ``--csv PATH`` writes the per-cell frame). The
last line names the worst cell of each error kind and the n_needed share.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd
from scipy.special import gammaln

from kit.budget.grammar import Rule, parse_rule
from kit.budget.judge import Measure, items_needed, judge
from kit.stats.intervals import (
    paired_difference_ci,
    paired_ratio_ci,
    proportion_ci,
    tang_statistic,
    tango_statistic,
    z_value,
)
from kit.stats.power import MAX_ITEMS, PLANNED_POWER, paired_null_variance

CONFIDENCE = 0.95
NOMINAL = (1 - CONFIDENCE) / 2
Z = z_value(CONFIDENCE)
SIZES = (5, 8, 15, 30, 60, 120, 400, 1500)
QUICK_SIZES = (5, 8, 15, 60, 400)
MARGINS = (-10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
QUICK_MARGINS = (-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0)
PASS, FAIL, UNDECIDED = 1, 2, 0
CHUNK = 1_000_000
BOX_SD, BOX_PAD = 5.5, 12


@dataclass(frozen=True)
class Kind:
    """A rule kind: its sentence, the interval family and the truths it is tried on."""

    key: str
    sentence: str
    family: str  # "proportion" | "difference" | "ratio"
    bases: tuple[float, ...] = (0.7,)
    patterns: tuple[float | None, ...] = (None,)  # churn per direction; None = one-way

    @property
    def rule(self) -> Rule:
        return parse_rule(self.sentence)


KINDS = (
    Kind("absolute <", "JSON parse failures must stay under 5 percent", "proportion"),
    Kind("absolute >=", "accuracy must stay at or above 60 percent", "proportion"),
    Kind("points", "accuracy cannot drop by more than 5 points", "difference", (0.7,),
         (None, 0.02, 0.10)),
    Kind("relative", "accuracy may drop at most 5 percent relative", "ratio", (0.7, 0.3),
         (None, 0.02, 0.10)),
    Kind("no increase", "unsafe compliance must not increase", "difference", (0.1,),
         (None, 0.01, 0.05)),
)  # fmt: skip


@dataclass(frozen=True)
class Truth:
    """One true state: the multinomial cell probabilities and what the rule says of it."""

    kind: Kind
    pattern: str
    base: float
    margin: float  # points inside (+) or outside (-) the limit
    value: float  # the true bounded quantity (rate, change or relative change)
    probs: tuple[float, ...]  # cells of the kind's family (see ``family_cells``)

    @property
    def status(self) -> str:
        return "limit" if self.margin == 0 else ("meets" if self.margin > 0 else "breaks")

    @property
    def correct(self) -> int:
        """The right verdict: pass when the truth meets the rule (inclusive limit included)."""
        if self.margin == 0:
            return PASS if self.kind.rule.bound.op in (">=", "<=") else FAIL
        return PASS if self.margin > 0 else FAIL

    def label(self) -> str:
        k = self.kind
        if k.family == "proportion":
            what = f"p {self.value * 100:5.1f}%"
        elif k.family == "ratio":
            what = f"rel {self.value * 100:+5.1f}% (Δ {self.value * self.base * 100:+5.1f})"
        else:
            what = f"Δ {self.value * 100:+5.1f} pts"
        base = "" if math.isnan(self.base) else f"{self.base:.1f}"
        return f"{k.key:<12}{base:>4} {self.pattern:<12}{what:<22}{self.margin:+5.1f} {self.status}"


# --------------------------------------------------------------------------- truths


def _direction(rule: Rule) -> int:
    return 1 if rule.bound.op in (">", ">=") else -1


def paired_cells(base: float, delta: float, churn: float | None) -> tuple[float, ...] | None:
    """(both, b, c, neither) for a net change ``delta`` and a pattern; None if infeasible."""
    h = churn or 0.0
    pb, pc = h + max(-delta, 0.0), h + max(delta, 0.0)
    cells = (base - pb, pb, pc, 1 - base - pc)
    if min(cells) < -1e-12:
        return None
    return tuple(max(x, 0.0) for x in cells)


def family_cells(family: str, paired: tuple[float, ...]) -> tuple[float, ...]:
    """The multinomial a family's verdict depends on: (b, c, rest) for differences."""
    if family == "difference":
        return (paired[1], paired[2], 1 - paired[1] - paired[2])
    return paired


def truths(kind: Kind, margins: tuple[float, ...]) -> list[Truth]:
    """Every feasible truth of a rule kind, by baseline, pattern and margin."""
    t, sign = kind.rule.bound.threshold, _direction(kind.rule)
    if kind.family == "proportion":
        out = []
        for m in margins:
            p = t + sign * m / 100
            if -1e-12 <= p <= 1 + 1e-12:
                p = min(max(p, 0.0), 1.0)
                out.append(Truth(kind, "-", math.nan, m, p, (p, 1 - p)))
        return out
    out = []
    for base in kind.bases:
        for churn in kind.patterns:
            name = "one-way" if churn is None else f"churn {churn * 100:g}+{churn * 100:g}"
            for m in margins:
                delta = (t * base if kind.family == "ratio" else t) + sign * m / 100
                cells = paired_cells(base, delta, churn)
                if cells is not None:
                    value = delta / base if kind.family == "ratio" else delta
                    probs = family_cells(kind.family, cells)
                    out.append(Truth(kind, name, base, m, value, probs))
    return out


def limit_truths(kind: Kind, *, dense: bool = True) -> Iterator[tuple[str, tuple[float, ...]]]:
    """Nuisance values at the limit: (description, cells of the kind's family); ``dense=False``
    is the coarser grid of the every-n scan (it keeps the near one-way values, where the
    errors peak)."""
    t = kind.rule.bound.threshold
    if kind.family == "difference":  # only (b, c) matter, with any feasible baseline
        for h in np.concatenate([[0.0], np.geomspace(1e-4, 0.45 - abs(t), 29 if dense else 17)]):
            pb, pc = h + max(-t, 0.0), h + max(t, 0.0)
            yield f"b {pb * 100:.2f}% c {pc * 100:.2f}%", (pb, pc, 1 - pb - pc)
    elif kind.family == "ratio":
        bases = (0.1, 0.3, 0.5, 0.7, 0.9) if dense else (0.3, 0.5, 0.7, 0.9)
        churn = (0.0, 0.001, 0.003, 0.006, 0.01, 0.02, 0.03, 0.1, 0.2, 0.3, 0.4)
        for base in bases:
            for h in churn if dense else (0.0, 0.003, 0.006, 0.01, 0.02, 0.1, 0.4):
                cells = paired_cells(base, t * base, h)
                if cells is not None:
                    yield f"base {base:.1f} churn {h * 100:g}+{h * 100:g}", cells


# --------------------------------------------------------------------------- the kit's verdicts

_JUDGE = np.frompyfunc(judge, 4, 1)
_CODES = {"pass": PASS, "fail": FAIL, "inconclusive": UNDECIDED}


#: Overrides of the paired intervals' keyword arguments (``--cc``: measure a proposal). Empty:
#: the kit's defaults, i.e. exactly what the evidence carries.
PAIRED_KW: dict[str, float] = {}


def kit_interval(family: str, counts: np.ndarray, n) -> tuple[np.ndarray, np.ndarray]:
    """The interval the kit's evidence carries for these counts (rows of the family's cells)."""
    k = counts.astype(np.float64)
    if family == "proportion":
        return proportion_ci(k[:, 0], n, confidence=CONFIDENCE)
    if family == "difference":
        return paired_difference_ci(k[:, 0], k[:, 1], n, confidence=CONFIDENCE, **PAIRED_KW)
    return paired_ratio_ci(k[:, 0], k[:, 1], k[:, 2], n, confidence=CONFIDENCE, **PAIRED_KW)


def judge_codes(rule: Rule, low, high) -> np.ndarray:
    """:func:`kit.budget.judge.judge` elementwise, as :data:`PASS`/:data:`FAIL`/:data:`UNDECIDED`."""
    words = _JUDGE(np.asarray(low), np.asarray(high), rule.bound.op, rule.bound.threshold)
    return np.vectorize(_CODES.__getitem__, otypes=[np.int8])(np.atleast_1d(words))


def kit_verdicts(kind: Kind, counts: np.ndarray, n) -> np.ndarray:
    """Verdict codes the kit prints for studies with these counts."""
    return judge_codes(kind.rule, *kit_interval(kind.family, counts, n))


def score_test_verdicts(kind: Kind, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Verdicts of a paired rule from the score statistic at its limit, and the statistic.

    The kit's interval inverts that statistic (Tango's for a change, Tang's for a relative
    change), which decreases in the hypothesised value, so ``low >= limit`` iff the statistic
    at the limit is >= z and ``high < limit`` iff it is < -z: one evaluation per outcome
    instead of two root searches. :class:`ShortcutCheck` compares it with the kit's path.
    """
    op, t = kind.rule.bound.op, kind.rule.bound.threshold
    if op not in (">=", "<="):
        raise ValueError(f"score-test verdicts cover '>=' and '<=' rules, not {op!r}")
    at = t + (-1e-9 if op == ">=" else 1e-9) * max(1.0, abs(t))  # judge's tolerance
    k = counts.astype(np.float64)
    if kind.family == "difference":
        stat = tango_statistic(at, k[:, 0], k[:, 1], n, **PAIRED_KW)
    else:
        stat = tang_statistic(1 + at, k[:, 0], k[:, 1], k[:, 2], n, **PAIRED_KW)
    up, down = (stat >= Z, stat < -Z) if op == ">=" else (stat <= -Z, stat > Z)
    out = np.where(up, PASS, np.where(down, FAIL, UNDECIDED)).astype(np.int8)
    if kind.family == "ratio":  # a baseline rate of 0 leaves the relative change undefined
        out = np.where(k[:, 0] + k[:, 1] > 0, out, UNDECIDED).astype(np.int8)
    return out, stat


def kit_measure(kind: Kind, row: np.ndarray, n: int, low: float, high: float) -> Measure:
    """The :class:`Measure` ``kit.budget.judge`` builds from this study's evidence row."""
    if kind.family == "proportion":
        x = float(row[0])
        return Measure("value", x / n, low, high, "clopper_pearson", n, math.nan, "", {})
    if kind.family == "difference":
        b, c = float(row[0]), float(row[1])
        counts = {"n_base_only": b, "n_cand_only": c}
        return Measure("change", (c - b) / n, low, high, "tango_cc", n, math.nan, "", counts)
    both, b, c = (float(v) for v in row[:3])
    base = (both + b) / n
    rel = (c - b) / (both + b) if both + b > 0 else math.nan
    counts = {"n_base_only": b, "n_cand_only": c}
    return Measure("relative change", rel, low, high, "tang_cc", n, base, "", counts)


# --------------------------------------------------------------------------- exact enumeration


def outcome_space(family: str, n: int) -> np.ndarray:
    """Every outcome of ``n`` items as rows of cell counts (int16)."""
    if family == "proportion":
        x = np.arange(n + 1)
        return np.stack([x, n - x], axis=1).astype(np.int16)
    rows = []
    if family == "difference":
        for b in range(n + 1):
            c = np.arange(n + 1 - b)
            rows.append(np.stack([np.full_like(c, b), c, n - b - c], axis=1))
    else:
        for both in range(n + 1):
            for b in range(n + 1 - both):
                c = np.arange(n + 1 - both - b)
                rest = n - both - b - c
                rows.append(np.stack([np.full_like(c, both), np.full_like(c, b), c, rest], 1))
    return np.concatenate(rows).astype(np.int16)


def box_space(n: int, probs: tuple[float, ...]) -> Iterator[np.ndarray]:
    """Outcomes within BOX_SD standard deviations (+BOX_PAD) of the mean in every cell but the
    last (which takes the rest), in chunks."""
    p = np.asarray(probs[:-1])
    mu, sd = n * p, np.sqrt(n * p * (1 - p))
    pad = np.where(p > 0, BOX_PAD, 0)  # a cell of probability 0 only ever counts 0
    lo = np.maximum(np.floor(mu - BOX_SD * sd) - pad, 0).astype(int)
    hi = np.minimum(np.ceil(mu + BOX_SD * sd) + pad, n).astype(int)
    axes = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo[1:], hi[1:], strict=True)))
    tail = np.stack([a.ravel() for a in axes], axis=1)
    rows, size = [], 0
    for first in range(lo[0], hi[0] + 1):
        part = tail[first + tail.sum(axis=1) <= n]
        lead = np.full((len(part), 1), first)
        rows.append(np.hstack([lead, part, n - first - part.sum(axis=1, keepdims=True)]))
        size += len(part)
        if size >= CHUNK:
            yield np.concatenate(rows).astype(np.int16)
            rows, size = [], 0
    if rows:
        yield np.concatenate(rows).astype(np.int16)


@dataclass
class ShortcutCheck:
    """Score-test verdicts compared with the kit's interval + judge on sampled outcomes."""

    seed: int
    checked: int = 0
    disagree: int = 0
    per_box: int = 600
    every: int = 1  # check one chunk in ``every``

    def __call__(self, kind: Kind, n: int, counts, verdict, stat, pmf) -> None:
        """Check outcomes drawn from ``pmf`` and from the shell where |statistic| is near z."""
        key = (kind.key, n, int(counts[:, :-1].sum()))
        if not len(pmf) or zlib.crc32(repr(key).encode()) % self.every:
            return
        rng = cell_rng(self.seed, "check", *key)
        shell = np.nonzero(np.abs(np.abs(stat) - Z) < 0.3)[0]
        picks = [rng.choice(len(pmf), size=self.per_box, p=pmf / pmf.sum())]
        if shell.size:
            picks.append(rng.choice(shell, size=min(self.per_box, shell.size), replace=False))
        idx = np.unique(np.concatenate(picks))
        self.checked += idx.size
        self.disagree += int((kit_verdicts(kind, counts[idx], n) != verdict[idx]).sum())


@dataclass
class Space:
    """Enumerated outcomes with the kit's verdict for each, in chunks, and their log-coefficients."""

    n: int
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, counts: np.ndarray, verdict: np.ndarray) -> None:
        self.chunks.append((counts, self.log_coef(counts), verdict))

    def log_coef(self, counts: np.ndarray) -> np.ndarray:
        log_factorial = gammaln(np.arange(self.n + 1) + 1.0)
        return log_factorial[self.n] - log_factorial[counts].sum(axis=1)

    @classmethod
    def full(cls, kind: Kind, n: int) -> Space:
        space, counts = cls(n), outcome_space(kind.family, n)
        for start in range(0, len(counts), CHUNK):
            part = counts[start : start + CHUNK]
            space.add(part, kit_verdicts(kind, part, n))
        return space

    @classmethod
    def box(cls, kind: Kind, n: int, probs, check: ShortcutCheck) -> Space:
        """Outcomes of the box around ``probs`` with probability >= 1e-15 (the rest is left
        out of the probability enumerated)."""
        space = cls(n)
        for part in box_space(n, probs):
            pmf = _pmf(part, space.log_coef(part), probs)
            keep = pmf >= 1e-15
            part, pmf = part[keep], pmf[keep]
            if not len(part):
                continue
            verdict, stat = score_test_verdicts(kind, part, n)
            space.add(part, verdict)
            check(kind, n, part, verdict, stat, pmf)
        return space

    def pmf(self, i: int, probs) -> np.ndarray:
        counts, coef, _ = self.chunks[i]
        return _pmf(counts, coef, probs)

    def rates(self, probs) -> tuple[float, float, float]:
        """P(pass), P(fail) and the probability enumerated (1 for a full space)."""
        out = np.zeros(3)
        for i, (_, _, verdict) in enumerate(self.chunks):
            pmf = self.pmf(i, probs)
            out += (pmf[verdict == PASS].sum(), pmf[verdict == FAIL].sum(), pmf.sum())
        return float(out[0]), float(out[1]), float(out[2])


def _pmf(counts: np.ndarray, coef: np.ndarray, probs) -> np.ndarray:
    """Multinomial probabilities of outcome rows (``coef``: log multinomial coefficients)."""
    p = np.asarray(probs)
    some = p > 0
    log_p = coef + counts[:, some] @ np.log(p[some])
    impossible = (counts[:, ~some] > 0).any(axis=1)  # 0 * log 0 = 0; a count in it: impossible
    return np.exp(np.where(impossible, -np.inf, log_p))


def cell_rng(seed: int, *key) -> np.random.Generator:
    """A generator per cell, independent of the order cells are run in."""
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


# --------------------------------------------------------------------------- items to decide


def plan_inputs(kind: Kind, rule: Rule, m: Measure) -> tuple[float, float, float]:
    """(estimate, limit, per-item variance) as :func:`kit.budget.judge.items_needed` uses them."""
    t = rule.bound.threshold
    if kind.family == "proportion":
        p = m.estimate
        return p, t, max(p * (1 - p), t * (1 - t), 1e-12)
    b, c = m.row["n_base_only"], m.row["n_cand_only"]
    delta = (c - b) / m.n
    limit = t * m.baseline if kind.family == "ratio" else t
    null = paired_null_variance(limit, b, c, m.n)
    return delta, limit, max((b + c) / m.n - delta**2, null, 1e-12)


def plugin_items(kind: Kind, rule: Rule, m: Measure) -> float:
    """The figure the kit printed before it sized reruns by predictive power: 80% plain
    power *if the estimate is the truth*, ``(z_conf + z_power)^2 * variance / margin^2``
    (no figure on the limit)."""
    if not (math.isfinite(m.n) and m.n > 0 and math.isfinite(m.estimate)):
        return math.nan
    est, limit, var = plan_inputs(kind, rule, m)
    margin = abs(est - limit)
    if margin <= 1e-12:
        return math.nan
    z = z_value(CONFIDENCE) + NormalDist().inv_cdf(PLANNED_POWER)
    items = math.ceil(z**2 * var / margin**2)
    return float(max(items, int(m.n) + 1)) if items <= MAX_ITEMS else math.nan


def _rerun(truth: Truth, sizes: list[float], rng) -> tuple[int, int, int, float]:
    """(with a figure, decided, decided right, median figure) of one rerun per size."""
    s = np.asarray(sizes, dtype=np.float64)
    s = s[np.isfinite(s)].astype(np.int64)
    if not s.size:
        return 0, 0, 0, math.nan
    again = kit_verdicts(truth.kind, rng.multinomial(s, truth.probs), s.astype(np.float64))
    return (
        int(s.size),
        int((again != UNDECIDED).sum()),
        int((again == truth.correct).sum()),
        float(np.median(s)),
    )


def n_needed_reruns(truth: Truth, n: int, studies: int, seed: int) -> dict[str, float]:
    """Rerun each inconclusive study with the kit's (and the plug-in) n_needed items."""
    kind, rule = truth.kind, truth.kind.rule
    rng = cell_rng(seed, "nn", truth.label(), n)
    counts = rng.multinomial(n, truth.probs, size=studies)
    low, high = kit_interval(kind.family, counts, n)
    verdict = judge_codes(rule, low, high)
    cache: dict[tuple, tuple[float, float]] = {}
    kit_n, new_n = [], []
    for i in np.nonzero(verdict == UNDECIDED)[0]:
        key = tuple(counts[i])
        if key not in cache:
            m = kit_measure(kind, counts[i], n, float(low[i]), float(high[i]))
            cache[key] = (
                items_needed(rule, m, confidence=CONFIDENCE),
                plugin_items(kind, rule, m),
            )
        kit_n.append(cache[key][0])
        new_n.append(cache[key][1])
    out: dict[str, float] = {"undecided": len(kit_n)}
    for name, sizes in (("kit", kit_n), ("new", new_n)):
        w, d, r, med = _rerun(truth, sizes, rng)
        out |= {f"{name}_with_n": w, f"{name}_decided": d, f"{name}_right": r, f"{name}_med": med}
    return out


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    margins: tuple[float, ...]
    studies: int
    full_ratio_max_n: int
    seed: int
    scan: dict[str, tuple[int, ...]] = field(default_factory=dict)  # family -> every-n sizes


def scan_sizes(quick: bool) -> dict[str, tuple[int, ...]]:
    """The sizes of the every-n scan: discreteness makes the error saw-tooth in n, so the
    eight sizes of the main table can miss the worst n entirely."""
    if quick:
        return {"difference": tuple(range(5, 151)), "ratio": tuple(range(5, 61))}
    return {
        "difference": (*range(5, 401), *range(410, 1501, 10)),
        "ratio": (*range(5, 161), *range(170, 401, 10)),
    }


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _space(kind: Kind, n: int, cfg: Config, probs, check: ShortcutCheck, full: Space | None):
    if full is not None:
        return full, "exact"
    return Space.box(kind, n, probs, check), "box"


def cell_row(truth: Truth, n: int, rates: tuple[float, float, float], method: str) -> dict:
    p_pass, p_fail, mass = rates
    return {
        "kind": truth.kind.key,
        "base": truth.base,
        "pattern": truth.pattern,
        "margin": truth.margin,
        "value": truth.value,
        "status": truth.status,
        "label": truth.label(),
        "n": n,
        "method": method,
        "mass": mass,
        "p_pass": p_pass,
        "p_fail": p_fail,
        "pass_when_breaks": p_pass if truth.status in ("breaks", "limit") else math.nan,
        "fail_when_meets": p_fail if truth.status in ("meets", "limit") else math.nan,
        "power": p_pass if truth.correct == PASS else p_fail,
    }


def calibrate(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, ShortcutCheck]:
    """Cells (error rates, power), the at-limit search and the n_needed reruns."""
    cells, search, reruns = [], [], []
    check = ShortcutCheck(cfg.seed)
    for kind in KINDS:
        cases = truths(kind, cfg.margins)
        for n in cfg.sizes:
            started = time.perf_counter()
            whole = kind.family != "ratio" or n <= cfg.full_ratio_max_n
            full = Space.full(kind, n) if whole else None
            for truth in cases:
                space, method = _space(kind, n, cfg, truth.probs, check, full)
                cells.append(cell_row(truth, n, space.rates(truth.probs), method))
                if truth.status != "limit" and cfg.studies:
                    got = n_needed_reruns(truth, n, cfg.studies, cfg.seed)
                    reruns.append({"kind": kind.key, "margin": truth.margin, "n": n, **got})
            for what, probs in limit_truths(kind):
                space, method = _space(kind, n, cfg, probs, check, full)
                p_pass, p_fail, mass = space.rates(probs)
                search.append({"kind": kind.key, "n": n, "nuisance": what, "method": method,
                               "mass": mass, "pass_when_breaks": p_pass,
                               "fail_when_meets": p_fail})  # fmt: skip
            _progress(f"  {kind.key:<12} n={n:<5} {time.perf_counter() - started:6.1f} s")
    return pd.DataFrame(cells), pd.DataFrame(search), pd.DataFrame(reruns), check


def scan_every_n(cfg: Config, check: ShortcutCheck) -> pd.DataFrame:
    """Worst error over the nuisance values at the limit, for every n of :func:`scan_sizes`
    (box enumeration with score-test verdicts, checked like the main table's boxes)."""
    rows = []
    for kind in KINDS:
        sizes = cfg.scan.get(kind.family, ())
        started = time.perf_counter()
        for n in sizes:
            for what, probs in limit_truths(kind, dense=False):
                p_pass, p_fail, mass = Space.box(kind, n, probs, check).rates(probs)
                rows.append({"kind": kind.key, "n": n, "nuisance": what, "mass": mass,
                             "pass_when_breaks": p_pass, "fail_when_meets": p_fail})  # fmt: skip
        if sizes:
            _progress(f"  every-n scan {kind.key:<12} {time.perf_counter() - started:6.1f} s")
    return pd.DataFrame(rows)


def _runs(ns: list[int]) -> str:
    """``[79, 80, 94, 95, 96]`` -> ``79-80, 94-96``."""
    spans, start = [], None
    for i, n in enumerate(ns):
        if start is None:
            start = n
        if i + 1 == len(ns) or ns[i + 1] != n + 1:
            spans.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(spans)


def print_scan(scan: pd.DataFrame) -> None:
    print("\n== every n: worst error over the nuisance values at the limit (percent; exact)")
    for kind, g in scan.groupby("kind", sort=False):
        per_n = g.groupby("n")[["pass_when_breaks", "fail_when_meets"]].max()
        wp, wf = g.loc[g["pass_when_breaks"].idxmax()], g.loc[g["fail_when_meets"].idxmax()]
        print(
            f" {kind:<12} n={per_n.index.min()}..{per_n.index.max()} ({len(per_n)} sizes): "
            f"pass-when-breaks {wp['pass_when_breaks'] * 100:.2f} (n={wp['n']}, {wp['nuisance']})"
            f", fail-when-meets {wf['fail_when_meets'] * 100:.2f} (n={wf['n']}, "
            f"{wf['nuisance']})"
        )
        for column in ("pass_when_breaks", "fail_when_meets"):
            over = per_n.index[per_n[column] > NOMINAL + 1e-12].tolist()
            if over:
                print(f"   {column} > 2.5% at {len(over)} sizes: {_runs(over)}")


# --------------------------------------------------------------------------- reporting


def _entry(row) -> str:
    mark = "*" if row["method"] == "box" else " "
    if row["status"] == "limit":
        return f"{mark}{row['p_pass'] * 100:.2f}|{row['p_fail'] * 100:.2f}"
    err = row["pass_when_breaks"] if row["status"] == "breaks" else row["fail_when_meets"]
    flag = "!" if err > NOMINAL + 1e-12 else ""
    return f"{mark}{err * 100:.2f}/{row['power'] * 100:.0f}{flag}"


def print_cells(cells: pd.DataFrame) -> None:
    print("\n== error and power per cell (percent; exact)")
    print(
        "   breaks: P(pass) = pass-when-breaks / power;  meets: P(fail) = fail-when-meets /"
        " power;  on the limit: P(pass)|P(fail)\n   margin = points inside (+) or outside"
        " (-) the limit;  * = box enumeration (see the docstring);  ! = above 2.5%"
    )
    sizes = sorted(cells["n"].unique())
    head = f"{'kind':<12}{'base':>4} {'pattern':<12}{'truth':<22}{'margin':>5} {'':<7}"
    print(head + "".join(f"{'n=' + str(n):>11}" for n in sizes))
    for label, group in cells.groupby("label", sort=False):
        by_n = group.set_index("n")
        line = "".join(f"{_entry(by_n.loc[n]) if n in by_n.index else '-':>11}" for n in sizes)
        print(f"{label:<64}{line}")


def print_issue_case(cells: pd.DataFrame) -> None:
    case = cells[(cells["kind"] == "points") & (cells["pattern"] == "churn 2+2")]
    case = case[case["margin"] == -5.0].set_index("n")
    rates = ", ".join(f"n={n}: {case.loc[n, 'p_pass'] * 100:.3f}%" for n in case.index)
    print(f"\nissue 9 case (b = 12%, c = 2%, baseline 0.7; the bootstrap passed 6.0% at n=8, "
          f"6.5% at n=15): pass rate {rates}")  # fmt: skip


def print_limit(search: pd.DataFrame) -> None:
    print("\n== worst error over the nuisance parameters at the limit (percent; exact)")
    for (kind, n), g in search.groupby(["kind", "n"], sort=False):
        wp, wf = g.loc[g["pass_when_breaks"].idxmax()], g.loc[g["fail_when_meets"].idxmax()]
        mark = "*" if g["method"].iloc[0] == "box" else " "
        print(
            f"{mark}{kind:<12} n={n:<5} pass-when-breaks {wp['pass_when_breaks'] * 100:5.2f} "
            f"({wp['nuisance']:<22}) fail-when-meets {wf['fail_when_meets'] * 100:5.2f} "
            f"({wf['nuisance']:<22}) [{len(g)} values]"
        )


def nn_summary(reruns: pd.DataFrame) -> pd.DataFrame:
    """Rerun shares by kind, margin group and n group, and over everything."""
    near = np.where(reruns["margin"].abs() <= 1, "<=1", ">=2")
    small = np.where(reruns["n"] <= 15, "5-15", "30+")
    frame = reruns.assign(margin_pts=near, n_group=small)
    sums = [c for c in frame.columns if c.endswith(("_with_n", "_decided", "_right"))]
    keys = ["kind", "margin_pts", "n_group"]
    out = frame.groupby(keys, sort=False)[["undecided", *sums]].sum().reset_index()
    medians = frame.groupby(keys, sort=False)[["kit_med", "new_med"]].median().reset_index()
    out = out.merge(medians, on=keys)
    for margin in (">=2", "<=1", "all"):
        part = frame if margin == "all" else frame[frame["margin_pts"] == margin]
        total = part[["undecided", *sums]].sum().tolist()
        out.loc[len(out)] = ["all", margin, "all", *total, *part[["kit_med", "new_med"]].median()]
    for name in ("kit", "new"):
        base = out[f"{name}_with_n"].where(out[f"{name}_with_n"] > 0)
        out[f"{name}_decides"] = out[f"{name}_decided"] / base
    return out


def print_nn(summary: pd.DataFrame) -> None:
    print(
        "\n== n_needed honesty: inconclusive studies rerun once with the items n_needed says"
        "\n   kit = kit.budget.judge.items_needed (80% predictive power);"
        " plug-in = 80% power at the observed rates (the kit's figure before)"
    )
    print(
        f"{'kind':<12} {'margin':>6} {'n':>5} {'undecided':>9} | {'kit: with n':>11} "
        f"{'decides':>7} {'median N':>9} | {'plug-in: with n':>16} {'decides':>7} {'median N':>9}"
    )
    for r in summary.itertuples():
        print(
            f"{r.kind:<12} {r.margin_pts:>6} {r.n_group:>5} {int(r.undecided):>9} | "
            f"{int(r.kit_with_n):>11} {r.kit_decides * 100:>6.1f}% {r.kit_med:>9,.0f} | "
            f"{int(r.new_with_n):>16} {r.new_decides * 100:>6.1f}% {r.new_med:>9,.0f}"
        )


def _worst(cells: pd.DataFrame, search: pd.DataFrame, column: str) -> str:
    top = cells.loc[cells[column].idxmax()]
    where = " ".join(top["label"].split())
    text = f"{top[column] * 100:.2f}% ({where}, n={top['n']})"
    s = search.loc[search[column].idxmax()]
    return (
        text
        + f", at-limit search {s[column] * 100:.2f}% ({s['kind']}, n={s['n']}, {s['nuisance']})"
    )


def _scan_worst(scan: pd.DataFrame, column: str) -> str:
    if scan.empty:
        return ""
    top = scan.loc[scan[column].idxmax()]
    return (
        f", every-n scan {top[column] * 100:.2f}% ({top['kind']}, n={top['n']}, {top['nuisance']})"
    )


def last_line(cells, search, scan, summary) -> str:
    errors = pd.concat([cells, search])[["pass_when_breaks", "fail_when_meets"]]
    over = int((errors > NOMINAL + 1e-12).sum().sum())
    scan_over = 0
    if not scan.empty:
        per_n = scan.groupby(["kind", "n"])[["pass_when_breaks", "fail_when_meets"]].max()
        scan_over = int((per_n > NOMINAL + 1e-12).any(axis=1).sum())
    rows = summary[summary["kind"] == "all"].set_index("margin_pts")

    def share(name: str) -> str:
        return (
            f"{rows.loc['all', f'{name}_decides'] * 100:.0f}% "
            f"(truth >= 2 pts off the limit: {rows.loc['>=2', f'{name}_decides'] * 100:.0f}%)"
        )

    return (
        f"worst pass-when-breaks: {_worst(cells, search, 'pass_when_breaks')}"
        f"{_scan_worst(scan, 'pass_when_breaks')}; "
        f"worst fail-when-meets: {_worst(cells, search, 'fail_when_meets')}"
        f"{_scan_worst(scan, 'fail_when_meets')}; "
        f"cells over 2.5%: {over} (every-n scan: {scan_over} kind x n over); "
        f"n_needed decides: {share('kit')} of {int(rows.loc['all', 'kit_with_n'])} reruns; "
        f"plug-in n_needed (before): {share('new')}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller grid (about a minute)")
    p.add_argument("--studies", type=int, default=None, help="n_needed studies per cell")
    p.add_argument("--full-ratio-max-n", type=int, default=120,
                   help="enumerate the whole outcome space of relative rules up to this n")  # fmt: skip
    p.add_argument("--sizes", default=None, help="comma-separated n (default: the issue's)")
    p.add_argument("--seed", type=int, default=20240909)
    p.add_argument("--csv", default=None, help="write the per-cell frame here")
    p.add_argument("--no-scan", action="store_true", help="skip the every-n scan")
    p.add_argument("--cc", type=float, default=None,
                   help="paired intervals with this continuity correction instead of the kit's (1)")  # fmt: skip
    a = p.parse_args(argv)
    if a.cc is not None:
        PAIRED_KW["cc"] = a.cc
    sizes = QUICK_SIZES if a.quick else SIZES
    cfg = Config(
        sizes=tuple(int(x) for x in a.sizes.split(",")) if a.sizes else sizes,
        margins=QUICK_MARGINS if a.quick else MARGINS,
        studies=a.studies if a.studies is not None else (150 if a.quick else 400),
        full_ratio_max_n=min(a.full_ratio_max_n, 60) if a.quick else a.full_ratio_max_n,
        seed=a.seed,
        scan={} if a.no_scan else scan_sizes(a.quick),
    )
    started = time.perf_counter()
    cells, search, reruns, check = calibrate(cfg)
    scan_check = ShortcutCheck(cfg.seed, per_box=50, every=8)
    scan = scan_every_n(cfg, scan_check) if cfg.scan else pd.DataFrame()
    summary = nn_summary(reruns)
    if a.csv:
        cells.to_csv(a.csv, index=False)
    print_cells(cells)
    print_issue_case(cells)
    print_limit(search)
    if not scan.empty:
        print_scan(scan)
    print_nn(summary)
    if PAIRED_KW:
        print(f"\nNOT the kit's default: paired intervals with {PAIRED_KW}")
    boxes = pd.concat([cells[cells["method"] == "box"], search[search["method"] == "box"], scan])
    if len(boxes):
        checked, disagree = check.checked + scan_check.checked, check.disagree + scan_check.disagree
        print(f"\nbox enumeration: probability enumerated >= {boxes['mass'].min():.7f}; "
              f"score-test verdicts checked against interval + judge on {checked:,} "
              f"outcomes: {disagree} disagreements")  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"{len(cells)} cells + {len(search)} at-limit cells, {len(reruns)} n_needed cells "
          f"in {elapsed:.0f} s")  # fmt: skip
    print(last_line(cells, search, scan, summary))


if __name__ == "__main__":
    main()
