"""Altair charts of the robustness stage: perturbation heat map, KL percentiles, KL vs flips,
numerical artifacts.

Every function takes a table of :mod:`kit.stages.robustness` and draws its rows unchanged:
keyword arguments only select rows; the colour of a heat-map cell and its "CI excludes 0"
mark are read from the row's bounds in the spec. Nothing is computed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from kit.report.charts.comparison import _altair, _higher_is_better, _select

if TYPE_CHECKING:
    import altair as alt

_GAP_COLUMNS = ["model", "slice", "slice_value", "metric", "delta", "ci_low", "ci_high", "n"]


def perturbation_heatmap(evidence: pd.DataFrame, *, metric: str = "accuracy_shift") -> alt.Chart:
    """Perturbation x candidate: the robustness gap (the candidate's shift minus the
    baseline's) as colour and text; ``*`` marks a gap whose whole interval is on one side
    of 0. Red is worse than the baseline whatever the metric's direction.

    Parameters
    ----------
    evidence
        ``tables/robustness_evidence``; rows of ``metric`` per perturbation and pooled.
    """
    alt = _altair()
    rows = _select(evidence, _GAP_COLUMNS, "perturbation_heatmap", metric=metric)
    rows = rows[rows["slice"].isin(["perturbation", "overall"])]
    higher = _higher_is_better(metric)
    sign = "" if higher else "-"
    label = (
        "(datum.delta >= 0 ? '+' : '') + format(datum.delta * 100, '.1f') + "
        "(datum.ci_high < 0 || datum.ci_low > 0 ? ' *' : '')"
    )
    base = alt.Chart(rows).transform_calculate(
        row="datum.slice == 'overall' ? 'pooled' : datum.slice_value",
        points=f"{sign}datum.delta * 100",
        label=label,
    )
    cells = base.mark_rect().encode(
        x=alt.X("model:N", title="candidate", sort=None),
        y=alt.Y("row:N", title="perturbation", sort=None),
        color=alt.Color(
            "points:Q",
            title="gap, points (better +)",
            scale=alt.Scale(scheme="redblue", domainMid=0),
        ),
        tooltip=[
            "model:N",
            alt.Tooltip("row:N", title="perturbation"),
            alt.Tooltip("value:Q", title="candidate shift", format="+.3f"),
            alt.Tooltip("baseline_value:Q", title="baseline shift", format="+.3f"),
            alt.Tooltip("delta:Q", title="gap", format="+.3f"),
            alt.Tooltip("ci_low:Q", format="+.3f"),
            alt.Tooltip("ci_high:Q", format="+.3f"),
            alt.Tooltip("n:Q", title="pairs"),
            alt.Tooltip("delta_method:N", title="interval"),
        ],
    )
    text = base.mark_text(fontSize=11).encode(
        x=alt.X("model:N", sort=None), y=alt.Y("row:N", sort=None), text="label:N"
    )
    return (cells + text).properties(
        title=f"{metric}: robustness gap vs the baseline (points; * = interval excludes 0)",
        width=alt.Step(90),
        height=alt.Step(26),
    )


def kl_percentile_chart(percentiles: pd.DataFrame) -> alt.LayerChart:
    """Token-KL percentiles per candidate on a log scale (llama.cpp's 0.1 ... 99.9), the
    solid line the KL (a lower bound under top-k truncation), the dashed line its upper
    bound.

    Parameters
    ----------
    percentiles
        ``tables/kl_percentiles``: ``model, percentile, kl, kl_upper``.
    """
    alt = _altair()
    rows = _select(percentiles, ["model", "percentile", "kl", "kl_upper"], "kl_percentile_chart")
    x = alt.X("percentile:O", title="percentile of tokens", sort=None)
    scale = alt.Scale(type="symlog", constant=1e-6)
    lower = (
        alt.Chart(rows)
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y(
                "kl:Q",
                title="KL(baseline || candidate), nats",
                scale=scale,
                axis=alt.Axis(format=".0e"),
            ),
            color=alt.Color("model:N", title="candidate"),
            tooltip=[
                "model:N",
                alt.Tooltip("percentile:Q"),
                alt.Tooltip("kl:Q", format=".3g"),
                alt.Tooltip("kl_upper:Q", format=".3g", title="upper bound"),
            ],
        )
    )
    upper = (
        alt.Chart(rows)
        .mark_line(strokeDash=[4, 3], opacity=0.6)
        .encode(x=x, y=alt.Y("kl_upper:Q", scale=scale), color="model:N")
    )
    return alt.layer(lower, upper).properties(
        title="Token KL percentiles (solid: KL; dashed: its top-k truncation bound)"
    )


def kl_flip_chart(table: pd.DataFrame, *, slice: str = "task") -> alt.Chart:
    """Mean KL against flip rate per candidate and slice value (Dutta et al. 2024 report the
    two correlate ~0.96-0.98 across compressed models).

    Parameters
    ----------
    table
        ``tables/kl_flip``; rows of ``slice`` (``overall`` for one point per candidate).
    """
    alt = _altair()
    needed = ["model", "slice", "slice_value", "measure", "n", "mean_kl", "flip_rate"]
    rows = _select(table, needed, "kl_flip_chart", slice=slice)
    measure = rows["measure"].iloc[0] if len(rows) else "KL"
    return (
        alt.Chart(rows)
        .mark_point(filled=True, size=80)
        .encode(
            x=alt.X("mean_kl:Q", title=f"mean {measure} (nats)"),
            y=alt.Y("flip_rate:Q", title="flip rate", axis=alt.Axis(format="%")),
            color=alt.Color("model:N", title="candidate"),
            shape=alt.Shape("slice_value:N", title=slice),
            tooltip=[
                "model:N",
                alt.Tooltip("slice_value:N", title=slice),
                alt.Tooltip("n:Q"),
                alt.Tooltip("mean_kl:Q", format=".3g"),
                alt.Tooltip("flip_rate:Q", format=".1%"),
            ],
        )
        .properties(title=f"KL vs flip rate by {slice}")
    )


def artifact_chart(rates: pd.DataFrame, *, items: str = "clean") -> alt.FacetChart:
    """Rates of empty, looping, truncated and NaN-logit answers per model with their
    Clopper–Pearson intervals.

    Parameters
    ----------
    rates
        ``tables/artifact_rates``; ``items`` picks the clean items or one perturbation.
    """
    alt = _altair()
    needed = ["model", "metric", "items", "rate", "ci_low", "ci_high", "count", "n"]
    rows = _select(rates, needed, "artifact_chart", items=items)
    y = alt.Y("model:N", title=None, sort=None)
    bars = (
        alt.Chart()
        .mark_bar(opacity=0.8)
        .encode(
            x=alt.X("rate:Q", title="share of answers", axis=alt.Axis(format="%")),
            y=y,
            color=alt.Color("model:N", legend=None),
            tooltip=[
                "model:N",
                "metric:N",
                alt.Tooltip("count:Q"),
                alt.Tooltip("n:Q"),
                alt.Tooltip("rate:Q", format=".1%"),
                alt.Tooltip("ci_low:Q", format=".1%"),
                alt.Tooltip("ci_high:Q", format=".1%"),
            ],
        )
    )
    ci = alt.Chart().mark_rule(color="black").encode(x="ci_low:Q", x2="ci_high:Q", y=y)
    level = f"{float(rows['confidence'].iloc[0]) * 100:g}%" if len(rows) else ""
    return (
        alt.layer(bars, ci, data=rows)
        .properties(width=260, height=alt.Step(18))
        .facet(facet=alt.Facet("metric:N", title=None), columns=2)
        .properties(title=f"Numerical artifacts ({items} items; lines: {level} intervals)")
    )
