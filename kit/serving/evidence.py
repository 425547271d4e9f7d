"""The serving stage's budget evidence: one long table, candidates compared with the baseline.

:func:`serving_evidence` turns the stage's tables into rows of :data:`EVIDENCE_COLUMNS`:
``model, slice, slice_value, metric, value, value_ci_low, value_ci_high, n, method`` and,
for every model other than the baseline where the baseline has the same row,
``baseline_value, delta`` (model - baseline) with ``ci_low, ci_high`` and ``rel`` ((model -
baseline) / baseline) with ``rel_ci_low, rel_ci_high``. Metric names and what each
``overall`` row means are declared with each metric in :mod:`kit.metrics` (``overall``).

How a change is bounded, by metric family:

============================  ==============================================================
latency percentiles           the two samples' order-statistic intervals at ``1 - alpha/2``
                              (``order_statistic_union``; ITL: cluster bootstrap intervals)
throughput_rps, goodput_rps   ratio: exact conditional binomial of the two Poisson counts;
                              difference: Garwood intervals at ``1 - alpha/2``, union bound
accuracy / parse failures     paired on the items both models answered in their profiles:
                              Tango's score interval and the paired relative bound
memory, size, cold start      measured once: the change is exact (no interval to widen)
everything else               the two values' intervals at ``1 - alpha/2``, union bound
============================  ==============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kit.analysis.compare import RESULT_COLUMNS
from kit.serving.latency import _gaps
from kit.stats.intervals import paired_difference_ci, paired_ratio_ci, proportion_ci
from kit.stats.serving_intervals import (
    cluster_quantile_ci,
    poisson_rate_ci,
    poisson_rate_ratio_ci,
    two_sample_quantile_ci,
    union_difference,
    union_ratio,
)

#: Columns of the evidence table: :data:`kit.analysis.compare.RESULT_COLUMNS` (every stage's
#: evidence shape), plus ``method`` (the value's interval method, = ``value_method``).
EVIDENCE_COLUMNS = [
    "model",
    "slice",
    "slice_value",
    "metric",
    "value",
    "value_ci_low",
    "value_ci_high",
    "n",
    "method",
    *RESULT_COLUMNS[RESULT_COLUMNS.index("baseline_value") :],
]
#: How each kind of row bounds its change and relative change against the baseline.
CHANGE_METHODS = {
    "quantile": ("order_statistic_union", "order_statistic_union"),
    "itl": ("cluster_bootstrap_union", "cluster_bootstrap_union"),
    "rate": ("garwood_union", "poisson_ratio_conditional"),
    "paired": ("tango_cc", "tang_cc"),
    "single": ("exact", "exact"),
    "union": ("union_bound", "union_bound"),
}
RATE_METRICS = ("throughput_rps", "goodput_rps")
POOLED_SHARES = ("error_rate_under_load", "timeout_rate", "interrupted_rate")
PAIRED = {"accuracy_under_load": "correct", "parse_failure_under_load": "parse_failure"}
SINGLE = ("peak_memory_mb", "peak_gpu_memory_mb", "size_on_disk_mb", "cold_start_s")


@dataclass
class Measured:
    """The stage's tables and choices that the evidence reads (see :mod:`kit.stages.serving`)."""

    baseline: str
    reqs: pd.DataFrame  # kit.serving.latency.per_request
    latency: pd.DataFrame
    throughput: pd.DataFrame
    throughput_half: pd.DataFrame  # the same at confidence 1 - alpha/2
    outcomes: pd.DataFrame  # kit.serving.quality.score_under_load
    quality: pd.DataFrame
    batch: pd.DataFrame  # kit.serving.quality.batch_flips rows + slice, slice_value
    resources: pd.DataFrame  # model, metric, value
    cost: (
        pd.DataFrame
    )  # model, profile, metric, value, ci_low, ci_high, n, method, half_low, half_high
    references: dict[str, str]  # model -> profile of its overall latency rows
    operating: dict[str, str]  # model -> operating-point profile
    confidence: float = 0.95
    peaks: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, metric) -> profile


