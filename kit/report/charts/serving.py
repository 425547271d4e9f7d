"""Altair charts of the serving stage: percentiles, the load curve, errors, the trade-off.

Every function takes a frame of :mod:`kit.serving` (``serving_latency``,
:func:`kit.serving.tables.load_curve`, ``serving_errors``,
:func:`kit.serving.tradeoff.tradeoff_frame`) and returns a chart whose data is that frame;
keyword arguments become filters in the spec. Nothing is computed here. Infinite CI bounds
(a p99 from 20 requests has no upper bound) are shown as open: the error bar stops at the
estimate on that side.

Example
-------
>>> latency_chart(result.tables["latency"], metric="ttft_ms")            # doctest: +SKIP
>>> load_curve_chart(load_curve(result.tables["latency"], result.tables["throughput"]))  # doctest: +SKIP
>>> tradeoff_chart(tradeoff_frame(result.tables["evidence"]))            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kit.errors import CompkitError, DependencyMissing

_LATENCY_COLUMNS = ["model", "profile", "metric", "stat", "value_ms", "ci_low", "ci_high"]
_CURVE_COLUMNS = ["model", "profile", "throughput_rps", "latency_ms", "ci_low", "ci_high"]
_ERROR_COLUMNS = ["model", "profile", "error_class", "n", "share"]
_TRADE_COLUMNS = [
    "model",
    "gain",
    "gain_value",
    "gain_low",
    "gain_high",
    "quality_delta",
    "quality_low",
    "quality_high",
]


def _altair() -> Any:
    try:
        import altair as alt
    except ImportError:
        raise DependencyMissing("altair", "core", "kit.report.charts.serving") from None
    return alt


def _require(frame: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise CompkitError(f"{what} needs column(s) {missing}; got {list(frame.columns)}")
    if frame.empty:
        raise CompkitError(f"{what}: the frame is empty (nothing was measured)")


def _finite(frame: pd.DataFrame, columns: Sequence[str], fallback: str) -> pd.DataFrame:
    """Infinite bounds replaced by the estimate (open side), for drawing only."""
    out = frame.copy()
    for c in columns:
        out[c] = out[c].where(np.isfinite(out[c]), out[fallback])
    return out


def latency_chart(
    latency: pd.DataFrame,
    *,
    metric: str = "ttft_ms",
    stats: Sequence[str] = ("p50", "p95", "p99"),
) -> Any:
    """Percentiles of one latency metric per profile and model, with their CIs."""
    alt = _altair()
    _require(latency, _LATENCY_COLUMNS, "latency_chart")
    data = _finite(latency, ["ci_low", "ci_high"], "value_ms")
    base = alt.Chart(data).transform_filter(alt.FieldEqualPredicate(field="metric", equal=metric))
    base = base.transform_filter(alt.FieldOneOfPredicate(field="stat", oneOf=list(stats)))
    x = alt.X("profile:N", title="profile", sort=None)
    xo = alt.XOffset("model:N")
    points = base.mark_point(filled=True).encode(
        x=x,
        xOffset=xo,
        y=alt.Y("value_ms:Q", title=metric.replace("_", " "), scale=alt.Scale(type="log")),
        color=alt.Color("model:N"),
        shape=alt.Shape("stat:N", sort=list(stats)),
        tooltip=[
            "model",
            "profile",
            "stat",
            alt.Tooltip("value_ms:Q", format=".1f"),
            "n",
            "method",
        ],
    )
    bars = base.mark_rule().encode(x=x, xOffset=xo, y="ci_low:Q", y2="ci_high:Q", color="model:N")
    return (bars + points).properties(
        title=f"{metric.removesuffix('_ms').upper()} percentiles (95% CI)", width=480, height=260
    )


def load_curve_chart(curve: pd.DataFrame) -> Any:
    """Latency against throughput over the load profiles of each model (the sweep curve)."""
    alt = _altair()
    _require(curve, _CURVE_COLUMNS, "load_curve_chart")
    data = _finite(curve, ["ci_low", "ci_high"], "latency_ms")
    enc = {
        "x": alt.X("throughput_rps:Q", title="throughput (requests/s)"),
        "color": alt.Color("model:N"),
    }
    line = (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            **enc,
            y=alt.Y(
                "latency_ms:Q",
                title=str(data["label"].iloc[0]) if "label" in data else "latency (ms)",
            ),
            order="throughput_rps:Q",
            tooltip=[
                "model",
                "profile",
                alt.Tooltip("throughput_rps:Q", format=".2f"),
                alt.Tooltip("latency_ms:Q", format=".0f"),
            ],
        )
    )
    bars = alt.Chart(data).mark_rule().encode(**enc, y="ci_low:Q", y2="ci_high:Q")
    return (bars + line).properties(title="latency under load", width=480, height=260)


def error_chart(errors: pd.DataFrame) -> Any:
    """Failed requests by class per model and profile (share of the profile's requests)."""
    alt = _altair()
    _require(errors, _ERROR_COLUMNS, "error_chart")
    return (
        alt.Chart(errors)
        .mark_bar()
        .encode(
            x=alt.X("profile:N", sort=None),
            xOffset="model:N",
            y=alt.Y("share:Q", axis=alt.Axis(format="%"), title="share of requests"),
            color=alt.Color("error_class:N"),
            tooltip=["model", "profile", "error_class", "n", alt.Tooltip("share:Q", format=".1%")],
        )
        .properties(title="errors under load", width=480, height=220)
    )


def tradeoff_chart(
    frame: pd.DataFrame, *, gain: str | None = None, confidence: float = 0.95
) -> Any:
    """Per candidate: quality change (with CI) against a serving gain (with CI), one panel
    per gain; the lines mark no change in quality and no gain. ``confidence`` is the study's
    level, named in the title."""
    alt = _altair()
    _require(frame, _TRADE_COLUMNS, "tradeoff_chart")
    data = _finite(
        _finite(frame, ["gain_low", "gain_high"], "gain_value"),
        ["quality_low", "quality_high"],
        "quality_delta",
    )
    base = alt.Chart(data).transform_calculate(
        no_gain=alt.expr.if_(alt.datum.gain == "speed-up", 1, 0)
    )
    if gain is not None:
        base = base.transform_filter(alt.FieldEqualPredicate(field="gain", equal=gain))
    x = alt.X("gain_value:Q", title="gain (speed-up: x baseline; savings: share)")
    y = alt.Y("quality_delta:Q", title="quality change vs baseline", axis=alt.Axis(format="+.0%"))
    points = base.mark_point(filled=True, size=60).encode(
        x=x,
        y=y,
        color="model:N",
        tooltip=[
            "model",
            "gain",
            alt.Tooltip("gain_value:Q", format=".2f"),
            alt.Tooltip("quality_delta:Q", format="+.1%"),
        ],
    )
    xbar = base.mark_rule().encode(x="gain_low:Q", x2="gain_high:Q", y=y, color="model:N")
    ybar = base.mark_rule().encode(x=x, y="quality_low:Q", y2="quality_high:Q", color="model:N")
    zero = base.mark_rule(strokeDash=[4, 4], color="grey").encode(y=alt.datum(0))
    nogain = base.mark_rule(strokeDash=[4, 4], color="grey").encode(x="no_gain:Q")
    layered = alt.layer(xbar, ybar, points, zero, nogain).properties(width=220, height=200)
    return (
        layered.facet(column=alt.Column("gain:N", title=None))
        .resolve_scale(x="independent")
        .properties(title=f"what is bought (x) and what is paid (y), {confidence:.0%} CIs")
    )
