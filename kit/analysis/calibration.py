"""Stage 4: confidence and calibration, selective prediction and abstention.

Compression changes how confidently a model fails. This module turns stored outputs and
scored outcomes into tidy frames; :mod:`kit.report.charts.calibration` only draws them.

Confidence sources (:func:`confidence_frame`, ``source=``)
------------------------------------------------------------
``choice``
    ``choice_confidence``: the normalised probability of the highest-scoring option
    (classification / multiple choice scored by logprob). The prediction it belongs to is
    that argmax option, so correctness is ``choice_correct`` (``correct`` where the outcome
    table has no ``choice_correct`` for the row, e.g. a failed request).
``mean_token`` / ``min_token``
    ``mean_token_prob`` / ``min_token_prob`` of the generated answer; correctness ``correct``.
``verbalized``
    a confidence the model states in its output, parsed with :data:`VERBALIZED_CONFIDENCE`
    (see :func:`parse_verbalized_confidence`); correctness ``correct``.
``reported``
    the ``confidence`` column (reported by the runtime itself, e.g. a predictions file).
``auto``
    ``choice`` where a row has a choice confidence, else ``mean_token``.

Rows without a confidence keep ``confidence = NaN``; :func:`missing_confidence` counts them
and every metric reports the ``n`` it used, so nothing is dropped silently.

Binning (:func:`reliability_table`)
-----------------------------------
``strategy="uniform"`` uses the edges ``k / n_bins``; ``strategy="quantile"`` uses the
quantiles of the confidences (``numpy.quantile``, linear interpolation) at ``k / n_bins``:
equal-mass (adaptive) bins. A prediction with confidence ``p`` goes to bin ``b`` when
``edges[b] < p <= edges[b + 1]`` (the first bin also holds ``p == edges[0]``), the
convention of scikit-learn's ``calibration_curve``. Empty bins are omitted from every
table and never enter an average.

Metrics (``gap = mean_confidence - accuracy``; positive = over-confident)
------------------------------------------------------------------------
``ece``
    ``sum_b n_b / N * |gap_b|`` over uniform bins; ``ece_adaptive`` the same over quantile
    bins; ``mce`` ``max_b |gap_b|`` over non-empty uniform bins; ``brier`` ``mean((p - y)**2)``.
``accuracy_at_80_coverage``
    accuracy on the predictions kept by the highest confidence threshold that still keeps
    at least 80% of them (see :func:`accuracy_at_coverage`).

Example
-------
>>> conf = confidence_frame(outputs, outcomes, source="auto")              # doctest: +SKIP
>>> calibration_metrics(conf)                                              # doctest: +SKIP
>>> calibration_comparison(conf, baseline="base", n_resamples=1000)        # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from kit.analysis.compare import OVERALL, RESULT_COLUMNS, compare_models
from kit.errors import CompkitError
from kit.evalset import EvalItem
from kit.metrics import BOOTSTRAP_MIN_N
from kit.scoring.normalize import fold
from kit.stats.bootstrap import bca_quantiles, weight_blocks, zero_change_bound

SOURCES = ("auto", "choice", "mean_token", "min_token", "verbalized", "reported")
STRATEGIES = ("uniform", "quantile")
_CAL = "calibration_metrics"
#: Columns of :func:`confidence_frame`.
CONFIDENCE_COLUMNS = ["model", "item_id", "repeat", "task", "source", "confidence", "correct"]
#: Columns of :func:`reliability_table`.
BIN_COLUMNS = ["bin", "lower", "upper", "n", "mean_confidence", "accuracy", "gap"]
#: Default confidence buckets of :func:`confidence_buckets` (left-closed, last one closed).
BUCKET_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Calibration metrics computed by :func:`calibration_metrics` and compared by
#: :func:`calibration_comparison`, in display order (coverage metric appended).
BINNED_METRICS = ("ece", "ece_adaptive", "mce", "brier")
CHOICE_TASKS = ("classification", "multiple_choice")
ABSTENTION_COLUMNS = ("not_found_correct", "hallucinated_field_rate", "admits_uncertainty")
#: Metric names of :func:`abstention_metrics` / :func:`abstention_comparison`.
ABSTENTION_METRICS = ("not_found_correct", "hallucinated_field_rate", "admits_uncertainty_rate")
#: Metric name of the accuracy at the study's coverage (the coverage is a parameter).
COVERAGE_METRIC = "accuracy_at_coverage"
#: Groups of the grouped jackknife behind the BCa acceleration of binned statistics.
JACKKNIFE_GROUPS = 20

# --------------------------------------------------------------------------- verbalized

#: Stated confidences: "Confidence: 80%", "confidence = 0.8", "Konfidenz: 75 %",
#: "confianza: 90", "I am 85% confident/sure". A value with ``%``/``percent`` or above 1 is a
#: percentage; values above 100 are rejected. The last statement in the text wins.
VERBALIZED_CONFIDENCE = re.compile(
    r"(?:\b(?:confidence|confianza|konfidenz|confiance|certainty|sicherheit)"
    r"(?:\s+(?:level|score|nivel|niveau))?\s*(?:[:=]|is|of|est|es|ist)?\s*"
    r"(?P<a>\d{1,3}(?:[.,]\d+)?)\s*(?P<pa>%|percent|por\s*ciento|prozent|pour\s*cent)?)"
    r"|(?:\b(?P<b>\d{1,3}(?:[.,]\d+)?)\s*(?P<pb>%|percent)\s+(?:confident|sure|certain)\b)",
    re.IGNORECASE,
)


def parse_verbalized_confidence(text: str | None) -> float:
    """The confidence a model states in ``text``, in [0, 1]; NaN when there is none.

    Uses :data:`VERBALIZED_CONFIDENCE`; the last match counts.

    Examples
    --------
    >>> parse_verbalized_confidence("Answer: B. Confidence: 80%")
    0.8
    >>> parse_verbalized_confidence("confidence: 0.65")
    0.65
    >>> parse_verbalized_confidence("no number here")
    nan
    """
    if not isinstance(text, str):
        return math.nan
    matches = list(VERBALIZED_CONFIDENCE.finditer(text))
    if not matches:
        return math.nan
    m = matches[-1]
    raw, percent = (m["a"], m["pa"]) if m["a"] is not None else (m["b"], m["pb"])
    value = float(raw.replace(",", "."))
    if percent or value > 1:
        value /= 100
    return value if 0 <= value <= 1 else math.nan


# --------------------------------------------------------------------------- confidence frame


def confidence_frame(
    outputs: pd.DataFrame, outcomes: pd.DataFrame, *, source: str = "auto"
) -> pd.DataFrame:
    """Per (model, item, repeat): the confidence of a prediction and whether it was right.

    Parameters
    ----------
    outputs
        Stored output rows (:data:`kit.execute.OUTPUT_COLUMNS`), e.g.
        :func:`kit.stages.candidates.stored_outputs`.
    outcomes
        Outcome table of :func:`kit.scoring.score_outputs` for the same rows.
    source
        One of :data:`SOURCES`; see the module docstring.

    Returns
    -------
    DataFrame
        :data:`CONFIDENCE_COLUMNS`, one row per outcome row. ``source`` says which source
        gave the row's confidence (``"none"`` where it is missing); ``confidence`` is NaN
        there and the row is counted by :func:`missing_confidence`.
    """
    if source not in SOURCES:
        raise CompkitError(f"confidence source {source!r} is not one of {list(SOURCES)}")
    key = ["model", "item_id", "repeat"]
    for name, frame, needed in (
        ("outputs", outputs, key),
        ("outcomes", outcomes, [*key, "correct"]),
    ):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise CompkitError(f"{name} lack column(s) {missing}; columns: {list(frame.columns)}")
    if outputs.duplicated(key).any():
        dup = outputs.loc[outputs.duplicated(key), key].head(3).values.tolist()
        raise CompkitError(f"outputs repeat (model, item_id, repeat) keys, e.g. {dup}")
    cols = [c for c in _SOURCE_COLUMNS if c in outputs.columns]
    merged = outcomes.merge(outputs[[*key, *cols]], on=key, how="left", validate="one_to_one")
    conf, correct, used = _pick_source(merged, source)
    bad = np.flatnonzero((conf < 0) | (conf > 1))
    if bad.size:
        row = merged.iloc[bad[0]]
        raise CompkitError(
            f"{bad.size} {source} confidence(s) outside [0, 1], e.g. {conf[bad[0]]} for model "
            f"{row['model']!r}, item {row['item_id']!r}, repeat {row['repeat']}; confidences "
            "must be probabilities (a 0-100 scale must be divided by 100)"
        )
    out = merged[key].copy()
    out["task"] = merged["task"] if "task" in merged.columns else None
    out["source"] = np.where(np.isnan(conf), "none", used)
    out["confidence"] = conf
    out["correct"] = correct
    return out[CONFIDENCE_COLUMNS].reset_index(drop=True)


_SOURCE_COLUMNS = ("choice_confidence", "mean_token_prob", "min_token_prob", "confidence", "output")


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)


def _pick_source(merged: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    correct = _numeric(merged, "correct")
    choice = _numeric(merged, "choice_confidence")
    choice_correct = _numeric(merged, "choice_correct")
    choice_correct = np.where(np.isnan(choice_correct), correct, choice_correct)
    n = len(merged)
    if source in ("choice", "auto"):
        if source == "choice":
            return choice, np.where(np.isnan(choice), correct, choice_correct), np.full(n, "choice")
        mean = _numeric(merged, "mean_token_prob")
        has = ~np.isnan(choice)
        used = np.where(has, "choice", "mean_token")
        return np.where(has, choice, mean), np.where(has, choice_correct, correct), used
    if source == "verbalized":
        texts = merged["output"] if "output" in merged.columns else pd.Series([None] * n)
        conf = np.array([parse_verbalized_confidence(t) for t in texts], dtype=np.float64)
    else:
        column = {"mean_token": "mean_token_prob", "min_token": "min_token_prob"}.get(
            source, "confidence"
        )
        conf = _numeric(merged, column)
    return conf, correct, np.full(n, source)


def missing_confidence(
    conf_frame: pd.DataFrame, *, by: Sequence[str] = ("model", "task")
) -> pd.DataFrame:
    """How many predictions have no confidence (or no correctness) per group.

    Returns
    -------
    DataFrame
        ``*by, n, with_confidence, missing, missing_share``.
    """
    usable = conf_frame["confidence"].notna() & conf_frame["correct"].notna()
    frame = conf_frame.assign(usable_predictions=usable)
    out = (
        frame.groupby(list(by), sort=True, dropna=False)["usable_predictions"]
        .agg(n="size", with_confidence="sum")
        .reset_index()
    )
    out["missing"] = out["n"] - out["with_confidence"]
    out["missing_share"] = out["missing"] / out["n"]
    return out


# --------------------------------------------------------------------------- binning


def _check_yp(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    yy = np.asarray(y, dtype=np.float64).ravel()
    pp = np.asarray(p, dtype=np.float64).ravel()
    if yy.shape != pp.shape:
        raise CompkitError(
            f"y has {yy.size} values and p {pp.size}; give one of each per prediction"
        )
    for name, values in (("p (confidence)", pp), ("y (correctness)", yy)):
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
        if bad.size:
            raise CompkitError(
                f"{name} must be finite and in [0, 1]; position {bad[0]} is {values[bad[0]]} "
                f"({bad.size} bad value(s)). Drop rows without a confidence first "
                "(missing_confidence counts them)"
            )
    return yy, pp


def _check_bins(n_bins: int, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise CompkitError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}")
    if int(n_bins) != n_bins or n_bins < 1:
        raise CompkitError(f"n_bins must be a positive integer, got {n_bins}")


def bin_edges(p: ArrayLike, *, n_bins: int = 10, strategy: str = "uniform") -> np.ndarray:
    """The ``n_bins + 1`` bin edges :func:`reliability_table` uses for confidences ``p``."""
    _check_bins(n_bins, strategy)
    levels = np.arange(n_bins + 1) / n_bins
    if strategy == "uniform":
        return levels
    pp = np.asarray(p, dtype=np.float64).ravel()
    return np.quantile(pp, levels) if pp.size else levels


def reliability_table(
    y: ArrayLike, p: ArrayLike, *, n_bins: int = 10, strategy: str = "uniform"
) -> pd.DataFrame:
    """Per non-empty confidence bin: count, mean confidence, accuracy and their gap.

    Parameters
    ----------
    y
        Correctness per prediction in [0, 1] (normally 0/1).
    p
        Confidence per prediction in [0, 1].
    n_bins, strategy
        ``"uniform"`` (edges ``k / n_bins``) or ``"quantile"`` (equal-mass bins); see the
        module docstring for which bin an edge value falls into.

    Returns
    -------
    DataFrame
        :data:`BIN_COLUMNS`: ``bin`` (0-based position among all ``n_bins``), its
        ``lower``/``upper`` edges, ``n``, ``mean_confidence``, ``accuracy`` and
        ``gap = mean_confidence - accuracy``. Empty bins are omitted.

    Examples
    --------
    >>> reliability_table([1, 0, 1, 1], [0.9, 0.9, 0.2, 0.6], n_bins=2)[["n", "gap"]].round(4).values.tolist()
    [[1.0, -0.8], [3.0, 0.1333]]
    """
    yy, pp = _check_yp(y, p)
    edges = bin_edges(pp, n_bins=n_bins, strategy=strategy)
    idx = np.searchsorted(edges[1:-1], pp, side="left")
    n = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=pp, minlength=n_bins)
    sum_y = np.bincount(idx, weights=yy, minlength=n_bins)
    keep = n > 0
    frame = pd.DataFrame(
        {
            "bin": np.arange(n_bins)[keep],
            "lower": edges[:-1][keep],
            "upper": edges[1:][keep],
            "n": n[keep],
            "mean_confidence": sum_p[keep] / n[keep],
            "accuracy": sum_y[keep] / n[keep],
        }
    )
    frame["gap"] = frame["mean_confidence"] - frame["accuracy"]
    return frame[BIN_COLUMNS]


def ece(y: ArrayLike, p: ArrayLike, *, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error: ``sum_b n_b / N * |gap_b|`` (NaN for no predictions).

    Examples
    --------
    >>> round(ece([1, 0, 1, 1], [0.9, 0.9, 0.2, 0.6], n_bins=2), 4)
    0.3
    """
    table = reliability_table(y, p, n_bins=n_bins, strategy=strategy)
    total = table["n"].sum()
    return float((table["n"] * table["gap"].abs()).sum() / total) if total else math.nan


