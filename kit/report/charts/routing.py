"""Altair charts of the routing stage: the deferral curve with the oracle, and the Pareto
fronts (quality against cost, quality against p95 latency).

Each function takes frames of :mod:`kit.routing` (:func:`kit.routing.sweep.curve_points`, the
``routing_oracle`` table, the ``routing_rules`` table) and only draws them.

Example
-------
>>> deferral_chart(curve_points(tables.curve), oracle=tables.oracle, rules=tables.rules)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kit.errors import CompkitError, DependencyMissing

_POINTS = ["candidate", "split", "threshold", "value", "ci_low", "ci_high", "fallback_rate"]


def _altair() -> Any:
    try:
        import altair as alt
    except ImportError:
        raise DependencyMissing("altair", "core", "kit.report.charts.routing") from None
    return alt


def _check(points: pd.DataFrame, needed, what: str) -> None:
    missing = [c for c in needed if c not in points.columns]
    if missing:
        raise CompkitError(f"{what} needs column(s) {missing}; got {list(points.columns)}")
    if points.empty:
        raise CompkitError(f"{what}: the frame is empty")


def _chosen(points: pd.DataFrame, rules: pd.DataFrame | None) -> pd.DataFrame:
    """The curve's point at each candidate's chosen threshold (judged split)."""
    if rules is None or rules.empty:
        return points.iloc[0:0]
    rows = []
    for r in rules.itertuples():
        mine = points[(points["candidate"] == r.candidate) & (points["split"] == "judged")]
        if len(mine):
            rows.append(mine.iloc[[int(np.argmin(np.abs(mine["threshold"] - r.threshold)))]])
    # the judged curve holds the chosen threshold's exact point (deferral_curve(extra=...))
    return pd.concat(rows) if rows else points.iloc[0:0]


def deferral_chart(
    points: pd.DataFrame,
    *,
    oracle: pd.DataFrame | None = None,
    rules: pd.DataFrame | None = None,
    split: str = "judged",
) -> Any:
    """Quality against fallback rate for every threshold (with CIs), the oracle router and
    the chosen threshold (a ring)."""
    alt = _altair()
    _check(points, _POINTS, "deferral_chart")
    data = points[points["split"] == split]
    metric = str(data["metric"].iloc[0]) if "metric" in data and len(data) else "quality"
    x = alt.X("fallback_rate:Q", title="fallback rate", axis=alt.Axis(format="%"))
    y = alt.Y("value:Q", title=metric.replace("_", " "), scale=alt.Scale(zero=False))
    base = alt.Chart(data).encode(x=x, color=alt.Color("candidate:N"))
    line = base.mark_line(point=True).encode(
        y=y,
        order="fallback_rate:Q",
        tooltip=[
            "candidate",
            alt.Tooltip("threshold:Q", format=".3f"),
            alt.Tooltip("fallback_rate:Q", format=".1%"),
            alt.Tooltip("value:Q", format=".3f"),
        ],
    )
    layers = [base.mark_area(opacity=0.15).encode(y="ci_low:Q", y2="ci_high:Q"), line]
    if oracle is not None and len(oracle):
        layers.append(
            alt.Chart(oracle)
            .mark_line(strokeDash=[4, 3], color="#555")
            .encode(x="fallback_rate:Q", y="value:Q", detail="candidate:N")
        )
    picked = _chosen(data, rules)
    if len(picked):
        layers.append(
            alt.Chart(picked)
            .mark_point(size=220, shape="circle", filled=False, strokeWidth=2, color="black")
            .encode(x="fallback_rate:Q", y="value:Q")
        )
    title = f"deferral curve on the {split} items (dashed: oracle router; ring: chosen rule)"
    return alt.layer(*layers).properties(title=title, width=460, height=280)


def pareto_chart(
    points: pd.DataFrame, *, x: str = "cost_per_request", split: str = "judged"
) -> Any:
    """Quality against blended cost (``cost_per_request``) or blended p95 latency
    (``latency_p95_ms``) for every threshold."""
    alt = _altair()
    if x not in ("cost_per_request", "latency_p95_ms"):
        raise CompkitError(f"pareto_chart x={x!r}: use 'cost_per_request' or 'latency_p95_ms'")
    _check(points, [*_POINTS, x], "pareto_chart")
    data = points[(points["split"] == split) & np.isfinite(points[x])]
    title = {"cost_per_request": "blended cost per request", "latency_p95_ms": "blended p95 (ms)"}
    chart = (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X(f"{x}:Q", title=title[x], scale=alt.Scale(zero=False)),
            y=alt.Y(
                "value:Q",
                title=str(data["metric"].iloc[0]) if len(data) else "quality",
                scale=alt.Scale(zero=False),
            ),
            color="candidate:N",
            order="fallback_rate:Q",
            tooltip=[
                "candidate",
                alt.Tooltip("threshold:Q", format=".3f"),
                alt.Tooltip("fallback_rate:Q", format=".1%"),
                alt.Tooltip(f"{x}:Q", format=".4g"),
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
    )
    return chart.properties(title=f"quality vs {title[x]} ({split} items)", width=460, height=280)
