"""Altair charts of paired comparisons: deltas with CIs, slices, flips, worst slices, noise.

Every function takes a frame produced by :mod:`kit.analysis.compare` or :mod:`kit.analysis.slices` and
returns an altair chart whose data are rows of that frame, unchanged: the keyword
arguments (``metric``, ``slice``) only select which rows to draw. Nothing is computed here;
the colour of a row reads its CI bounds in the spec (``status``: clear drop, clear gain,
CI includes 0), with the direction taken from :data:`kit.scoring.METRICS`.

Charts with error bars are layers (``alt.LayerChart``: rule for the CI, point for the
delta, dashed rule at zero); the others are single ``alt.Chart`` objects.

Example
-------
>>> table = compare_models(outcomes, baseline="base")                  # doctest: +SKIP
>>> delta_chart(table, metric="accuracy")                              # doctest: +SKIP
>>> slice_delta_chart(slice_table(...), metric="accuracy", slice="language")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from kit.errors import CompkitError, DependencyMissing

if TYPE_CHECKING:
    import altair as alt

#: Flip kinds drawn by default (the unchanged ones would dwarf them).
CHANGED_FLIPS = ("right_to_wrong", "wrong_to_right", "wrong_to_other_wrong")
FLIP_COLORS = {
    "right_to_wrong": "#d62728",
    "wrong_to_right": "#2ca02c",
    "wrong_to_other_wrong": "#ff7f0e",
    "unchanged_right": "#c7e9c0",
    "unchanged_wrong": "#d9d9d9",
}
STATUS_COLORS = {"clear drop": "#d62728", "clear gain": "#2ca02c", "CI includes 0": "#7f7f7f"}
_DELTA_COLUMNS = ["model", "slice", "slice_value", "metric", "delta", "ci_low", "ci_high", "n"]


def _altair() -> Any:
    try:
        import altair as alt
    except ImportError:
        raise DependencyMissing("altair", "core", "kit.report.charts") from None
    return alt


def _select(
    frame: pd.DataFrame,
    needed: Sequence[str],
    what: str,
    *,
    allow_empty: bool = False,
    **equals: Any,
) -> pd.DataFrame:
    """Rows of ``frame`` whose columns equal ``equals`` (values untouched)."""
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise CompkitError(f"{what} needs column(s) {missing}; got {list(frame.columns)}")
    mask = pd.Series(True, index=frame.index)
    for column, value in equals.items():
        mask &= frame[column] == value
    rows = frame[mask]
    if rows.empty and not allow_empty:
        shown = ", ".join(f"{k}={v!r}" for k, v in equals.items())
        raise CompkitError(f"{what}: no rows with {shown}")
    return rows


def _higher_is_better(metric: str) -> bool:
    from kit.analysis.compare import metric_info

    return metric_info(metric).higher_is_better


def _status_expr(higher: bool) -> str:
    below, above = ("clear drop", "clear gain") if higher else ("clear gain", "clear drop")
    return f"datum.ci_high < 0 ? '{below}' : (datum.ci_low > 0 ? '{above}' : 'CI includes 0')"


def _status_color(alt: Any) -> Any:
    return alt.Color(
        "status:N",
        title="delta",
        scale=alt.Scale(domain=list(STATUS_COLORS), range=list(STATUS_COLORS.values())),
    )


def _axis_title(metric: str, higher: bool) -> str:
    return f"{metric}: candidate - baseline ({'higher' if higher else 'lower'} is better)"


def _delta_tooltip(alt: Any, *extra: Any) -> list[Any]:
    return [
        alt.Tooltip("model:N"),
        *extra,
        alt.Tooltip("value:Q", format=".3f"),
        alt.Tooltip("baseline_value:Q", format=".3f"),
        alt.Tooltip("delta:Q", format="+.3f"),
        alt.Tooltip("ci_low:Q", format="+.3f"),
        alt.Tooltip("ci_high:Q", format="+.3f"),
        alt.Tooltip("n:Q"),
        alt.Tooltip("p_value:Q", format=".3g"),
    ]


def _ci_layers(
    alt: Any, *, y: Any, x_title: str, tooltip: list[Any], y_offset: Any = None, shape: Any = None
) -> list[Any]:
    """Rule from ci_low to ci_high, a point at delta, a dashed rule at zero (no data)."""
    offset = {} if y_offset is None else {"yOffset": y_offset}
    marker = {} if shape is None else {"shape": shape}
    ci = (
        alt.Chart()
        .mark_rule(strokeWidth=2)
        .encode(
            x=alt.X("ci_low:Q", title=x_title),
            x2="ci_high:Q",
            y=y,
            color=_status_color(alt),
            **offset,
        )
    )
    point = (
        alt.Chart()
        .mark_point(filled=True, size=70)
        .encode(x="delta:Q", y=y, color=_status_color(alt), tooltip=tooltip, **offset, **marker)
    )
    zero = alt.Chart().mark_rule(strokeDash=[4, 4], color="black").encode(x=alt.datum(0))
    return [ci, point, zero]


def delta_chart(table: pd.DataFrame, *, metric: str) -> alt.LayerChart:
    """Each candidate's overall delta vs the baseline with its CI and a zero rule.

    Parameters
    ----------
    table
        :func:`kit.analysis.compare.compare_models` or :func:`kit.analysis.slices.slice_table` output.
    metric
        Registered metric name (``accuracy``); rows with ``slice="overall"`` are drawn.

    Returns
    -------
    alt.LayerChart
        Data: the table's overall rows for ``metric``; one row per model.
    """
    alt = _altair()
    rows = _select(table, _DELTA_COLUMNS, "delta_chart", metric=metric, slice="overall")
    higher = _higher_is_better(metric)
    layers = _ci_layers(
        alt,
        y=alt.Y("model:N", title=None, sort=None),
        x_title=_axis_title(metric, higher),
        tooltip=_delta_tooltip(alt),
    )
    return (
        alt.layer(*layers, data=rows)
        .transform_calculate(status=_status_expr(higher))
        .properties(title=f"{metric}: overall delta vs baseline (95% CI)")
    )


def slice_delta_chart(table: pd.DataFrame, *, metric: str, slice: str) -> alt.LayerChart:
    """Delta per value of one slice column with CI bars, ``n`` in the tooltip, coloured by
    whether the CI excludes 0 (clear drop / clear gain / CI includes 0).

    Parameters
    ----------
    table
        :func:`kit.analysis.slices.slice_table` output.
    metric, slice
        Registered metric name and slice column (``language``).

    Returns
    -------
    alt.LayerChart
        Data: the table's rows for ``metric`` and ``slice``. Several models are offset
        within each slice value and told apart by shape.
    """
    alt = _altair()
    rows = _select(table, _DELTA_COLUMNS, "slice_delta_chart", metric=metric, slice=slice)
    higher = _higher_is_better(metric)
    several = rows["model"].nunique() > 1
    layers = _ci_layers(
        alt,
        y=alt.Y("slice_value:N", title=slice, sort=None),
        x_title=_axis_title(metric, higher),
        tooltip=_delta_tooltip(alt, alt.Tooltip("slice_value:N", title=slice)),
        y_offset=alt.YOffset("model:N") if several else None,
        shape=alt.Shape("model:N") if several else None,
    )
    return (
        alt.layer(*layers, data=rows)
        .transform_calculate(status=_status_expr(higher))
        .properties(title=f"{metric} delta by {slice} (95% CI)")
    )


def flip_chart(
    flips: pd.DataFrame,
    *,
    slice: str = "overall",
    slice_value: str = "all",
    kinds: Sequence[str] = CHANGED_FLIPS,
) -> alt.Chart:
    """Stacked bars of flip rates per candidate, one colour per direction.

    Parameters
    ----------
    flips
        :func:`kit.analysis.compare.flip_table` output.
    slice, slice_value
        Which rows to draw (default: over all items).
    kinds
        Flip kinds to stack (default: the changed ones; add ``unchanged_*`` for the rest).

    Returns
    -------
    alt.Chart
        Bars of ``rate`` (count and n in the tooltip); data: the selected rows.
    """
    alt = _altair()
    needed = ["model", "metric", "slice", "slice_value", "flip", "count", "n", "rate"]
    rows = _select(flips, needed, "flip_chart", slice=slice, slice_value=slice_value)
    rows = rows[rows["flip"].isin(list(kinds))]
    order = {k: i for i, k in enumerate(kinds)}
    return (
        alt.Chart(rows)
        .transform_calculate(kind_order=f"indexof({list(kinds)!r}, datum.flip)")
        .mark_bar()
        .encode(
            x=alt.X(
                "rate:Q", stack="zero", title="share of paired items", axis=alt.Axis(format="%")
            ),
            y=alt.Y("model:N", title=None, sort=None),
            color=alt.Color(
                "flip:N",
                title="flip",
                scale=alt.Scale(domain=list(order), range=[FLIP_COLORS[k] for k in kinds]),
            ),
            order=alt.Order("kind_order:Q"),
            tooltip=[
                "model:N",
                "flip:N",
                alt.Tooltip("count:Q"),
                alt.Tooltip("n:Q"),
                alt.Tooltip("rate:Q", format=".1%"),
            ],
        )
        .properties(
            title="Flips vs baseline" + ("" if slice == "overall" else f" ({slice}={slice_value})")
        )
    )


def worst_slices_chart(worst: pd.DataFrame) -> alt.LayerChart:
    """The worst slices (as ranked by :func:`kit.analysis.slices.worst_slices`) with their CIs.

    Slices keep the frame's order (worst first); the colour tells whether even the CI's
    optimistic end is a drop (``clear_drop``).

    Returns
    -------
    alt.LayerChart
        Data: the ``worst`` frame itself.
    """
    alt = _altair()
    needed = [*_DELTA_COLUMNS, "harm_bound", "clear_drop"]
    rows = _select(worst, needed, "worst_slices_chart", allow_empty=True)
    if rows.empty:
        return _message_chart(alt, "no slice to rank: every slice is smaller than min_n")
    metrics = rows["metric"].unique()
    if len(metrics) != 1:
        raise CompkitError(f"worst_slices_chart draws one metric; the frame has {list(metrics)}")
    higher = _higher_is_better(metrics[0])
    several = rows["model"].nunique() > 1
    layers = _ci_layers(
        alt,
        y=alt.Y("label:N", title=None, sort=None),
        x_title=_axis_title(metrics[0], higher),
        tooltip=_delta_tooltip(
            alt, alt.Tooltip("label:N", title="slice"), alt.Tooltip("harm_bound:Q", format=".3f")
        ),
        y_offset=alt.YOffset("model:N") if several else None,
        shape=alt.Shape("model:N") if several else None,
    )
    return (
        alt.layer(*layers, data=rows)
        .transform_calculate(label="datum.slice + '=' + datum.slice_value")
        .transform_calculate(status=_status_expr(higher))
        .properties(title=f"Worst slices: {metrics[0]} delta (95% CI)")
    )


def noise_floor_overlay(
    table: pd.DataFrame,
    noise: pd.DataFrame,
    *,
    metric: str,
    slice: str = "overall",
    slice_value: str = "all",
) -> alt.LayerChart:
    """Candidates' deltas next to the baseline's delta against its own repeats.

    Parameters
    ----------
    table
        :func:`kit.analysis.compare.compare_models` / :func:`kit.analysis.slices.slice_table` output.
    noise
        :func:`kit.analysis.compare.noise_floor` output (``model`` = baseline, ``repeat`` = r).
    metric, slice, slice_value
        Which rows of both frames to draw.

    Returns
    -------
    alt.LayerChart
        Two data sets: the candidates' selected rows (coloured by status) and the noise
        floor's selected rows (grey, labelled ``"<baseline> repeat r vs 0 (noise)"``). A
        candidate whose CI sits inside the grey rows' spread is within run-to-run noise.
        With a single baseline repeat the noise floor is empty and only the candidates
        are drawn (the title says so).
    """
    alt = _altair()
    select = {"metric": metric, "slice": slice, "slice_value": slice_value}
    rows = _select(table, _DELTA_COLUMNS, "noise_floor_overlay", **select)
    floor = _select(
        noise,
        [*_DELTA_COLUMNS, "repeat"],
        "noise_floor_overlay (noise)",
        allow_empty=True,
        **select,
    )
    higher = _higher_is_better(metric)
    y = alt.Y("label:N", title=None, sort=None)
    tooltip = _delta_tooltip(alt)
    candidates = alt.layer(
        *_ci_layers(alt, y=y, x_title=_axis_title(metric, higher), tooltip=tooltip)[:2], data=rows
    ).transform_calculate(label="datum.model", status=_status_expr(higher))
    grey = alt.value("#9e9e9e")
    noise_layers = [
        alt.Chart().mark_rule(strokeWidth=2).encode(x="ci_low:Q", x2="ci_high:Q", y=y, color=grey),
        alt.Chart()
        .mark_point(filled=True, size=70, shape="diamond")
        .encode(x="delta:Q", y=y, color=grey, tooltip=[alt.Tooltip("repeat:Q"), *tooltip]),
    ]
    baseline_noise = alt.layer(*noise_layers, data=floor).transform_calculate(
        label="datum.model + ' repeat ' + datum.repeat + ' vs 0 (noise)'"
    )
    zero = alt.Chart(rows).mark_rule(strokeDash=[4, 4], color="black").encode(x=alt.datum(0))
    where = "" if slice == "overall" else f" ({slice}={slice_value})"
    title = f"{metric} delta vs baseline next to the baseline's own noise{where}"
    if floor.empty:
        title = f"{metric} delta vs baseline{where} (no noise floor: the baseline has one repeat)"
    return alt.layer(candidates, baseline_noise, zero).properties(title=title)


def slice_overview_chart(table: pd.DataFrame, *, metric: str) -> alt.VConcatChart:
    """:func:`slice_delta_chart` for every slice column of ``table``, stacked.

    Returns
    -------
    alt.VConcatChart
        One panel per slice column (in the table's order); each panel's data are that
        column's rows for ``metric``.
    """
    alt = _altair()
    columns = [c for c in dict.fromkeys(table["slice"]) if c != "overall"]
    if not columns:
        raise CompkitError("slice_overview_chart: the table has no slice rows")
    return alt.vconcat(
        *[slice_delta_chart(table, metric=metric, slice=c) for c in columns]
    ).resolve_scale(color="shared")


def _message_chart(alt: Any, text: str) -> alt.Chart:
    """A chart that only says ``text`` (nothing to draw)."""
    return (
        alt.Chart(pd.DataFrame({"message": [text]}))
        .mark_text(align="left", fontSize=13)
        .encode(text="message:N")
        .properties(title=text, width=400, height=30)
    )


def slice_pick_chart(
    table: pd.DataFrame,
    *,
    model: str,
    metric: str,
    slice: str,
    select: str | None = "slice_pick",
) -> alt.LayerChart:
    """One candidate's change per value of ``slice`` with its CI, the slice's size on the axis,
    and (with ``select``) a click selection on the slice value: the drill-down's chart.

    Parameters
    ----------
    table
        :func:`kit.analysis.slices.slice_table` output.
    model, metric, slice
        Which rows to draw: one candidate, one metric, one slice column.
    select
        Name of the point selection (fields ``slice_value``; a click picks a value, a
        double click clears it), or ``None`` for a static chart. The picked value is
        outlined and the others fade.

    Returns
    -------
    alt.LayerChart
        Data: the selected rows of ``table``; the y labels read ``value (n=N)``.
    """
    alt = _altair()
    rows = _select(
        table, _DELTA_COLUMNS, "slice_pick_chart", model=model, metric=metric, slice=slice
    )
    higher = _higher_is_better(metric)
    y = alt.Y("label:N", title=f"{slice} (items)", sort=None)
    tooltip = _delta_tooltip(alt, alt.Tooltip("slice_value:N", title=slice))
    ci, point, zero = _ci_layers(alt, y=y, x_title=_axis_title(metric, higher), tooltip=tooltip)
    if select is not None:
        pick = alt.selection_point(
            name=select, fields=["slice_value"], on="click", clear="dblclick", empty=True
        )
        fade = alt.condition(pick, alt.value(1.0), alt.value(0.3))
        point = point.add_params(pick).encode(
            opacity=fade,
            size=alt.condition(pick, alt.value(160), alt.value(90)),
            stroke=alt.condition(pick, alt.value("black"), alt.value(None)),
        )
        ci = ci.encode(opacity=fade)
    height = max(60, 28 * rows["slice_value"].nunique())
    return (
        alt.layer(ci, point, zero, data=rows)
        .transform_calculate(
            status=_status_expr(higher),
            label="datum.slice_value + ' (n=' + datum.n + ')'",
        )
        .properties(
            title=f"{model}: {metric} change by {slice} (95% CI)"
            + (" · click a slice for its items" if select else ""),
            width=380,
            height=height,
        )
    )