@dataclass
class _Row:
    """A value row and what its comparison needs."""

    model: str
    slice: str
    slice_value: str
    metric: str
    value: float
    low: float
    high: float
    n: int
    method: str
    kind: str  # quantile | rate | paired | single | union
    handle: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "slice": self.slice,
            "slice_value": self.slice_value,
            "metric": self.metric,
            "value": self.value,
            "value_ci_low": self.low,
            "value_ci_high": self.high,
            "n": self.n,
            "method": self.method,
            "value_method": self.method,
        }


def serving_evidence(m: Measured) -> pd.DataFrame:
    """The long evidence frame (module docstring)."""
    rows = [*_latency_rows(m), *_throughput_rows(m), *_quality_rows(m), *_batch_rows(m)]
    rows += [*_single_rows(m), *_cost_rows(m)]
    index = {(r.model, r.slice, r.slice_value, r.metric): r for r in rows}
    records = []
    for r in rows:
        rec = r.record()
        base = index.get((m.baseline, r.slice, r.slice_value, r.metric))
        if base is not None and r.model != m.baseline:
            rec.update(_compare(m, r, base))
        records.append({**rec, "confidence": m.confidence})
    frame = pd.DataFrame(records).reindex(columns=EVIDENCE_COLUMNS)
    frame["slice_value"] = frame["slice_value"].astype(str)
    return frame


# --------------------------------------------------------------------------- slices


def profile_slices(profile_row: pd.Series | dict[str, Any]) -> list[tuple[str, str]]:
    """The (slice, slice_value) pairs a profile reports under: its own, and for a profile
    with one request at a time also ``concurrency=1`` and ``profile=synchronous``."""
    own = (str(profile_row["slice"]), str(profile_row["slice_value"]))
    out = [own]
    if profile_row["profile"] in ("synchronous", "batch_size=1"):
        out += [("concurrency", "1"), ("profile", "synchronous")]
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- value rows


def _latency_rows(m: Measured) -> list[_Row]:
    rows = []
    lat = m.latency[m.latency["stat"].str.fullmatch(r"p\d+")]
    for rec in lat.to_dict("records"):
        name = f"{rec['metric'].removesuffix('_ms')}_{rec['stat']}_ms"
        q = int(rec["stat"][1:]) / 100
        handle = {"profile": rec["profile"], "column": rec["metric"].removesuffix("_ms"), "q": q}
        where = profile_slices(rec)
        if m.references.get(rec["model"]) == rec["profile"]:
            where.append(("overall", "all"))
        for sl, val in where:
            rows.append(
                _Row(
                    rec["model"],
                    sl,
                    val,
                    name,
                    rec["value_ms"],
                    rec["ci_low"],
                    rec["ci_high"],
                    rec["n"],
                    rec["method"],
                    "quantile",
                    handle,
                )
            )
    return rows


def _throughput_rows(m: Measured) -> list[_Row]:
    rows = []
    half = m.throughput_half.set_index(["model", "profile", "metric"])
    counts = m.throughput.set_index(["model", "profile", "metric"])["value"]
    wanted = (*RATE_METRICS, "output_tokens_per_s", "goodput_share", *POOLED_SHARES)
    for rec in m.throughput[m.throughput["metric"].isin(wanted)].to_dict("records"):
        key = (rec["model"], rec["profile"], rec["metric"])
        handle = {"profile": rec["profile"], "half": tuple(half.loc[key, ["ci_low", "ci_high"]])}
        if rec["metric"] in RATE_METRICS:
            good = rec["metric"] == "goodput_rps"
            window = counts[(rec["model"], rec["profile"], "window_s")]
            handle.update(
                count=round(rec["value"] * window) if window > 0 else 0, window=window, good=good
            )
        kind = "rate" if rec["metric"] in RATE_METRICS else "union"
        where = profile_slices(rec)
        if _is_overall(m, rec):
            where.append(("overall", "all"))
        for sl, val in where:
            rows.append(
                _Row(
                    rec["model"],
                    sl,
                    val,
                    rec["metric"],
                    rec["value"],
                    rec["ci_low"],
                    rec["ci_high"],
                    rec["n"],
                    rec["method"],
                    kind,
                    handle,
                )
            )
    return rows + _pooled_rows(m)


def _is_overall(m: Measured, rec: dict[str, Any]) -> bool:
    if rec["metric"] in POOLED_SHARES:
        return False  # pooled rows below
    if rec["metric"] == "goodput_share":
        return m.operating.get(rec["model"]) == rec["profile"]
    return m.peaks.get((rec["model"], rec["metric"])) == rec["profile"]


