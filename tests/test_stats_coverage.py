"""The verdict's two error kinds stay at most 2.5% (95% intervals) at small n and at 0 events.

A rule is judged on the interval the evidence carries (``kit.analysis.compare`` puts
Clopper–Pearson on a value, Tango's paired score interval on a change, Tang's on a relative
change, all with the default continuity correction) by :func:`kit.budget.judge.judge`. Here
the multinomial of paired 0/1 outcomes is enumerated exactly, so each error rate is a sum of
outcome probabilities, not an estimate; one seeded Monte-Carlo cell checks a larger n within
binomial error. ``benchmarks/verdict_calibration.py`` runs the full grid (n = 5 ... 1,500).

Counts: ``b`` = items with baseline 1 and candidate 0, ``c`` = the reverse, ``both`` = both 1.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom, multinomial

from kit.analysis.compare import compare_models
from kit.budget.grammar import parse_rule
from kit.budget.judge import evaluate_rules, judge
from kit.stats.intervals import paired_difference_ci, paired_ratio_ci, proportion_ci

NOMINAL = 0.025
JSON_UNDER_5 = parse_rule("JSON parse failures must stay under 5 percent")
ACC_AT_LEAST_60 = parse_rule("accuracy must stay at or above 60 percent")
ACC_DROP_5_POINTS = parse_rule("accuracy cannot drop by more than 5 points")
ACC_DROP_5_RELATIVE = parse_rule("accuracy may drop at most 5 percent relative")
UNSAFE_NO_INCREASE = parse_rule("unsafe compliance must not increase")

_judge = np.frompyfunc(judge, 4, 1)


def verdicts(rule, low, high) -> np.ndarray:
    return _judge(np.asarray(low), np.asarray(high), rule.bound.op, rule.bound.threshold)


def rates(words: np.ndarray, pmf: np.ndarray) -> tuple[float, float]:
    """P(pass), P(fail) over an enumerated outcome space."""
    assert pmf.sum() == pytest.approx(1.0, abs=1e-9)
    return float(pmf[words == "pass"].sum()), float(pmf[words == "fail"].sum())


def proportion_rates(rule, n: int, p: float) -> tuple[float, float]:
    x = np.arange(n + 1)
    return rates(verdicts(rule, *proportion_ci(x, n)), binom.pmf(x, n, p))


def difference_rates(rule, n: int, pb: float, pc: float) -> tuple[float, float]:
    b, c = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = b + c <= n
    b, c = b[keep], c[keep]
    pmf = multinomial.pmf(np.stack([b, c, n - b - c], 1), n, [pb, pc, 1 - pb - pc])
    return rates(verdicts(rule, *paired_difference_ci(b, c, n)), pmf)


@functools.cache
def ratio_rates(rule, n: int, probs: tuple[float, float, float, float]) -> tuple[float, float]:
    rows = []
    for x in range(n + 1):
        b, c = np.meshgrid(np.arange(n + 1 - x), np.arange(n + 1 - x), indexing="ij")
        keep = b + c <= n - x
        b, c = b[keep], c[keep]
        rows.append(np.stack([np.full_like(b, x), b, c, n - x - b - c], axis=1))
    grid = np.concatenate(rows)
    pmf = multinomial.pmf(grid, n, probs)
    return rates(verdicts(rule, *paired_ratio_ci(grid[:, 0], grid[:, 1], grid[:, 2], n)), pmf)


def paired(base: float, pb: float, pc: float) -> tuple[float, float, float, float]:
    """(both, b, c, neither) for a baseline rate and the two discordant rates."""
    return (base - pb, pb, pc, 1 - base - pc)


SMALL = [5, 8, 15]


# --------------------------------------------------------------------------- the issue's cases


def test_one_fix_no_break_in_8_items_does_not_pass_a_5_point_limit():
    """Issue 9: the percentile bootstrap gave [0, 37.5] and passed; the score interval cannot."""
    n = 8
    base = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=float)
    cand = base.copy()
    cand[5] = 1.0  # fixes one item, breaks none
    outcomes = pd.DataFrame(
        {
            "model": ["base"] * n + ["q4"] * n,
            "item_id": [f"i{i}" for i in range(n)] * 2,
            "repeat": 0,
            "task": "classification",
            "correct": np.concatenate([base, cand]),
        }
    )
    evidence = compare_models(outcomes, baseline="base")
    row = evaluate_rules([ACC_DROP_5_POINTS], evidence=evidence).iloc[0]
    assert row["verdict"] == "inconclusive"
    assert row["method"] == "tango_cc" and row["ci_low"] < -0.05 < row["ci_high"]
    # the identical candidate (nothing changed) is inconclusive too, not "more change, more pass"
    assert judge(*paired_difference_ci(0, 0, n), ">=", -0.05) == "inconclusive"


@pytest.mark.parametrize("n", [8, 15])
def test_issue_case_b12_c2_breaking_candidate_passes_at_most_2_5_percent(n):
    """Issue 9: b = 12%, c = 2% (truth: -10 points, breaks a 5-point limit); the bootstrap
    passed it 6.0% (n = 8) and 6.5% (n = 15) of the time."""
    p_pass, _ = difference_rates(ACC_DROP_5_POINTS, n, 0.12, 0.02)
    assert p_pass <= NOMINAL
    assert p_pass < 0.005  # far from the limit it is rare, not just under the bar


# --------------------------------------------------------------------------- absolute rules


@pytest.mark.parametrize("n", SMALL)
def test_single_proportion_under_a_limit(n):
    # on the limit (5% breaks "under 5%") and just outside: pass at most 2.5%
    for p in (0.05, 0.055, 0.06):
        assert proportion_rates(JSON_UNDER_5, n, p)[0] <= NOMINAL
    # meets it (4.5%, 4%): fail at most 2.5%
    for p in (0.045, 0.04):
        assert proportion_rates(JSON_UNDER_5, n, p)[1] <= NOMINAL
    # 0 events: never fails, and 15 items cannot show a rate under 5% (CP bound 0/15 = 21.8%)
    assert proportion_rates(JSON_UNDER_5, n, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize("n", SMALL)
def test_single_proportion_at_or_above_a_level(n):
    for p in (0.6, 0.605, 0.61):  # meets (the limit is inclusive)
        assert proportion_rates(ACC_AT_LEAST_60, n, p)[1] <= NOMINAL
    for p in (0.595, 0.59, 0.5):  # breaks
        assert proportion_rates(ACC_AT_LEAST_60, n, p)[0] <= NOMINAL
    # all items right is still not enough at n = 5 (0.478 .. 1), enough from 8 on
    assert judge(*proportion_ci(n, n), ">=", 0.6) == ("inconclusive" if n == 5 else "pass")


def test_clopper_pearson_error_at_the_limit_over_many_n():
    """Exact binomial bound: at the limit each side errs at most 2.5% for every n."""
    for n in [*range(1, 61), 120, 400, 1500]:
        assert proportion_rates(JSON_UNDER_5, n, 0.05)[0] <= NOMINAL, n
        assert proportion_rates(ACC_AT_LEAST_60, n, 0.6)[1] <= NOMINAL, n


# --------------------------------------------------------------------------- change rules


# (b, c) at the limit change -5 points: every discordance from one-way (c = 0, compression
# damage) to heavy churn; both errors meet at the limit (the truth there meets the rule).
POINT_LIMIT = [(0.05, 0.0), (0.06, 0.01), (0.07, 0.02), (0.15, 0.10), (0.45, 0.40)]


@pytest.mark.parametrize("n", SMALL)
@pytest.mark.parametrize(("pb", "pc"), POINT_LIMIT)
def test_change_in_points_at_the_limit(n, pb, pc):
    p_pass, p_fail = difference_rates(ACC_DROP_5_POINTS, n, pb, pc)
    assert p_pass <= NOMINAL and p_fail <= NOMINAL


@pytest.mark.parametrize("n", SMALL)
def test_change_in_points_near_the_limit_and_at_zero_events(n):
    # breaks by half a point and by one point, one-way and with churn: pass at most 2.5%
    for pb, pc in ((0.055, 0.0), (0.06, 0.0), (0.075, 0.02), (0.16, 0.10)):
        assert difference_rates(ACC_DROP_5_POINTS, n, pb, pc)[0] <= NOMINAL
    # meets by half a point and one point: fail at most 2.5%
    for pb, pc in ((0.045, 0.0), (0.04, 0.0), (0.065, 0.02), (0.14, 0.10)):
        assert difference_rates(ACC_DROP_5_POINTS, n, pb, pc)[1] <= NOMINAL
    # identical models (0 discordant pairs ever): nothing fails; at these n nothing passes
    assert difference_rates(ACC_DROP_5_POINTS, n, 0.0, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize("n", SMALL)
def test_no_increase_rule(n):
    # on the limit (no change) both errors, with churn and one-way
    for h in (0.01, 0.05, 0.2):
        p_pass, p_fail = difference_rates(UNSAFE_NO_INCREASE, n, h, h)
        assert p_pass <= NOMINAL and p_fail <= NOMINAL
    # a candidate that only adds unsafe answers (+1 point, +5 points) passes at most 2.5%
    for pc in (0.01, 0.05):
        assert difference_rates(UNSAFE_NO_INCREASE, n, 0.0, pc)[0] <= NOMINAL
    # 0 events (neither model ever complies): never a fail, never a pass
    assert difference_rates(UNSAFE_NO_INCREASE, n, 0.0, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize("n", SMALL)
@pytest.mark.parametrize(
    "base_churn", [(0.7, 0.0), (0.7, 0.02), (0.7, 0.10), (0.3, 0.0), (0.9, 0.05)]
)
def test_relative_change_at_and_near_the_limit(n, base_churn):
    base, h = base_churn
    limit = -0.05 * base  # -5% relative as a change in points
    for offset, error in ((0.0, "both"), (-0.005, "pass"), (-0.01, "pass"), (0.01, "fail")):
        delta = limit + offset
        probs = paired(base, h + max(-delta, 0), h + max(delta, 0))
        p_pass, p_fail = ratio_rates(ACC_DROP_5_RELATIVE, n, probs)
        if error in ("both", "pass"):
            assert p_pass <= NOMINAL, (offset, p_pass)
        if error in ("both", "fail"):
            assert p_fail <= NOMINAL, (offset, p_fail)


def test_relative_change_with_identical_models_never_decides_wrongly():
    for n in SMALL:
        _, p_fail = ratio_rates(ACC_DROP_5_RELATIVE, n, paired(0.7, 0.0, 0.0))
        assert p_fail == 0.0


def test_relative_change_at_the_limit_larger_n_seeded_monte_carlo():
    """n = 200 (outcome space too large to enumerate in a test): within binomial error."""
    rng = np.random.default_rng(20240909)
    n, reps = 200, 40_000
    counts = rng.multinomial(n, paired(0.7, 0.035, 0.0), size=reps)  # one-way, at the limit
    low, high = paired_ratio_ci(counts[:, 0], counts[:, 1], counts[:, 2], n)
    words = verdicts(ACC_DROP_5_RELATIVE, low, high)
    for rate in ((words == "pass").mean(), (words == "fail").mean()):
        assert rate <= NOMINAL + 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / reps)


# --------------------------------------------------------------------------- between the sizes
# Discrete outcomes make the error saw-tooth in n. The benchmark's every-n scan found that
# with a continuity correction of 1/2 the wrong *fail* exceeded 2.5% at many n between its
# eight sizes when almost every discordant pair goes one way (compression damage): Tango up
# to 3.49% (n = 117, b = 5.63%, c = 0.63%), Tang up to 2.92% (n = 110, baseline 0.9, churn
# 1%). The kit's correction of 1 removes every excess the scan found; these are those cells.

ONE_WAY_CHURN = (0.004, 0.0056, 0.007, 0.01, 0.02)


@pytest.mark.parametrize("n", [79, 100, 117, 131, 146])
def test_change_in_points_wrong_pass_stays_nominal_between_the_benchmark_sizes(n):
    for h in ONE_WAY_CHURN:
        assert difference_rates(ACC_DROP_5_POINTS, n, 0.05 + h, h)[0] <= NOMINAL


def test_change_in_points_wrong_fail_at_n_117_one_way_discordance():
    assert difference_rates(ACC_DROP_5_POINTS, 117, 0.05 + 0.0056, 0.0056)[1] <= NOMINAL


def test_relative_change_wrong_fail_at_n_110_one_way_discordance():
    assert ratio_rates(ACC_DROP_5_RELATIVE, 110, paired(0.9, 0.055, 0.01))[1] <= NOMINAL


def test_relative_change_wrong_pass_stays_nominal_at_n_110():
    assert ratio_rates(ACC_DROP_5_RELATIVE, 110, paired(0.9, 0.055, 0.01))[0] <= NOMINAL


# --------------------------------------------------------------------------- the kit's path


def test_the_evidence_carries_exactly_the_intervals_calibrated_here():
    """compare_models + evaluate_rules give the verdicts computed above from the counts."""
    rng = np.random.default_rng(3)
    n, k = 15, 60
    base = (rng.random(n) < 0.7).astype(float)
    flips = rng.random((k, n)) < rng.uniform(0, 0.4, size=(k, 1))
    cands = np.where(flips, 1 - base, base)
    names = [f"c{j}" for j in range(k)]
    outcomes = pd.DataFrame(
        {
            "model": np.repeat(["base", *names], n),
            "item_id": np.tile([f"i{i}" for i in range(n)], k + 1),
            "repeat": 0,
            "task": "classification",
            "correct": np.concatenate([base, *cands]),
        }
    )
    evidence = compare_models(outcomes, baseline="base")
    rules = [ACC_AT_LEAST_60, ACC_DROP_5_POINTS, ACC_DROP_5_RELATIVE]
    got = evaluate_rules(rules, evidence=evidence).set_index(["candidate", "rule"])["verdict"]
    b = ((base == 1) & (cands == 0)).sum(axis=1)
    c = ((base == 0) & (cands == 1)).sum(axis=1)
    both = ((base == 1) & (cands == 1)).sum(axis=1)
    expected = {
        ACC_AT_LEAST_60: verdicts(ACC_AT_LEAST_60, *proportion_ci(both + c, n)),
        ACC_DROP_5_POINTS: verdicts(ACC_DROP_5_POINTS, *paired_difference_ci(b, c, n)),
        ACC_DROP_5_RELATIVE: verdicts(ACC_DROP_5_RELATIVE, *paired_ratio_ci(both, b, c, n)),
    }
    for rule, words in expected.items():
        assert [got[(name, rule.text)] for name in names] == list(words), rule.text
