"""Interactive explorer for notebooks: pick a candidate, a slice column and a metric.

A thin wrapper: every number comes from :mod:`kit.stages.drilldown` (compute) and every picture
from :mod:`kit.report.charts.comparison`. Headless runs (papermill, CI, the CLI) never need this
module; ipywidgets is imported only when :func:`slice_explorer` is called.

Example
-------
>>> slice_explorer("runs/demo")                 # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kit.errors import CompkitError, DependencyMissing

if TYPE_CHECKING:
    import ipywidgets

    from kit.stages.drilldown import DrilldownTables

ALL_VALUES = "(all values)"


def _ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError:
        raise DependencyMissing("ipywidgets", "core", "the slice explorer") from None
    return ipywidgets


def slice_explorer(
    run_dir: str | Path,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    k: int = 10,
    tables: DrilldownTables | None = None,
    outcomes: pd.DataFrame | None = None,
) -> ipywidgets.VBox:
    """A VBox: dropdowns (candidate, slice column, metric, slice value) above the slice's
    delta chart and the candidate's right->wrong examples side by side.

    Parameters
    ----------
    run_dir
        A run folder with the baseline's and candidates' stored outputs.
    n_resamples, seed
        Bootstrap settings when ``tables`` is not given.
    k
        Most examples shown.
    tables, outcomes
        Already computed :func:`kit.stages.drilldown.drilldown_tables` /
        :func:`kit.stages.drilldown.load_run_outcomes` results (the notebook passes its own).

    Returns
    -------
    ipywidgets.VBox
        ``children[0]`` holds the dropdowns, ``children[1]`` the chart and table outputs.
    """
    from kit.run import Run
    from kit.stages.drilldown import read_drilldown_tables, side_by_side

    w = _ipywidgets()
    frozen = Run.open(run_dir)
    baseline, candidates = frozen.baseline, frozen.candidates()
    if not candidates:
        raise CompkitError(f"{run_dir}: no candidate outputs to explore (run stage 2 first)")
    outcomes = frozen.outcomes() if outcomes is None else outcomes
    if tables is None:
        tables = read_drilldown_tables(frozen)
    table = tables.slice_table
    outputs, slices = frozen.outputs(), frozen.slices()
    metrics = list(dict.fromkeys(table["metric"]))
    columns = [c for c in dict.fromkeys(table["slice"]) if c != "overall"]
    if not columns:
        raise CompkitError(f"{run_dir}: the slice table has no slice columns")
    layout = w.Layout(width="auto")
    pick_model = w.Dropdown(options=candidates, description="candidate", layout=layout)
    pick_slice = w.Dropdown(options=columns, description="slice", layout=layout)
    pick_metric = w.Dropdown(
        options=metrics,
        value="accuracy" if "accuracy" in metrics else metrics[0],
        description="metric",
        layout=layout,
    )
    pick_value = w.Dropdown(options=[ALL_VALUES], description="examples in", layout=layout)
    chart_out = w.Output(layout=w.Layout(flex="1 1 50%"))
    table_out = w.Output(layout=w.Layout(flex="1 1 50%", overflow="auto"))

    def values_for(column: str) -> list[str]:
        shown = table.loc[table["slice"] == column, "slice_value"]
        return [ALL_VALUES, *sorted(dict.fromkeys(shown.astype(str)))]

    def draw(_: Any = None) -> None:
        from kit.report.charts.comparison import slice_delta_chart

        rows = table[table["model"] == pick_model.value]
        chart_out.outputs = ()
        try:
            chart: Any = slice_delta_chart(rows, metric=pick_metric.value, slice=pick_slice.value)
        except CompkitError as exc:
            chart = str(exc)
        chart_out.append_display_data(chart)
        value = pick_value.value
        examples = side_by_side(
            outcomes,
            outputs,
            frozen.eval_set,
            baseline=baseline,
            candidate=pick_model.value,
            slices=slices,
            k=k,
            slice=None if value in (None, ALL_VALUES) else {pick_slice.value: value},
        )
        table_out.outputs = ()
        table_out.append_display_data(
            examples if len(examples) else f"no right->wrong items for {pick_model.value}"
        )

    def new_column(change: Any) -> None:
        pick_value.options = values_for(change["new"])
        pick_value.value = ALL_VALUES  # fires draw() when it changes

    pick_value.options = values_for(pick_slice.value)
    pick_slice.observe(new_column, names="value")
    for control in (pick_model, pick_slice, pick_metric, pick_value):
        control.observe(draw, names="value")
    draw()
    return w.VBox(
        [
            w.HBox([pick_model, pick_slice, pick_metric, pick_value]),
            w.HBox([chart_out, table_out]),
        ]
    )