def _pooled_rows(m: Measured) -> list[_Row]:
    """Error shares over the model's loaded profiles (all but the one-at-a-time ones, where
    there are others), pooled."""
    rows = []
    single = ("synchronous", "batch_size=1")
    for model, g in m.reqs.groupby("model", sort=False):
        loaded = g[~g["profile"].isin(single) & (g["kind"] != "synchronous")]
        g = loaded if len(loaded) else g
        n = len(g)
        counts = {
            "error_rate_under_load": int((g["status"] != "ok").sum()),
            "timeout_rate": int((g["error_class"] == "timeout").sum()),
            "interrupted_rate": int(g["interrupted"].fillna(False).astype(bool).sum()),
        }
        for metric, k in counts.items():
            rows.append(_share_row(model, "overall", "all", metric, k, n, m.confidence))
    return rows


def _share_row(model, sl, val, metric, k, n, confidence) -> _Row:
    lo, hi = proportion_ci(k, n, confidence=confidence)
    half = proportion_ci(k, n, confidence=1 - (1 - confidence) / 2)
    value = k / n if n else math.nan
    return _Row(
        model,
        sl,
        val,
        metric,
        value,
        float(lo),
        float(hi),
        n,
        "clopper_pearson",
        "union",
        {"half": (float(half[0]), float(half[1]))},
    )


def _quality_rows(m: Measured) -> list[_Row]:
    rows = []
    q = m.quality[m.quality["metric"].isin([*PAIRED, "load_flip_rate"])]
    for rec in q.to_dict("records"):
        where = profile_slices(rec)
        if m.operating.get(rec["model"]) == rec["profile"]:
            where.append(("overall", "all"))
        for sl, val in where:
            if rec["metric"] == "load_flip_rate":
                k = round(rec["value"] * rec["n"]) if rec["n"] else 0
                rows.append(
                    _share_row(rec["model"], sl, val, rec["metric"], k, rec["n"], m.confidence)
                )
            else:
                rows.append(
                    _Row(
                        rec["model"],
                        sl,
                        val,
                        rec["metric"],
                        rec["value"],
                        rec["ci_low"],
                        rec["ci_high"],
                        rec["n"],
                        rec["method"],
                        "paired",
                        {"profile": rec["profile"]},
                    )
                )
    return rows


def _batch_rows(m: Measured) -> list[_Row]:
    rows = []
    for rec in m.batch.to_dict("records"):
        for sl, val in (
            (rec["slice"], rec["slice_value"]),
            *((("overall", "all"),) if rec["overall"] else ()),
        ):
            rows.append(
                _share_row(
                    rec["model"], sl, val, "batch_flip_rate", rec["flips"], rec["n"], m.confidence
                )
            )
    return rows


def _single_rows(m: Measured) -> list[_Row]:
    rows = []
    for rec in m.resources.dropna(subset=["value"]).to_dict("records"):
        v = float(rec["value"])
        rows.append(
            _Row(
                rec["model"],
                "overall",
                "all",
                rec["metric"],
                v,
                v,
                v,
                1,
                "single_measurement",
                "single",
            )
        )
    return rows


def _cost_rows(m: Measured) -> list[_Row]:
    return [
        _Row(
            rec["model"],
            "overall",
            "all",
            rec["metric"],
            rec["value"],
            rec["ci_low"],
            rec["ci_high"],
            rec["n"],
            rec["method"],
            "union",
            {"half": (rec["half_low"], rec["half_high"])},
        )
        for rec in m.cost.to_dict("records")
    ]


# --------------------------------------------------------------------------- comparisons


def _compare(m: Measured, r: _Row, b: _Row) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline_value": b.value, "delta": r.value - b.value}
    finite_base = b.value not in (0, 0.0) and math.isfinite(b.value)
    out["rel"] = (r.value - b.value) / b.value if finite_base else math.nan
    kind = "itl" if r.kind == "quantile" and r.handle["column"] == "itl" else r.kind
    out["delta_method"], out["rel_method"] = CHANGE_METHODS[kind]
    if r.kind == "quantile":
        out.update(_quantile_change(m, r, b))
    elif r.kind == "rate":
        out.update(_rate_change(m, r, b))
    elif r.kind == "paired":
        out.update(_paired_change(m, r, b))
    elif r.kind == "single":
        out.update(
            ci_low=out["delta"], ci_high=out["delta"], rel_ci_low=out["rel"], rel_ci_high=out["rel"]
        )
    else:
        out.update(_union_change(r.handle["half"], b.handle["half"]))
    return out