def mce(y: ArrayLike, p: ArrayLike, *, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Maximum calibration error: the largest ``|gap|`` of a non-empty bin (NaN if none)."""
    table = reliability_table(y, p, n_bins=n_bins, strategy=strategy)
    return float(table["gap"].abs().max()) if len(table) else math.nan


def brier(y: ArrayLike, p: ArrayLike) -> float:
    """Brier score ``mean((p - y)**2)`` (NaN for no predictions).

    Examples
    --------
    >>> brier([1, 0], [0.8, 0.4])
    0.1
    """
    yy, pp = _check_yp(y, p)
    return float(np.mean((pp - yy) ** 2)) if yy.size else math.nan


# --------------------------------------------------------------------------- selective prediction


@dataclass(frozen=True)
class AccuracyThreshold:
    """The lowest confidence threshold whose kept predictions reach a target accuracy.

    ``threshold`` is NaN, ``coverage`` 0.0 and ``accuracy`` NaN when no threshold reaches
    the target (the model would have to abstain on everything).
    """

    target: float
    threshold: float
    coverage: float
    accuracy: float
    n: int


def risk_coverage(y: ArrayLike, p: ArrayLike) -> pd.DataFrame:
    """Selective prediction curve: answer only when confidence >= threshold.

    One row per distinct confidence (the threshold), from the highest threshold (lowest
    coverage) to the lowest (coverage 1). Ties are kept or dropped together.

    Returns
    -------
    DataFrame
        ``coverage, risk, accuracy, threshold, n``: share of predictions kept, error rate
        ``1 - accuracy`` and accuracy among them, the threshold, and how many are kept.

    Examples
    --------
    >>> risk_coverage([1, 1, 0, 1], [0.9, 0.8, 0.8, 0.3])[["coverage", "accuracy"]].round(4).values.tolist()
    [[0.25, 1.0], [0.75, 0.6667], [1.0, 0.75]]
    """
    yy, pp = _check_yp(y, p)
    order = np.argsort(-pp, kind="stable")
    ps, ys = pp[order], yy[order]
    kept = np.arange(1, ps.size + 1)
    last = np.r_[ps[1:] != ps[:-1], True] if ps.size else np.zeros(0, dtype=bool)
    n = kept[last]
    accuracy = np.cumsum(ys)[last] / n
    frame = pd.DataFrame(
        {
            "coverage": n / max(ps.size, 1),
            "risk": 1 - accuracy,
            "accuracy": accuracy,
            "threshold": ps[last],
            "n": n,
        }
    )
    return frame


def _needed(coverage: float, total: float) -> float:
    if not 0 < coverage <= 1:
        raise CompkitError(f"coverage must be in (0, 1], got {coverage}")
    return math.ceil(coverage * total - 1e-9)


def accuracy_at_coverage(y: ArrayLike, p: ArrayLike, *, coverage: float = 0.8) -> float:
    """Accuracy at the highest threshold that keeps at least ``coverage`` of the predictions.

    With ties the kept share can exceed ``coverage`` (tied predictions are kept together).
    NaN for no predictions.

    Examples
    --------
    >>> accuracy_at_coverage([1, 1, 0, 1, 0], [0.9, 0.8, 0.8, 0.6, 0.3], coverage=0.8)
    0.75
    """
    curve = risk_coverage(y, p)
    if curve.empty:
        return math.nan
    needed = _needed(coverage, int(curve["n"].iloc[-1]))
    return float(curve.loc[curve["n"] >= needed, "accuracy"].iloc[0])


def threshold_for_accuracy(y: ArrayLike, p: ArrayLike, *, target: float = 0.9) -> AccuracyThreshold:
    """The lowest confidence threshold whose kept predictions are at least ``target`` accurate.

    Lowest threshold = most coverage left. Accuracy need not rise with the threshold; every
    threshold is checked. Unreachable targets give ``threshold=NaN, coverage=0.0``.

    Examples
    --------
    >>> threshold_for_accuracy([1, 1, 0, 1, 0], [0.9, 0.8, 0.8, 0.6, 0.3], target=0.75)
    AccuracyThreshold(target=0.75, threshold=0.6, coverage=0.8, accuracy=0.75, n=4)
    """
    if not 0 <= target <= 1:
        raise CompkitError(f"target accuracy must be in [0, 1], got {target}")
    curve = risk_coverage(y, p)
    ok = curve[curve["accuracy"] >= target - 1e-12]
    if ok.empty:
        return AccuracyThreshold(float(target), math.nan, 0.0, math.nan, 0)
    row = ok.iloc[-1]
    return AccuracyThreshold(
        float(target),
        float(row["threshold"]),
        float(row["coverage"]),
        float(row["accuracy"]),
        int(row["n"]),
    )


# --------------------------------------------------------------------------- tidy per-group tables


def usable_predictions(conf_frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("model", "item_id", "confidence", "correct") if c not in conf_frame]
    if missing:
        raise CompkitError(
            f"the confidence frame lacks column(s) {missing}; build it with confidence_frame()"
        )
    keep = conf_frame["confidence"].notna() & conf_frame["correct"].notna()
    return conf_frame[keep]


def _grouped(
    frame: pd.DataFrame, by: Sequence[str]
) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    by = list(by)
    absent = [c for c in by if c not in frame.columns]
    if absent:
        raise CompkitError(f"group column(s) {absent} are not in the confidence frame")
    for key, part in frame.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        yield (
            dict(zip(by, key, strict=True)),
            part["correct"].to_numpy(dtype=np.float64),
            part["confidence"].to_numpy(dtype=np.float64),
        )


def _metric_values(y: np.ndarray, p: np.ndarray, *, n_bins: int, coverage: float | None) -> dict:
    values = {
        "ece": ece(y, p, n_bins=n_bins),
        "ece_adaptive": ece(y, p, n_bins=n_bins, strategy="quantile"),
        "mce": mce(y, p, n_bins=n_bins),
        "brier": brier(y, p),
    }
    if coverage is not None:
        values[COVERAGE_METRIC] = accuracy_at_coverage(y, p, coverage=coverage)
    return values


def calibration_metrics(
    conf_frame: pd.DataFrame,
    *,
    by: Sequence[str] = ("model",),
    n_bins: int = 10,
    coverage: float | None = 0.8,
) -> pd.DataFrame:
    """ECE (uniform and adaptive), MCE, Brier and accuracy at coverage per group.

    Parameters
    ----------
    conf_frame
        :func:`confidence_frame` output, optionally with slice columns joined on.
    by
        Group columns (``model`` first by convention), e.g. ``("model", "task")``.
    coverage
        Adds ``accuracy_at_<coverage>_coverage``; ``None`` leaves it out.

    Returns
    -------
    DataFrame
        ``*by, metric, value, n`` with ``n`` the predictions that have a confidence.
    """
    rows = []
    for key, y, p in _grouped(usable_predictions(conf_frame), by):
        for metric, value in _metric_values(y, p, n_bins=n_bins, coverage=coverage).items():
            rows.append({**key, "metric": metric, "value": value, "n": int(y.size)})
    return pd.DataFrame(rows, columns=[*by, "metric", "value", "n"])


def _with_slices(
    conf_frame: pd.DataFrame, slices_frame: pd.DataFrame | None, slice_columns: Sequence[str]
) -> pd.DataFrame:
    if not slice_columns:
        return conf_frame
    if slices_frame is None:
        present = [c for c in slice_columns if c not in conf_frame.columns]
        if present:
            raise CompkitError(
                f"slice column(s) {present} need a slices_frame (frozen/slices.parquet)"
            )
        return conf_frame
    from kit.analysis.slices import attach_slices

    return attach_slices(conf_frame, slices_frame, list(slice_columns))


def _slice_parts(
    frame: pd.DataFrame, slice_columns: Sequence[str]
) -> Iterator[tuple[str, str, pd.DataFrame]]:
    yield OVERALL[0], OVERALL[1], frame
    for column in slice_columns:
        for value, part in frame.dropna(subset=[column]).groupby(column, sort=True):
            yield column, str(value), part


def reliability_bins(
    conf_frame: pd.DataFrame,
    *,
    slices_frame: pd.DataFrame | None = None,
    slice_columns: Sequence[str] = (),
    n_bins: int = 10,
    strategies: Sequence[str] = STRATEGIES,
) -> pd.DataFrame:
    """:func:`reliability_table` per model, slice and strategy, in one long frame.

    Returns
    -------
    DataFrame
        ``model, slice, slice_value, strategy`` + :data:`BIN_COLUMNS`, with the rows over
        every item as ``slice="overall", slice_value="all"``; empty bins omitted.
    """
    frame = _with_slices(usable_predictions(conf_frame), slices_frame, slice_columns)
    parts = []
    for slice_name, slice_value, part in _slice_parts(frame, slice_columns):
        for key, y, p in _grouped(part, ["model"]):
            for strategy in strategies:
                table = reliability_table(y, p, n_bins=n_bins, strategy=strategy)
                parts.append(
                    table.assign(
                        model=key["model"],
                        slice=slice_name,
                        slice_value=slice_value,
                        strategy=strategy,
                    )
                )
    columns = ["model", "slice", "slice_value", "strategy", *BIN_COLUMNS]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def confidence_buckets(
    conf_frame: pd.DataFrame, *, edges: Sequence[float] = BUCKET_EDGES
) -> pd.DataFrame:
    """Confidence bucket -> n, real accuracy, mean confidence and gap, for every model.

    Buckets are left-closed (``[0.8, 0.9)``), the last one closed (``[0.9, 1.0]``), so a
    product owner reads "confidence >= 0.9" off one row. Every model gets every bucket, in
    the same order, so baseline and candidates line up; an empty bucket has ``n = 0`` and
    NaN statistics.

    Returns
    -------
    DataFrame
        ``model, bucket, lower, upper, n, share, accuracy, mean_confidence, gap`` where
        ``share`` is the model's share of predictions in the bucket.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0) or e[0] != 0 or e[-1] != 1:
        raise CompkitError(f"bucket edges must increase strictly from 0 to 1, got {list(edges)}")
    labels = [
        f"[{lo:.2f}, {hi:.2f}{']' if i == e.size - 2 else ')'}"
        for i, (lo, hi) in enumerate(itertools.pairwise(e))
    ]
    rows = []
    for key, y, p in _grouped(usable_predictions(conf_frame), ["model"]):
        idx = np.clip(np.searchsorted(e, p, side="right") - 1, 0, e.size - 2)
        n = np.bincount(idx, minlength=e.size - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.bincount(idx, weights=y, minlength=e.size - 1) / n
            mean = np.bincount(idx, weights=p, minlength=e.size - 1) / n
        for b, label in enumerate(labels):
            rows.append(
                {
                    "model": key["model"],
                    "bucket": label,
                    "lower": e[b],
                    "upper": e[b + 1],
                    "n": int(n[b]),
                    "share": n[b] / max(y.size, 1),
                    "accuracy": acc[b],
                    "mean_confidence": mean[b],
                    "gap": mean[b] - acc[b],
                }
            )
    columns = [
        "model",
        "bucket",
        "lower",
        "upper",
        "n",
        "share",
        "accuracy",
        "mean_confidence",
        "gap",
    ]
    return pd.DataFrame(rows, columns=columns)


def risk_coverage_curves(
    conf_frame: pd.DataFrame, *, by: Sequence[str] = ("model",)
) -> pd.DataFrame:
    """:func:`risk_coverage` per group: ``*by, coverage, risk, accuracy, threshold, n``."""
    parts = [
        risk_coverage(y, p).assign(**key)
        for key, y, p in _grouped(usable_predictions(conf_frame), by)
    ]
    columns = [*by, "coverage", "risk", "accuracy", "threshold", "n"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def selective_table(
    conf_frame: pd.DataFrame,
    *,
    by: Sequence[str] = ("model",),
    coverage: float = 0.8,
    target_accuracy: float = 0.9,
) -> pd.DataFrame:
    """Per group: accuracy at ``coverage`` and the threshold that reaches ``target_accuracy``.

    Returns
    -------
    DataFrame
        ``*by, n, coverage_target, accuracy_at_coverage, target_accuracy, threshold,
        coverage_left, accuracy_at_threshold`` (:func:`accuracy_at_coverage`,
        :func:`threshold_for_accuracy`; an unreachable target gives a NaN threshold and
        ``coverage_left = 0``).
    """
    rows = []
    for key, y, p in _grouped(usable_predictions(conf_frame), by):
        pick = threshold_for_accuracy(y, p, target=target_accuracy)
        rows.append(
            {
                **key,
                "n": int(y.size),
                "coverage_target": coverage,
                "accuracy_at_coverage": accuracy_at_coverage(y, p, coverage=coverage),
                "target_accuracy": target_accuracy,
                "threshold": pick.threshold,
                "coverage_left": pick.coverage,
                "accuracy_at_threshold": pick.accuracy,
            }
        )
    columns = [
        *by,
        "n",
        "coverage_target",
        "accuracy_at_coverage",
        "target_accuracy",
        "threshold",
        "coverage_left",
        "accuracy_at_threshold",
    ]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- weighted statistics
#
# The bootstrap recomputes each binned statistic per resample. A resample is a vector of
# item weights (counts); rows are sorted by confidence once per model, so every statistic is
# a difference of cumulative weighted sums at bin boundaries - (resamples x rows) arrays,
# a block of resamples at a time.


@dataclass
class _Sorted:
    """One model's usable predictions sorted by confidence (ascending)."""

    p: np.ndarray
    y: np.ndarray
    item: np.ndarray  # item index of each row (repeats share their item's weight)
    starts: np.ndarray  # first row of each distinct confidence

    @classmethod
    def build(cls, p: np.ndarray, y: np.ndarray, item: np.ndarray) -> _Sorted:
        order = np.argsort(p, kind="stable")
        ps = p[order]
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        return cls(ps, y[order], item[order], starts)


def _rowwise_searchsorted(a: np.ndarray, v: np.ndarray, side: str) -> np.ndarray:
    """``searchsorted(a[r], v[r])`` for every row r of the non-decreasing rows of ``a``.

    A loop over rows of views: O(rows * queries * log width) and no temporary of a's size.
    """
    out = np.empty(v.shape, dtype=np.int64)
    for r in range(a.shape[0]):
        out[r] = np.searchsorted(a[r], v[r], side=side)
    return out


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.zeros((values.shape[0], values.shape[1] + 1))
    np.cumsum(values, axis=1, out=out[:, 1:])
    return out


def _binned(cw: np.ndarray, cd: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin weights and weighted sums of (p - y) from prefix sums and row bounds."""
    if bounds.ndim == 1:
        return cw[:, bounds[1:]] - cw[:, bounds[:-1]], cd[:, bounds[1:]] - cd[:, bounds[:-1]]
    hi, lo = bounds[:, 1:], bounds[:, :-1]
    count = np.take_along_axis(cw, hi, axis=1) - np.take_along_axis(cw, lo, axis=1)
    diff = np.take_along_axis(cd, hi, axis=1) - np.take_along_axis(cd, lo, axis=1)
    return count, diff


def _quantile_bounds(s: _Sorted, cw: np.ndarray, n_bins: int) -> np.ndarray:
    """Row bounds of equal-mass bins per resample: np.quantile (linear) on the resample."""
    total = cw[:, -1:]
    h = np.maximum(total - 1, 0) * (np.arange(1, n_bins) / n_bins)[None, :]
    lo = np.floor(h)
    frac = h - lo
    hi = np.minimum(lo + 1, np.maximum(total - 1, 0))
    m = s.p.size
    x_lo = s.p[np.minimum(_rowwise_searchsorted(cw[:, 1:], lo, "right"), m - 1)]
    x_hi = s.p[np.minimum(_rowwise_searchsorted(cw[:, 1:], hi, "right"), m - 1)]
    diff = x_hi - x_lo
    edges = np.where(frac >= 0.5, x_hi - diff * (1 - frac), x_lo + diff * frac)
    pos = np.searchsorted(s.p, edges, side="right")
    rows = cw.shape[0]
    return np.hstack([np.zeros((rows, 1), dtype=np.int64), pos, np.full((rows, 1), m)])


def _weighted_metrics(
    s: _Sorted, w_items: np.ndarray, *, n_bins: int, coverage: float | None
) -> dict[str, np.ndarray]:
    """Every calibration metric for each row of item weights ``w_items`` (R x items)."""
    w = w_items[:, s.item]
    d = s.p - s.y
    cw, cd = _prefix(w), _prefix(w * d)
    total = cw[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        uniform = np.r_[
            0, np.searchsorted(s.p, np.arange(1, n_bins) / n_bins, side="right"), s.p.size
        ]
        count, diff = _binned(cw, cd, uniform)
        gap = np.where(count > 0, np.abs(diff) / np.where(count > 0, count, 1), -np.inf)
        out = {
            "ece": np.abs(diff).sum(axis=1) / total,
            "ece_adaptive": np.abs(_binned(cw, cd, _quantile_bounds(s, cw, n_bins))[1]).sum(axis=1)
            / total,
            "mce": gap.max(axis=1),
            "brier": (w @ (d * d)) / total,
        }
        if coverage is not None:
            out[COVERAGE_METRIC] = _weighted_accuracy_at(s, w, cw, total, coverage)
    empty = total <= 0
    for values in out.values():
        values[empty] = np.nan
    return out


def _weighted_accuracy_at(
    s: _Sorted, w: np.ndarray, cw: np.ndarray, total: np.ndarray, coverage: float
) -> np.ndarray:
    cy = _prefix(w * s.y)
    needed = np.ceil(coverage * total - 1e-9)
    dropped = cw[:, s.starts]  # weight below each distinct confidence
    group = _rowwise_searchsorted(dropped, (total - needed)[:, None], "right")[:, 0] - 1
    start = s.starts[np.maximum(group, 0)]
    rows = np.arange(w.shape[0])
    kept = total - cw[rows, start]
    return (cy[rows, -1] - cy[rows, start]) / kept


# --------------------------------------------------------------------------- paired comparison


@dataclass
class _Pair:
    """One (candidate, slice value): the paired predictions of both models."""

    model: str
    slice: str
    slice_value: str
    base: _Sorted
    cand: _Sorted
    n: int
    base_key: tuple  # equal keys: the same baseline predictions (statistics computed once)
    changed: int = 0  # predictions whose confidence or correctness differ between the models


def _pairs(
    frame: pd.DataFrame,
    *,
    baseline: str,
    models: Sequence[str],
    slice_columns: Sequence[str],
    item_index: Mapping[Any, int],
) -> list[_Pair]:
    key = ["item_id", "repeat"]
    base = frame[frame["model"] == baseline]
    full = {(name, value): len(part) for name, value, part in _slice_parts(base, slice_columns)}
    out = []
    for model in models:
        cand = frame.loc[frame["model"] == model, [*key, "confidence", "correct"]]
        joined = base.merge(cand, on=key, how="inner", suffixes=("", "_c"), validate="one_to_one")
        joined = joined[joined["item_id"].isin(item_index)]
        for slice_name, slice_value, part in _slice_parts(joined, slice_columns):
            if part.empty:
                continue
            item = part["item_id"].map(item_index).to_numpy(dtype=np.int64)

            def side(suffix: str, part: pd.DataFrame = part, item: np.ndarray = item) -> _Sorted:
                p = part[f"confidence{suffix}"].to_numpy(dtype=np.float64)
                return _Sorted.build(p, part[f"correct{suffix}"].to_numpy(dtype=np.float64), item)

            where = (slice_name, slice_value)
            base_key = where if len(part) == full[where] else (model, *where)
            changed = int(
                (
                    (part["confidence"] != part["confidence_c"])
                    | (part["correct"] != part["correct_c"])
                )
                .to_numpy()
                .sum()
            )
            out.append(
                _Pair(
                    model,
                    slice_name,
                    slice_value,
                    side(""),
                    side("_c"),
                    len(part),
                    base_key,
                    changed,
                )
            )
    return out


def calibration_comparison(
    conf_frame: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    slices_frame: pd.DataFrame | None = None,
    slice_columns: Sequence[str] = (),
    n_bins: int = 10,
    coverage: float | None = 0.8,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_cells: int = 2**21,
) -> pd.DataFrame:
    """Calibration metrics of each candidate minus the baseline, with paired bootstrap CIs.

    Pairs are the (item, repeat) predictions where both models have a confidence and a
    correctness. Items are resampled jointly: one set of item weights per resample serves
    every candidate, slice, metric and both models (a repeat carries its item's weight), so
    it is a cluster bootstrap over items. The weights come from the same generator as
    :func:`kit.analysis.compare.paired_bootstrap` (``method="indices"``: ``n`` draws of item
    positions, ``block`` resamples at a time with at most ``max_cells`` weights held), and
    because ECE is not a per-item mean every binned statistic - quantile bin edges included
    - is recomputed on each resample with weighted prefix sums, vectorised over a block.

    Parameters
    ----------
    conf_frame
        :func:`confidence_frame` output for the baseline and the candidates.
    baseline, candidates
        Model names; ``candidates=None`` takes every other model.
    slices_frame, slice_columns
        Item table (``id`` + slice columns, ``frozen/slices.parquet``) and the columns to
        report per value (each column on its own; items without a value skip that column).
    n_bins, coverage
        As in :func:`calibration_metrics`.
    n_resamples, confidence, seed
        Number of resamples, CI level (percentile interval), RNG seed.

    Returns
    -------
    DataFrame
        :data:`kit.analysis.compare.RESULT_COLUMNS`; ``delta = value - baseline_value`` and
        ``ci_low, ci_high`` bound it. ``p_value`` is the two-sided bootstrap p-value
        ``min(1, 2 * min(P*(delta <= 0), P*(delta >= 0)))`` over the resamples (an
        approximation that inverts the percentile interval). Resamples where a slice has no
        pairs are skipped.
    """
    _check_bins(n_bins, "uniform")
    if coverage is not None:
        _needed(coverage, 1)
    if not 0 < confidence < 1:
        raise CompkitError(f"confidence (CI level) must be in (0, 1), got {confidence}")
    frame = _with_slices(usable_predictions(conf_frame), slices_frame, slice_columns)
    models = _candidates(frame, baseline=baseline, candidates=candidates)
    items = np.sort(frame.loc[frame["model"] == baseline, "item_id"].unique())
    index = {item: i for i, item in enumerate(items)}
    pairs = _pairs(
        frame, baseline=baseline, models=models, slice_columns=slice_columns, item_index=index
    )
    ones = np.ones((1, len(items)))
    points = [
        (
            _weighted_metrics(pr.base, ones, n_bins=n_bins, coverage=coverage),
            _weighted_metrics(pr.cand, ones, n_bins=n_bins, coverage=coverage),
        )
        for pr in pairs
    ]
    stats = _bootstrap_stats(
        pairs,
        n_items=len(items),
        n_bins=n_bins,
        coverage=coverage,
        n_resamples=n_resamples,
        seed=seed,
        max_cells=max_cells,
    )
    return _comparison_frame(pairs, points, stats, confidence, n_resamples)


def _candidates(frame: pd.DataFrame, *, baseline: str, candidates) -> list[str]:
    present = list(dict.fromkeys(frame["model"]))
    if baseline not in present:
        raise CompkitError(
            f"baseline {baseline!r} has no predictions with a confidence; models: {present}"
        )
    chosen = (
        [m for m in present if m != baseline]
        if candidates is None
        else ([candidates] if isinstance(candidates, str) else list(candidates))
    )
    unknown = [m for m in chosen if m not in present]
    if unknown:
        raise CompkitError(
            f"candidate(s) {unknown} have no predictions with a confidence; models: {present}"
        )
    return chosen


def _bootstrap_stats(
    pairs: list[_Pair],
    *,
    n_items: int,
    n_bins: int,
    coverage: float | None,
    n_resamples: int,
    seed: int,
    max_cells: int,
) -> list[dict[str, np.ndarray]]:
    """Per pair and metric: (R + G, 3) resampled (value, delta, relative change) rows, the
    last G rows from the grouped jackknife (item groups left out in turn)."""
    if n_resamples < 1:
        raise CompkitError(f"n_resamples must be >= 1, got {n_resamples}")
    out: list[dict[str, np.ndarray]] = [{} for _ in pairs]
    if not pairs:
        return out
    rng = np.random.default_rng(seed)
    rows = max(max(pr.n for pr in pairs), n_items)
    blocks = list(
        weight_blocks(
            rng,
            method="indices",
            n_rows=n_items,
            counts=np.ones(n_items, dtype=np.int64),
            n_resamples=n_resamples,
            max_cells=max(max_cells * n_items // rows, n_items),
        )
    )
    groups = np.arange(n_items) % min(JACKKNIFE_GROUPS, n_items)
    blocks.append((groups[None, :] != np.arange(groups.max() + 1)[:, None]).astype(np.float64))
    total = n_resamples + groups.max() + 1
    done = 0
    for weights in blocks:
        size = weights.shape[0]
        cache: dict[tuple, dict[str, np.ndarray]] = {}
        for pr, store in zip(pairs, out, strict=True):
            if pr.base_key not in cache:
                cache[pr.base_key] = _weighted_metrics(
                    pr.base, weights, n_bins=n_bins, coverage=coverage
                )
            base = cache[pr.base_key]
            cand = _weighted_metrics(pr.cand, weights, n_bins=n_bins, coverage=coverage)
            for metric, values in cand.items():
                with np.errstate(invalid="ignore", divide="ignore"):
                    rel = (values - base[metric]) / base[metric]
                block = np.stack([values, values - base[metric], rel], axis=1)
                store.setdefault(metric, np.empty((total, 3)))[done : done + size] = block
        done += size
    return out


def _acceleration(jack: np.ndarray) -> np.ndarray:
    """Jackknife acceleration per column (Efron 1987) from leave-group-out estimates."""
    u = np.nanmean(jack, axis=0) - jack
    s2 = np.nansum(u**2, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s2 > 0, np.nansum(u**3, axis=0) / (6 * s2**1.5), 0.0)


#: Most a binned statistic can move per changed prediction, as a share of all predictions:
#: ECE (fixed bins) sums |bin gap| weights, and one prediction moves two bins' sums by at most
#: 1/N each; Brier averages per-prediction losses in [0, 1].
UNCHANGED_WIDTH = {"ece": 2.0, "brier": 1.0}


def _unchanged_bounds(metric, point, low, high, n, confidence):
    """No prediction changed: bound the change by the share that could change (exact), or
    leave it undefined where the statistic has no such bound (MCE, quantile bins)."""
    low, high = low.copy(), high.copy()
    width = UNCHANGED_WIDTH.get(metric)
    if width is None:
        low[1:] = high[1:] = np.nan
        note = (
            "no prediction changed: a bootstrap cannot bound this statistic's change from "
            "identical predictions"
        )
        return low, high, note
    half = float(zero_change_bound(n, confidence=confidence, width=width))
    low[1], high[1] = point[1] - half, point[1] + half
    base = point[0] - point[1]
    rel_half = half / base if base > 0 else np.inf
    low[2], high[2] = point[2] - rel_half, point[2] + rel_half
    return low, high, ""


def _comparison_frame(
    pairs: list[_Pair],
    points: list,
    stats: list[dict[str, np.ndarray]],
    confidence: float,
    n_resamples: int,
) -> pd.DataFrame:
    rows = []
    for pr, (base, cand), boot in zip(pairs, points, stats, strict=True):
        for metric in cand:
            value, base_value = float(cand[metric][0]), float(base[metric][0])
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = (value - base_value) / base_value if base_value else math.nan
            point = np.array([value, value - base_value, rel])
            reps, jack = boot[metric][:n_resamples], boot[metric][n_resamples:]
            reps = np.where(np.isfinite(reps), reps, np.nan)
            low, high = bca_quantiles(reps, point, _acceleration(jack), confidence)
            d = reps[:, 1][np.isfinite(reps[:, 1])]
            p_value = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))) if d.size else math.nan
            note = ""
            bounded = pr.changed == 0 and metric in UNCHANGED_WIDTH
            change_method = "bounded_zero_change" if bounded else "bca_bootstrap"
            if pr.changed == 0:
                low, high, note = _unchanged_bounds(metric, point, low, high, pr.n, confidence)
            if pr.n < BOOTSTRAP_MIN_N:
                low = high = np.full(3, np.nan)
                note = (
                    f"fewer than {BOOTSTRAP_MIN_N} paired predictions: a bootstrap interval "
                    "is not trusted here"
                )
            rows.append(
                {
                    "model": pr.model,
                    "slice": pr.slice,
                    "slice_value": pr.slice_value,
                    "metric": metric,
                    "n": pr.n,
                    "value": value,
                    "value_ci_low": low[0],
                    "value_ci_high": high[0],
                    "baseline_value": base_value,
                    "delta": value - base_value,
                    "ci_low": low[1],
                    "ci_high": high[1],
                    "rel": rel,
                    "rel_ci_low": low[2],
                    "rel_ci_high": high[2],
                    "p_value": float(p_value),
                    "value_method": "bca_bootstrap",
                    "delta_method": change_method,
                    "rel_method": change_method,
                    "confidence": confidence,
                    "note": note,
                }
            )
    return pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)


# --------------------------------------------------------------------------- abstention

#: Phrases (regular expressions on case-folded text, ``'`` for any apostrophe) that admit
#: the answer is unknown or not in the context, per language. Matched in every language.
UNCERTAINTY_PHRASES: dict[str, tuple[str, ...]] = {
    "en": (
        r"\bi (?:don't|do not) know\b",
        r"\b(?:i'm|i am) not (?:sure|certain)\b",
        r"\bnot (?:mentioned|stated|specified|covered|included|given|provided) in the\b",
        r"\bnot in the (?:context|provided text|text|document|policy|passage|information)\b",
        r"\b(?:doesn't|does not|don't|do not) (?:say|mention|specify|state|cover|contain|include)\b",
        r"\b(?:cannot|can't|can not|unable to) (?:determine|tell|answer|find)\b",
        r"\bno (?:information|mention|details?)\b",
        r"\b(?:not enough|insufficient) information\b",
        r"\bthere is nothing (?:in|about)\b",
    ),
    "es": (
        r"\bno (?:lo )?sé\b",
        r"\bno (?:se )?(?:menciona|especifica|indica|dice)\b",
        r"\bno (?:está|aparece) en el (?:contexto|texto|documento)\b",
        r"\bno (?:se puede|puedo|es posible) determinar\b",
        r"\bno (?:hay|tengo) (?:suficiente )?información\b",
        r"\binformación insuficiente\b",
    ),
    "de": (
        r"\bich wei(?:ß|ss) (?:es )?nicht\b",
        r"\bwei(?:ß|ss) ich nicht\b",
        r"\bnicht im (?:kontext|text|dokument)\b",
        r"\bnicht (?:erwähnt|angegeben|genannt|beschrieben)\b",
        r"\bkann (?:ich )?(?:nicht|nichts) (?:bestimmen|feststellen|sagen)\b",
        r"\bkeine (?:informationen?|angaben)\b",
        r"\bnicht genug informationen\b",
        r"\bsagt nichts\b",
    ),
    "fr": (
        r"\bje ne sais pas\b",
        r"\bpas (?:dans|mentionné dans) le (?:contexte|texte|document)\b",
        r"\bn'est pas (?:mentionné|précisé|indiqué|spécifié)e?s?\b",
        r"\b(?:impossible de|ne peux pas|ne peut pas) (?:déterminer|dire|savoir)\b",
        r"\b(?:aucune|pas d') ?information",
        r"\bne (?:dit|précise|mentionne|indique) pas\b",
        r"\bpas assez d'informations?\b",
    ),
}
_UNCERTAINTY = re.compile("|".join(p for ps in UNCERTAINTY_PHRASES.values() for p in ps))


def admits_uncertainty(text: str | None) -> bool:
    """Whether ``text`` says it does not know or the context lacks the answer.

    Matches :data:`UNCERTAINTY_PHRASES` (en/es/de/fr) on case-folded, NFKC-normalised text.

    Examples
    --------
    >>> admits_uncertainty("Sorry, the policy does not say whether students get a discount.")
    True
    >>> admits_uncertainty("Yes, students get 10% off.")
    False
    """
    if not isinstance(text, str) or not text.strip():
        return False
    return _UNCERTAINTY.search(fold(text).replace("’", "'")) is not None


def abstention_items(
    outcomes: pd.DataFrame, eval_items: Iterable[EvalItem], *, outputs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per (model, item, repeat): correct "not found", hallucinated fields, admits uncertainty.

    ``not_found_correct`` and ``hallucinated_field_rate`` are the extraction outcome columns
    of :mod:`kit.scoring` (NaN where they do not apply). ``admits_uncertainty`` is set only
    for items flagged ``admits_uncertainty: true``: for classification / multiple choice the
    right answer *is* the "not in the context" option, so it equals ``correct``; for other
    tasks it is :func:`admits_uncertainty` of the output text (``outputs`` needed).

    Returns
    -------
    DataFrame
        ``model, item_id, repeat, task, not_found_correct, hallucinated_field_rate,
        admits_uncertainty``.
    """
    items = {it.id: it for it in eval_items}
    out = outcomes[["model", "item_id", "repeat", "task"]].copy()
    for column in ABSTENTION_COLUMNS[:2]:
        out[column] = _numeric(outcomes, column)
    flagged = out["item_id"].map(
        lambda i: bool(items[i].admits_uncertainty) if i in items else False
    )
    choice = out["task"].isin(CHOICE_TASKS).to_numpy()
    admits = np.where(flagged & choice, _numeric(outcomes, "correct"), np.nan)
    free = (flagged & ~choice).to_numpy()
    if free.any():
        if outputs is None or "output" not in outputs.columns:
            raise CompkitError(
                f"{int(free.sum())} flagged admits_uncertainty row(s) are free-text answers; "
                "pass outputs= (stored outputs with an 'output' column) to read them"
            )
        text = out[["model", "item_id", "repeat"]].merge(
            outputs[["model", "item_id", "repeat", "output"]],
            how="left",
            on=["model", "item_id", "repeat"],
        )["output"]
        said = np.array([float(admits_uncertainty(t)) for t in text])
        admits = np.where(free, said, admits)
    out["admits_uncertainty"] = admits
    return out


def abstention_metrics(
    outcomes: pd.DataFrame,
    eval_items: Iterable[EvalItem],
    *,
    outputs: pd.DataFrame | None = None,
    by: Sequence[str] = ("model",),
) -> pd.DataFrame:
    """Abstention metrics per group: ``*by, metric, value, n``.

    Metrics: ``not_found_correct``, ``hallucinated_field_rate`` (extraction) and
    ``admits_uncertainty_rate`` (items flagged ``admits_uncertainty``); see
    :func:`abstention_items`. Repeats are averaged per item first, so each item weighs the
    same; ``n`` counts items with a value. Metrics without any value are left out.
    """
    table = abstention_items(outcomes, eval_items, outputs=outputs)
    keys = list(dict.fromkeys(["model", *by]))
    per_item = table.groupby([*keys, "item_id"], sort=True, dropna=False)[
        list(ABSTENTION_COLUMNS)
    ].mean()
    long = (
        per_item.reset_index()
        .melt(id_vars=[*keys, "item_id"], var_name="metric", value_name="value")
        .dropna(subset=["value"])
    )
    long["metric"] = long["metric"].replace({"admits_uncertainty": "admits_uncertainty_rate"})
    out = (
        long.groupby([*keys, "metric"], sort=True)["value"]
        .agg(value="mean", n="count")
        .reset_index()
    )
    return out[[*keys, "metric", "value", "n"]]


def abstention_comparison(
    abstention: pd.DataFrame,
    *,
    baseline: str,
    candidates: Sequence[str] | str | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """``admits_uncertainty_rate`` of each candidate against the baseline (overall).

    The per-item values go through :func:`kit.analysis.compare.compare_models` (score
    intervals when they are 0/1). ``not_found_correct`` and ``hallucinated_field_rate`` are
    item metrics of stage 3's slice table and are not repeated here.

    Parameters
    ----------
    abstention
        :func:`abstention_items` output.

    Returns
    -------
    DataFrame
        :data:`kit.analysis.compare.RESULT_COLUMNS` (``slice="overall"``).
    """
    table = abstention.dropna(subset=["admits_uncertainty"])
    table = table.rename(columns={"admits_uncertainty": "admits_uncertainty_rate"})
    if table.empty or not (table["model"] == baseline).any() or table["model"].nunique() < 2:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return compare_models(
        table,
        baseline=baseline,
        candidates=candidates,
        metrics=["admits_uncertainty_rate"],
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )
