"""A threshold slider over the routing stage's judged curve (JupyterLab only).

Moving it shows the routed system at that threshold (every metric, fallback rate, p95,
cost): exploration only, on the held-out curve; the verdict reads the rule chosen on the
calibration items, never the slider.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from kit.errors import DependencyMissing
from kit.routing.sweep import at_threshold


def threshold_slider(curve: pd.DataFrame, *, candidate: str, start: float) -> Any:
    """An ipywidgets box: a slider over ``candidate``'s judged thresholds and the table."""
    try:
        import ipywidgets as w
    except ImportError:
        raise DependencyMissing("ipywidgets", "core", "the routing threshold slider") from None
    grid = sorted(curve.loc[(curve["candidate"] == candidate), "threshold"].unique())
    slider = w.SelectionSlider(
        options=[(f"{t:.3f}", t) for t in grid],
        value=min(grid, key=lambda t: abs(t - start)),
        description="threshold",
        continuous_update=False,
    )
    out = w.Output()

    def show(change: Any = None) -> None:
        out.clear_output(wait=True)
        with out:
            from IPython.display import display

            display(at_threshold(curve, candidate=candidate, threshold=slider.value).round(4))

    slider.observe(show, names="value")
    show()
    return w.VBox([slider, out])
