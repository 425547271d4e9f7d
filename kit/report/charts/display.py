"""How kit's charts reach the screen with no network: SVG for exports, Vega widgets live.

altair 6's default renderer loads Vega from a CDN, and JupyterLab 4's built-in renderer only
knows Vega-Lite v3-v5, so neither draws offline. :func:`use_charts` enables one of two altair
renderers registered here:

``compkit-static``
    The chart drawn by vl-convert (bundled Vega, no browser): ``image/svg+xml`` (what the
    notebook's HTML export and a trusted JupyterLab output show) and ``image/png`` (what
    JupyterLab shows for an untrusted output, e.g. a notebook papermill executed). No script,
    and the data are text nodes of the SVG, escaped as XML.
``compkit-interactive``
    altair's :class:`~altair.JupyterChart` widget with its JavaScript bundled by vl-convert
    (``JupyterChart.enable_offline()``): real Vega (tooltips, selections) in JupyterLab,
    with the bundle sent to the browser over the widget's comm, not fetched.

``use_charts()`` picks by where the kernel runs: interactive when a person runs the cell in a
Jupyter frontend (the execute request allows input), static under papermill / nbconvert /
nbclient (they never allow input), so executed notebooks and their exports always hold SVG.

Example
-------
>>> use_charts()                    # in a notebook's first cell             # doctest: +SKIP
'compkit-static'
>>> chart_svg(delta_chart(table, metric="accuracy"))[:4]                    # doctest: +SKIP
'<svg'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from kit.errors import CompkitError, DependencyMissing

if TYPE_CHECKING:
    import altair as alt

STATIC = "compkit-static"
INTERACTIVE = "compkit-interactive"
Mode = Literal["compkit-static", "compkit-interactive"]


def _altair() -> Any:
    try:
        import altair as alt
    except ImportError:
        raise DependencyMissing("altair", "core", "kit.report.charts") from None
    return alt


def _vl_convert() -> Any:
    try:
        import vl_convert
    except ImportError:
        raise DependencyMissing("vl-convert-python", "core", "offline charts") from None
    return vl_convert


def vl_version() -> str:
    """The Vega-Lite version altair writes, in vl-convert's spelling (``"6.4"``)."""
    alt = _altair()
    wanted = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    known = _vl_convert().get_vegalite_versions()
    if wanted not in known:
        raise CompkitError(
            f"vl-convert {_vl_convert().__version__} cannot draw Vega-Lite {wanted} "
            f"(altair {alt.__version__}); it knows {known}: install matching versions"
        )
    return wanted


def _spec(chart: alt.TopLevelMixin | dict) -> dict:
    return chart if isinstance(chart, dict) else chart.to_dict()


def chart_svg(chart: alt.TopLevelMixin | dict) -> str:
    """The chart as an SVG document drawn by vl-convert (no browser, no network)."""
    return _vl_convert().vegalite_to_svg(_spec(chart), vl_version=vl_version())


def chart_png(chart: alt.TopLevelMixin | dict, *, scale: float = 1.0) -> bytes:
    """The chart as PNG bytes drawn by vl-convert."""
    return _vl_convert().vegalite_to_png(_spec(chart), vl_version=vl_version(), scale=scale)


def _title(spec: dict) -> str:
    title = spec.get("title")
    if isinstance(title, dict):
        title = title.get("text")
    if isinstance(title, list):
        title = " ".join(map(str, title))
    return str(title) if title else "chart"


def static_bundle(spec: dict, **_: Any) -> dict[str, Any]:
    """The ``compkit-static`` renderer: SVG + PNG (+ text) of a Vega-Lite spec."""
    import base64

    return {
        "image/svg+xml": chart_svg(spec),
        "image/png": base64.b64encode(chart_png(spec)).decode("ascii"),
        "text/plain": f"<compkit chart: {_title(spec)}>",
    }


def interactive_chart(chart: alt.TopLevelMixin, **kwargs: Any) -> alt.JupyterChart:
    """``chart`` as an offline :class:`altair.JupyterChart` widget (Vega bundled inline).

    Its ``selections`` / ``params`` traits carry what the user clicked; the drill-down
    observes them (:mod:`kit.report.widgets`).
    """
    alt = _altair()
    try:
        alt.JupyterChart.enable_offline()
    except ImportError:
        raise DependencyMissing("anywidget", "core", "interactive charts") from None
    return alt.JupyterChart(chart, **kwargs)


_TOP_LEVEL = (
    ("layer", "LayerChart"),
    ("vconcat", "VConcatChart"),
    ("hconcat", "HConcatChart"),
    ("concat", "ConcatChart"),
    ("facet", "FacetChart"),
    ("repeat", "RepeatChart"),
)


def chart_from_spec(spec: dict) -> alt.TopLevelMixin:
    """The altair chart object of a top-level Vega-Lite spec (layer, concat, facet or single)."""
    alt = _altair()
    name = next((cls for key, cls in _TOP_LEVEL if key in spec), "Chart")
    return getattr(alt, name).from_dict(spec, validate=False)


def interactive_bundle(spec: dict, **_: Any) -> dict[str, Any]:
    """The ``compkit-interactive`` renderer: a JupyterChart widget's mimebundle."""
    chart = chart_from_spec(spec)
    bundle = interactive_chart(chart)._repr_mimebundle_()
    return bundle[0] if isinstance(bundle, tuple) else bundle


def frontend_is_interactive() -> bool:
    """Whether the running cell was sent by a person's Jupyter frontend.

    JupyterLab, Notebook and VS Code send execute requests that allow input; papermill,
    nbclient and ``nbconvert --execute`` never do. Outside a kernel: False.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


_CHOICES = {"auto": None, "yes": True, "true": True, "no": False, "false": False}


def use_charts(interactive: bool | str | None = None) -> Mode:
    """Register kit's offline renderers and enable one for every altair chart displayed.

    Parameters
    ----------
    interactive
        ``True`` / ``"yes"``: Vega widgets (JupyterLab); ``False`` / ``"no"``: SVG/PNG drawn
        in the kernel; ``None`` / ``"auto"`` (default): :func:`frontend_is_interactive`
        decides.

    Returns
    -------
    str
        The renderer enabled: ``"compkit-interactive"`` or ``"compkit-static"``.
    """
    if isinstance(interactive, str):
        if interactive.strip().lower() not in _CHOICES:
            raise CompkitError(
                f"interactive={interactive!r}: use one of {sorted(_CHOICES)} (or True / False)"
            )
        interactive = _CHOICES[interactive.strip().lower()]
    if interactive is not None and not isinstance(interactive, bool):
        raise CompkitError(f"interactive={interactive!r}: use 'auto', 'yes', 'no', True or False")
    alt = _altair()
    alt.renderers.register(STATIC, static_bundle)
    alt.renderers.register(INTERACTIVE, interactive_bundle)
    live = frontend_is_interactive() if interactive is None else interactive
    mode: Mode = INTERACTIVE if live else STATIC
    alt.renderers.enable(mode)
    return mode


def note(text: str, *, kind: str = "info") -> Any:
    """A message for a notebook output: escaped HTML (with a plain-text twin), drawn the same
    in JupyterLab and in the HTML export, never a quoted Python string."""
    import html

    from IPython.display import HTML

    colors = {"info": "#31708f", "warning": "#8a6d3b", "error": "#a94442"}
    if kind not in colors:
        raise CompkitError(f"note kind {kind!r} is not one of {sorted(colors)}")
    return HTML(f'<p class="compkit-note" style="color:{colors[kind]}">{html.escape(text)}</p>')