def _union_change(a: tuple[float, float], b: tuple[float, float]) -> dict[str, float]:
    lo, hi = union_difference(a, b)
    r_lo, r_hi = union_ratio((max(a[0], 0.0), a[1]), (max(b[0], 0.0), b[1]))
    return {"ci_low": lo, "ci_high": hi, "rel_ci_low": r_lo - 1, "rel_ci_high": r_hi - 1}


def _samples(m: Measured, model: str, profile: str, column: str) -> Any:
    g = m.reqs[
        (m.reqs["model"] == model) & (m.reqs["profile"] == profile) & (m.reqs["status"] == "ok")
    ]
    if column == "itl":
        return _gaps(g["chunk_s"])
    return g[f"{column}_s"].dropna().to_numpy() * 1e3


def _quantile_change(m: Measured, r: _Row, b: _Row) -> dict[str, float]:
    q, column = r.handle["q"], r.handle["column"]
    a = _samples(m, r.model, r.handle["profile"], column)
    c = _samples(m, b.model, b.handle["profile"], column)
    if column != "itl":
        res = two_sample_quantile_ci(a, c, q, confidence=m.confidence)
        return {k: res[k] for k in ("ci_low", "ci_high", "rel_ci_low", "rel_ci_high")}
    half = 1 - (1 - m.confidence) / 2
    _, a_lo, a_hi = cluster_quantile_ci(a, q, confidence=half)
    _, b_lo, b_hi = cluster_quantile_ci(c, q, confidence=half)
    return _union_change((a_lo * 1e3, a_hi * 1e3), (b_lo * 1e3, b_hi * 1e3))


def _rate_change(m: Measured, r: _Row, b: _Row) -> dict[str, float]:
    x_a, t_a, x_b, t_b = (
        r.handle["count"],
        r.handle["window"],
        b.handle["count"],
        b.handle["window"],
    )
    _, lo, hi = poisson_rate_ratio_ci(x_a, t_a, x_b, t_b, confidence=m.confidence)
    half = 1 - (1 - m.confidence) / 2
    d_lo, d_hi = union_difference(
        poisson_rate_ci(x_a, t_a, confidence=half), poisson_rate_ci(x_b, t_b, confidence=half)
    )
    return {"ci_low": d_lo, "ci_high": d_hi, "rel_ci_low": lo - 1, "rel_ci_high": hi - 1}


def _paired_change(m: Measured, r: _Row, b: _Row) -> dict[str, Any]:
    column = PAIRED[r.metric]
    o = m.outcomes
    a = o[(o["model"] == r.model) & (o["profile"] == r.handle["profile"])][["item_id", column]]
    c = o[(o["model"] == b.model) & (o["profile"] == b.handle["profile"])][["item_id", column]]
    both = a.merge(c, on="item_id", suffixes=("", "_base")).dropna()
    n = len(both)
    if n == 0:
        return {
            "ci_low": -1.0,
            "ci_high": 1.0,
            "rel_ci_low": -math.inf,
            "rel_ci_high": math.inf,
            "note": "no item answered by both models in these profiles",
        }
    x, y = both[column].to_numpy() > 0.5, both[f"{column}_base"].to_numpy() > 0.5
    lost, won, both_1 = int((y & ~x).sum()), int((~y & x).sum()), int((x & y).sum())
    lo, hi = paired_difference_ci(lost, won, n, confidence=m.confidence)
    r_lo, r_hi = paired_ratio_ci(both_1, lost, won, n, confidence=m.confidence)
    base = (both_1 + lost) / n
    return {  # over the items both answered (the change's own n)
        "delta": (won - lost) / n,
        "rel": (won - lost) / n / base if base > 0 else math.nan,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "rel_ci_low": float(r_lo),
        "rel_ci_high": float(r_hi),
        "n_base_only": lost,
        "n_cand_only": won,
    }
