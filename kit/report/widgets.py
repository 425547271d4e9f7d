"""Interactive drill-down for notebooks: click a slice or a confidence bin, read its items.

In the spirit of Zeno's comparison view: pick a candidate, a metric and a slice column; the
chart shows the candidate's change per slice value with its CI and the slice's size, and a
click on a slice lists that slice's items side by side (input, reference, both outputs, the
flip direction, both confidences), filterable by flip direction and searchable by text. A
second tab lists the discovered slices with their definitions (a click selects one), a third
links the reliability diagram to its bins (a click on a bin lists its items).

Only wiring lives here: numbers come from :mod:`kit.stages.drilldown` /
:mod:`kit.analysis.items`, charts from :mod:`kit.report.charts` (drawn as offline
:class:`altair.JupyterChart` widgets, so clicks reach Python), and the item table is HTML
rendered by Jinja2 with autoescape (no data reaches the page unescaped). ipywidgets is
imported only when an explorer is built; headless runs never need this module.

Example
-------
>>> slice_explorer("runs/demo")                      # in JupyterLab     # doctest: +SKIP
>>> calibration_explorer("runs/demo")                                    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kit.errors import CompkitError, DependencyMissing

if TYPE_CHECKING:
    import ipywidgets

    from kit.stages.drilldown import DrilldownTables, ExplorerInputs

SLICE_PICK = "slice_pick"
BIN_PICK = "bin_pick"
ALL_FLIPS = "all"
FLIP_LABELS = {
    "right_to_wrong": "right → wrong",
    "wrong_to_right": "wrong → right",
    "wrong_to_other_wrong": "wrong → other wrong",
    "unchanged_right": "both right",
    "unchanged_wrong": "both wrong",
    "worse": "worse",
    "better": "better",
    "unchanged": "unchanged",
}
_LIGHT_FLIPS = ("unchanged_right", "unchanged_wrong")  # pale badges take dark text
_ITEMS_TEMPLATE = """
<style>
.ck-items { max-height: 640px; overflow: auto; width: 100%; box-sizing: border-box; }
.ck-items table { table-layout: fixed; width: 100%; border-collapse: collapse; font-size: 12px; }
.ck-items th { position: sticky; top: 0; background: #f3f3f3; text-align: left !important; padding: 4px; }
.ck-items td { vertical-align: top; padding: 4px; border-top: 1px solid #ddd; text-align: left !important;
  white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; }
.ck-flip { display: inline-block; padding: 1px 6px; border-radius: 8px; line-height: 1.4; }
.ck-muted { color: #666; }
</style>
{% if title %}<h4 class="ck-title">{{ title }}</h4>{% endif %}
<div class="ck-items">
<table class="ck-items-table">
<colgroup><col style="width:9%"><col style="width:10%"><col style="width:22%">
<col style="width:13%"><col style="width:18%"><col style="width:18%"><col style="width:10%">
</colgroup>
<thead><tr><th>item</th><th>flip</th><th>input</th><th>reference</th>
<th>baseline: {{ baseline }}</th><th>candidate: {{ candidate }}</th>
<th>confidence<br>baseline → candidate</th></tr></thead>
<tbody>
{%- for r in rows %}
<tr data-item="{{ r.item_id }}">
<td>{{ r.item_id }}<br><span class="ck-muted">{{ r.task }}</span></td>
<td><span class="ck-flip" style="background:{{ r.color }};color:{{ r.ink }}">{{ r.flip_label }}</span></td>
<td>{{ r.input }}</td><td>{{ r.reference }}</td>
<td>{{ r.baseline_output }}</td><td>{{ r.candidate_output }}</td>
<td>{{ r.baseline_confidence }} → {{ r.candidate_confidence }}</td>
</tr>
{%- endfor %}
</tbody></table></div>
"""


def _ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError:
        raise DependencyMissing("ipywidgets", "core", "the drill-down explorer") from None
    return ipywidgets


def _jinja() -> Any:
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _confidence(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.2f}"


def items_html(
    items: pd.DataFrame, *, baseline: str, candidate: str, title: str | None = None
) -> str:
    """The item table as HTML (autoescaped; text wraps, the table never outgrows its box),
    under an optional ``title``."""
    from kit.report.charts.comparison import FLIP_COLORS

    rows = [
        {
            "item_id": r.item_id,
            "task": r.task,
            "flip_label": FLIP_LABELS.get(r.flip, r.flip),
            "color": FLIP_COLORS.get(r.flip, "#7f7f7f"),
            "ink": "#222" if r.flip in _LIGHT_FLIPS else "#fff",
            "input": r.input,
            "reference": r.reference,
            "baseline_output": r.baseline_output,
            "candidate_output": r.candidate_output,
            "baseline_confidence": _confidence(r.baseline_confidence),
            "candidate_confidence": _confidence(r.candidate_confidence),
        }
        for r in items.itertuples(index=False)
    ]
    return (
        _jinja()
        .from_string(_ITEMS_TEMPLATE)
        .render(rows=rows, baseline=baseline, candidate=candidate, title=title)
    )


def notice(text: str, *, kind: str = "info") -> ipywidgets.HTML:
    """A message as a widget (escaped), not a bare string."""
    import html

    w = _ipywidgets()
    colors = {"info": "#31708f", "warning": "#8a6d3b", "error": "#a94442"}
    return w.HTML(
        f'<div style="color:{colors.get(kind, "#333")};padding:4px 0">{html.escape(text)}</div>'
    )


@dataclass
class _Pick:
    """What the user selected: a slice (``"column=value"`` or a discovered conjunction),
    a confidence bin (whose model, its edges, whether it is the first bin)."""

    slice: dict[str, str] | None = None
    bin_model: str | None = None
    bin_range: tuple[float, float] | None = None
    first_bin: bool = False


class Explorer:
    """The drill-down: controls, the slice chart, discovered slices, the reliability diagram
    and the items of the current selection. ``widget`` is the ipywidgets box to display.

    The methods :meth:`pick_slice` and :meth:`pick_bin` are what a click on the chart does
    (tests call them directly); the chart widgets' selections call them in a live session.
    """

    def __init__(
        self,
        data: ExplorerInputs,
        *,
        page_size: int = 25,
        tabs: tuple[str, ...] = ("slices", "discovered", "calibration"),
    ):
        if page_size < 1:
            raise CompkitError(f"page_size must be at least 1, got {page_size}")
        w = _ipywidgets()
        self.data, self.page_size, self.shown = data, page_size, page_size
        self.pick = _Pick()
        self.items = pd.DataFrame()
        metrics = [m for m in data.metrics if _has_outcomes(data, m)]
        if not metrics or not data.slice_columns:
            raise CompkitError("the slice table has no metric with per-item outcomes to explore")
        wide = w.Layout(width="auto")
        self.candidate = w.Dropdown(options=data.candidates, description="candidate", layout=wide)
        self.metric = w.Dropdown(options=metrics, description="metric", layout=wide)
        self.column = w.Dropdown(options=data.slice_columns, description="slice", layout=wide)
        self.flips = w.ToggleButtons(options=[(ALL_FLIPS, ALL_FLIPS)], value=ALL_FLIPS)
        self.flips.style.button_width = "auto"
        self.search = w.Text(placeholder="search input, reference, outputs", description="search")
        self.status = w.HTML()
        self.clear = w.Button(description="clear selection", icon="times")
        self.more = w.Button(description=f"show {page_size} more")
        self.table = w.HTML(layout=w.Layout(width="100%"))
        self.slice_box = w.Box(layout=w.Layout(width="100%", overflow="auto"))
        self.discovered = w.Select(options=[], rows=8, layout=w.Layout(width="100%"))
        self.discovered_note = w.HTML()
        self.bin_box = w.Box(layout=w.Layout(width="100%", overflow="auto"))
        self._slice_chart: Any = None
        self._bin_chart: Any = None
        self.widget = self._layout(tabs)
        self._wire()
        self._reload()

    # ---------------------------------------------------------------- layout and wiring

    def _layout(self, tabs: tuple[str, ...]) -> ipywidgets.VBox:
        w = _ipywidgets()
        panels = {
            "slices": ("Slices", w.VBox([self.slice_box])),
            "discovered": ("Discovered slices", w.VBox([self.discovered_note, self.discovered])),
            "calibration": ("Calibration", w.VBox([self.bin_box])),
        }
        unknown = [t for t in tabs if t not in panels]
        if unknown:
            raise CompkitError(f"unknown explorer tab(s) {unknown}; tabs: {list(panels)}")
        tab = w.Tab(children=[panels[t][1] for t in tabs])
        for i, t in enumerate(tabs):
            tab.set_title(i, panels[t][0])
        self.tab = tab
        controls = w.HBox(
            [self.candidate, self.metric, self.column], layout=w.Layout(flex_flow="row wrap")
        )
        filters = w.HBox([self.search, self.clear], layout=w.Layout(flex_flow="row wrap"))
        return w.VBox(
            [controls, tab, self.flips, filters, self.status, self.table, self.more],
            layout=w.Layout(width="100%"),
        )

    def _wire(self) -> None:
        self.candidate.observe(lambda _: self._reload(), names="value")
        self.metric.observe(lambda _: self._reload(), names="value")
        self.column.observe(lambda _: self._draw_slices(), names="value")
        self.flips.observe(lambda _: self._refresh(reset=True), names="value")
        self.search.observe(lambda _: self._refresh(reset=True), names="value")
        self.discovered.observe(self._on_discovered, names="value")
        self.clear.on_click(lambda _: self.clear_selection())
        self.more.on_click(lambda _: self._show_more())

    # ---------------------------------------------------------------- user actions

    def pick_slice(self, value: str | None) -> None:
        """Select the items whose current slice column equals ``value`` (what a click on the
        slice chart does); ``None`` clears the slice."""
        self.pick.slice = None if value is None else {self.column.value: str(value)}
        self._refresh(reset=True)

    def pick_discovered(self, definition: str | None) -> None:
        """Select a discovered slice by its definition (``"channel=email & task=refusal"``)."""
        from kit.analysis.items import parse_slice

        self.pick.slice = parse_slice(definition) if definition else None
        self._refresh(reset=True)

    def pick_bin(self, model: str | None, bin: int | None = None) -> None:
        """Select ``model``'s reliability bin number ``bin``; ``None`` clears it."""
        if model is None:
            self.pick.bin_model, self.pick.bin_range, self.pick.first_bin = None, None, False
        else:
            rows = self.data.reliability
            row = rows[
                (rows["model"] == model) & (rows["bin"] == bin) & (rows["slice"] == "overall")
            ]
            if row.empty:
                raise CompkitError(f"model {model!r} has no reliability bin {bin}")
            self.pick.bin_model = model
            self.pick.bin_range = (float(row["lower"].iloc[0]), float(row["upper"].iloc[0]))
            self.pick.first_bin = int(bin) == 0
        self._refresh(reset=True)

    def clear_selection(self) -> None:
        """Forget the picked slice and bin (the filters stay)."""
        self.pick = _Pick()
        if self.discovered.value is not None:
            self.discovered.value = None
        self._refresh(reset=True)

    def _show_more(self) -> None:
        self.shown += self.page_size
        self._refresh(reset=False)

    def _on_discovered(self, change: Any) -> None:
        if change["new"] is not None:
            self._guarded(self.pick_discovered, change["new"])

    # ---------------------------------------------------------------- redraws

    def _reload(self) -> None:
        """A new candidate or metric: new items, charts and discovered slices."""
        self.pick = _Pick()
        self.items = self.data.items(candidate=self.candidate.value, metric=self.metric.value)
        kinds = list(dict.fromkeys(self.items["flip"]))
        order = [k for k in FLIP_LABELS if k in kinds] + [k for k in kinds if k not in FLIP_LABELS]
        self._flip_kinds = order
        self._draw_slices()
        self._draw_discovered()
        self._draw_bins()
        self._refresh(reset=True)

    def _draw_slices(self) -> None:
        from kit.report.charts.comparison import slice_pick_chart

        self.pick.slice = None
        try:
            chart = slice_pick_chart(
                self.data.slice_table,
                model=self.candidate.value,
                metric=self.metric.value,
                slice=self.column.value,
                select=SLICE_PICK,
            )
        except CompkitError as exc:
            self.slice_box.children = [notice(str(exc), kind="warning")]
            self._refresh(reset=True)
            return
        self._slice_chart = self._chart_widget(self._slice_chart, chart, self._on_slice_click)
        self.slice_box.children = [self._slice_chart]
        self._refresh(reset=True)

    def _draw_discovered(self) -> None:
        found = self.data.discovered(candidate=self.candidate.value, metric=self.metric.value)
        if found.empty:
            self.discovered_note.value = notice(
                f"no discovered slices for {self.candidate.value} on {self.metric.value}"
            ).value
            self.discovered.options = []
            return
        self.discovered_note.value = notice(
            "Slices where right→wrong flips concentrate (SliceLine score); click one to list "
            "its items. Definition · items · flips · flip rate vs overall."
        ).value
        self.discovered.options = [
            (
                f"{r.slice} · n={r.n} · {r.flips} flips · {r.flip_rate:.0%} vs "
                f"{r.overall_flip_rate:.0%} (lift {r.lift:.1f})",
                r.slice,
            )
            for r in found.itertuples(index=False)
        ]
        self.discovered.value = None

    def _draw_bins(self) -> None:
        from kit.report.charts.calibration import reliability_chart

        models = [self.data.baseline, self.candidate.value]
        bins = self.data.reliability
        bins = bins[bins["model"].isin(models)]
        if bins.empty:
            self.bin_box.children = [
                notice(f"no confidences ({self.data.confidence_source}) for {models}")
            ]
            return
        chart = reliability_chart(bins, strategy="uniform", select=BIN_PICK)
        self._bin_chart = self._chart_widget(self._bin_chart, chart, self._on_bin_click)
        self.bin_box.children = [self._bin_chart]

    def _chart_widget(self, current: Any, chart: Any, callback: Any) -> Any:
        """An offline JupyterChart for ``chart`` (reused when one exists), observed."""
        from kit.report.charts.display import interactive_chart

        if current is None:
            current = interactive_chart(chart, embed_options={"renderer": "svg", "actions": False})
        else:
            current.chart = chart  # JupyterChart rebuilds its selections here
        current.selections.observe(callback)
        return current

    def _on_slice_click(self, change: Any) -> None:
        values = getattr(change["new"], "value", None) or []
        self._guarded(self.pick_slice, str(values[0]["slice_value"]) if values else None)

    def _on_bin_click(self, change: Any) -> None:
        values = getattr(change["new"], "value", None) or []
        if values:
            self._guarded(self.pick_bin, str(values[0]["model"]), int(values[0]["bin"]))
        else:
            self._guarded(self.pick_bin, None)

    def _guarded(self, action: Any, *args: Any) -> None:
        """Run a click's action; a CompkitError shows in the status line, never vanishes."""
        try:
            action(*args)
        except CompkitError as exc:
            self.status.value = notice(str(exc), kind="error").value

    def selection(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The items of the picked slice / bin, and of those the ones the flip filter and the
        search keep (all of them, not one page)."""
        from kit.analysis.items import select_items

        flips = None if self.flips.value == ALL_FLIPS else [self.flips.value]
        which = None
        if self.pick.bin_model is not None:
            which = "baseline" if self.pick.bin_model == self.data.baseline else "candidate"
        picked = select_items(
            self.items,
            slice=self.pick.slice,
            confidence_of=which,
            confidence_range=self.pick.bin_range,
            first_bin=self.pick.first_bin,
        )
        return picked, select_items(picked, flips=flips, search=self.search.value)

    def _refresh(self, *, reset: bool) -> None:
        if not hasattr(self, "_flip_kinds"):
            return  # still building
        from kit.analysis.items import flip_counts

        if reset:
            self.shown = self.page_size
        picked, shown = self.selection()
        counts = dict(flip_counts(picked).itertuples(index=False))
        options = [(f"all ({len(picked)})", ALL_FLIPS)] + [
            (f"{FLIP_LABELS.get(k, k)} ({counts.get(k, 0)})", k) for k in self._flip_kinds
        ]
        if list(self.flips.options) != options:
            value = self.flips.value
            with self.flips.hold_trait_notifications():
                self.flips.options = options
                self.flips.value = value if value in dict(options).values() else ALL_FLIPS
        self.status.value = self._status_html(len(shown), len(self.items))
        self.clear.disabled = self.pick.slice is None and self.pick.bin_model is None
        page = shown.head(self.shown)
        self.more.layout.display = None if len(shown) > len(page) else "none"
        if page.empty:
            self.table.value = notice("no items match this selection").value
            return
        self.table.value = items_html(
            page, baseline=self.data.baseline, candidate=self.candidate.value
        )

    def _status_html(self, n: int, total: int) -> str:
        import html

        parts = [f"{n} of {total} items of {self.candidate.value} on {self.metric.value}"]
        if self.pick.slice:
            parts.append("slice " + " & ".join(f"{k}={v}" for k, v in self.pick.slice.items()))
        if self.pick.bin_model is not None and self.pick.bin_range is not None:
            lo, hi = self.pick.bin_range
            parts.append(f"{self.pick.bin_model} confidence in ({lo:.2f}, {hi:.2f}]")
        if self.flips.value != ALL_FLIPS:
            parts.append(FLIP_LABELS.get(self.flips.value, self.flips.value))
        if self.search.value.strip():
            parts.append(f"containing {self.search.value.strip()!r}")
        return f'<div class="ck-status">{html.escape(" · ".join(parts))}</div>'


def _has_outcomes(data: ExplorerInputs, metric: str) -> bool:
    from kit.analysis.items import outcome_column

    try:
        outcome_column(data.outcomes, metric)
    except CompkitError:
        return False
    return True


def slice_explorer(
    run_dir: str | Path,
    *,
    tables: DrilldownTables | None = None,
    outcomes: pd.DataFrame | None = None,
    inputs: ExplorerInputs | None = None,
    page_size: int = 25,
) -> ipywidgets.VBox:
    """The drill-down explorer of a run (notebook 03 shows it in interactive sessions).

    Parameters
    ----------
    run_dir
        A run folder with the drill-down tables (notebook 03 writes them).
    tables, outcomes
        The notebook's already computed tables and outcome table (saves re-reading).
    inputs
        Already loaded :func:`kit.stages.drilldown.explorer_inputs` (then ``run_dir``,
        ``tables`` and ``outcomes`` are not read).
    page_size
        Items listed at once ("show more" adds as many).

    Returns
    -------
    ipywidgets.VBox
        The explorer's widget; :class:`Explorer` is reachable as ``box.explorer``.
    """
    from kit.stages.drilldown import explorer_inputs

    if inputs is None:
        inputs = explorer_inputs(run_dir, tables=tables, outcomes=outcomes)
    explorer = Explorer(inputs, page_size=page_size)
    explorer.widget.explorer = explorer
    return explorer.widget


def calibration_explorer(
    run_dir: str | Path, *, outcomes: pd.DataFrame | None = None, page_size: int = 25
) -> ipywidgets.VBox:
    """The reliability diagram linked to its bins' items (notebook 04, interactive)."""
    from kit.stages.drilldown import explorer_inputs

    explorer = Explorer(
        explorer_inputs(run_dir, outcomes=outcomes), page_size=page_size, tabs=("calibration",)
    )
    explorer.widget.explorer = explorer
    return explorer.widget
