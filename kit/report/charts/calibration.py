"""Altair charts of calibration: reliability diagrams, confidence buckets, risk-coverage.

Every function takes a frame produced by :mod:`kit.analysis.calibration` and returns an altair chart
whose data is that frame, unchanged: keyword arguments (``strategy``, ``slice``) become
filters in the chart spec, so nothing is computed here - empty bins are not in the frame
and therefore never drawn.

Example
-------
>>> tables = write_calibration_tables("runs/demo")                      # doctest: +SKIP
>>> reliability_chart(tables.reliability)                               # doctest: +SKIP
>>> reliability_chart(tables.reliability, slice="language")             # doctest: +SKIP
>>> confidence_bucket_chart(tables.buckets)                             # doctest: +SKIP
>>> risk_coverage_chart(tables.risk_coverage, coverage=0.8)             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from kit.errors import CompkitError, DependencyMissing

if TYPE_CHECKING:
    import altair as alt

_BIN_COLUMNS = ["model", "lower", "upper", "n", "mean_confidence", "accuracy", "gap"]
_BUCKET_COLUMNS = ["model", "bucket", "lower", "n", "accuracy", "mean_confidence", "gap"]
_CURVE_COLUMNS = ["model", "coverage", "risk", "accuracy", "threshold"]


def _altair() -> Any:
    try:
        import altair as alt
    except ImportError:
        raise DependencyMissing("altair", "core", "kit.report.charts.calibration") from None
    return alt


def _require(frame: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise CompkitError(f"{what} needs column(s) {missing}; got {list(frame.columns)}")


def _filters(frame: pd.DataFrame, what: str, **equals: Any) -> list[Any]:
    """Vega-Lite filter predicates for the given column values (columns absent: ignored)."""
    alt = _altair()
    mask = pd.Series(True, index=frame.index)
    predicates = []
    for column, value in equals.items():
        if column in frame.columns and value is not None:
            mask &= frame[column] == value
            predicates.append(alt.FieldEqualPredicate(field=column, equal=value))
    if not mask.any():
        shown = ", ".join(f"{k}={v!r}" for k, v in equals.items() if v is not None)
        raise CompkitError(f"{what}: no rows with {shown}")
    return predicates


def reliability_chart(
    bins: pd.DataFrame,
    *,
    strategy: str = "uniform",
    slice: str | None = None,
    columns: int = 3,
    select: str | None = None,
) -> alt.LayerChart | alt.ConcatChart:
    """Reliability diagram: accuracy vs mean confidence per bin, one line per model.

    Baseline and candidates are overlaid (colour = model) as lines with points, over a
    translucent bar per bin whose height is the bin's count (right axis), with the
    diagonal (perfect calibration) for reference. A point below the diagonal is
    over-confident.

    Parameters
    ----------
    bins
        :func:`kit.analysis.calibration.reliability_bins` (or :func:`~kit.analysis.calibration.reliability_table`
        with a ``model`` column added).
    strategy
        Which binning to draw when the frame has a ``strategy`` column.
    slice
        ``None``: the rows over all items (``slice="overall"``). A slice column name (e.g.
        ``"language"``): one panel per value of that column.
    columns
        Panels per row when faceting.
    select
        Name of a point selection on the bins (fields ``model, bin, lower, upper``; a click
        on a point or a count bar picks that model's bin, a double click clears it), or
        ``None``. Only without ``slice``.

    Returns
    -------
    alt.LayerChart or alt.ConcatChart
        Data: ``bins`` itself (rows are chosen with filters in the spec). With ``slice``, a
        concat of one layered panel per slice value (in the frame's order) sharing that data.
    """
    alt = _altair()
    _require(bins, _BIN_COLUMNS, "reliability_chart")
    chosen = slice if slice is not None else ("overall" if "slice" in bins.columns else None)
    predicates = _filters(bins, "reliability_chart", strategy=strategy, slice=chosen)
    unit = alt.Scale(domain=[0, 1])
    color = alt.Color("model:N", title="model")
    tooltip = [
        alt.Tooltip("model:N"),
        alt.Tooltip("lower:Q", format=".2f", title="bin from"),
        alt.Tooltip("upper:Q", format=".2f", title="bin to"),
        alt.Tooltip("n:Q", title="predictions"),
        alt.Tooltip("mean_confidence:Q", format=".3f"),
        alt.Tooltip("accuracy:Q", format=".3f"),
        alt.Tooltip("gap:Q", format="+.3f", title="gap (conf - acc)"),
    ]
    counts = (
        alt.Chart()
        .mark_bar(opacity=0.15)
        .encode(
            x=alt.X("lower:Q", scale=unit, title="confidence"),
            x2="upper:Q",
            y=alt.Y("n:Q", title="predictions per bin", axis=alt.Axis(orient="right")),
            y2=alt.Y2Datum(0),
            color=color,
            tooltip=tooltip,
        )
    )
    diagonal = (
        alt.Chart()
        .transform_aggregate(rows="count()")
        .mark_rule(strokeDash=[4, 4], color="gray")
        .encode(
            x=alt.XDatum(0, scale=unit),
            y=alt.YDatum(0, scale=unit, axis=None),
            x2=alt.X2Datum(1),
            y2=alt.Y2Datum(1),
        )
    )
    curve = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X("mean_confidence:Q", scale=unit, title="confidence"),
            y=alt.Y("accuracy:Q", scale=unit, title="accuracy"),
            color=color,
            tooltip=tooltip,
        )
    )
    # independent y: counts on the right axis; diagonal and curve both fixed to [0, 1]
    title = f"Reliability ({strategy} bins)"
    layers = [counts, diagonal, curve]
    if select is not None and slice is None:
        pick = alt.selection_point(
            name=select, fields=["model", "bin", "lower", "upper"], on="click", clear="dblclick"
        )
        layers[2] = curve.mark_line()
        layers.append(
            alt.Chart()
            .mark_point(filled=True)
            .encode(
                x=alt.X("mean_confidence:Q", scale=unit, title="confidence"),
                y=alt.Y("accuracy:Q", scale=unit, title="accuracy"),
                color=color,
                tooltip=tooltip,
                size=alt.condition(pick, alt.value(200), alt.value(70)),
                stroke=alt.condition(pick, alt.value("black"), alt.value(None)),
            )
            .add_params(pick)
        )
        title += " · click a point for its items"
    if slice is None:
        chart = alt.layer(*layers, data=bins).resolve_scale(y="independent")
        for predicate in predicates:
            chart = chart.transform_filter(predicate)
        return chart.properties(title=title, width=320, height=280)
    # one panel per slice value; a concat, since Vega-Lite cannot facet layers whose y
    # scales are independent (counts axis vs accuracy axis)
    values = bins.loc[bins["slice"] == slice, "slice_value"].drop_duplicates().tolist()
    panels = []
    for value in values:
        panel = alt.layer(counts, diagonal, curve).resolve_scale(y="independent")
        for predicate in [*predicates, alt.FieldEqualPredicate(field="slice_value", equal=value)]:
            panel = panel.transform_filter(predicate)
        panels.append(panel.properties(title=f"{slice} = {value}", width=220, height=190))
    return alt.concat(*panels, columns=columns, data=bins).properties(title=f"{title} by {slice}")


def confidence_bucket_chart(buckets: pd.DataFrame) -> alt.LayerChart:
    """Real accuracy per confidence bucket, baseline and candidates side by side.

    Bars: accuracy of each model in each bucket; black ticks: the bucket's mean confidence
    (a bar below its tick is over-confident). ``n`` and the gap are in the tooltip.
    Buckets with no predictions have NaN accuracy and draw nothing.

    Parameters
    ----------
    buckets
        :func:`kit.analysis.calibration.confidence_buckets` output.

    Returns
    -------
    alt.LayerChart
        Data: ``buckets`` itself.
    """
    alt = _altair()
    _require(buckets, _BUCKET_COLUMNS, "confidence_bucket_chart")
    x = alt.X("bucket:N", title="confidence bucket", sort=alt.EncodingSortField("lower", op="min"))
    offset = alt.XOffset("model:N")
    tooltip = [
        alt.Tooltip("model:N"),
        alt.Tooltip("bucket:N"),
        alt.Tooltip("n:Q", title="predictions"),
        alt.Tooltip("accuracy:Q", format=".3f"),
        alt.Tooltip("mean_confidence:Q", format=".3f"),
        alt.Tooltip("gap:Q", format="+.3f", title="gap (conf - acc)"),
    ]
    bars = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=x,
            xOffset=offset,
            y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy"),
            color=alt.Color("model:N", title="model"),
            tooltip=tooltip,
        )
    )
    ticks = (
        alt.Chart()
        .mark_tick(color="black", thickness=2)
        .encode(x=x, xOffset=offset, y="mean_confidence:Q", tooltip=tooltip)
    )
    return alt.layer(bars, ticks, data=buckets).properties(
        title="Accuracy per confidence bucket (tick: mean confidence)", width=420, height=260
    )


def risk_coverage_chart(curve: pd.DataFrame, *, coverage: float | None = None) -> alt.LayerChart:
    """Risk (error rate) vs coverage when answering only above a confidence threshold.

    Parameters
    ----------
    curve
        :func:`kit.analysis.calibration.risk_coverage_curves` output.
    coverage
        Draw a dashed vertical rule at this coverage (e.g. the 80% of
        ``accuracy_at_80_coverage``).

    Returns
    -------
    alt.LayerChart
        Data: ``curve`` itself; the threshold behind each point is in the tooltip.
    """
    alt = _altair()
    _require(curve, _CURVE_COLUMNS, "risk_coverage_chart")
    line = (
        alt.Chart()
        .mark_line(point=alt.OverlayMarkDef(size=14))
        .encode(
            x=alt.X("coverage:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("risk:Q", title="risk (error rate among answered)"),
            color=alt.Color("model:N", title="model"),
            tooltip=[
                alt.Tooltip("model:N"),
                alt.Tooltip("threshold:Q", format=".3f"),
                alt.Tooltip("coverage:Q", format=".1%"),
                alt.Tooltip("accuracy:Q", format=".3f"),
                alt.Tooltip("risk:Q", format=".3f"),
            ],
        )
    )
    layers = [line]
    if coverage is not None:
        layers.append(
            alt.Chart()
            .transform_aggregate(rows="count()")
            .mark_rule(strokeDash=[4, 4], color="gray")
            .encode(x=alt.XDatum(coverage))
        )
    return alt.layer(*layers, data=curve).properties(
        title="Risk-coverage (answer only above a confidence threshold)", width=420, height=260
    )
