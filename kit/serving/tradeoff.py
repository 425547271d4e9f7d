"""The trade in one frame: what each candidate buys in serving against what it pays in quality.

:func:`tradeoff_frame` joins, per candidate, a quality change (stage 3's overall delta of
``accuracy`` with its paired CI when given, else the serving stage's paired
``accuracy_under_load`` change) with each serving gain read from the serving evidence
(overall rows, candidate against baseline):

=================  ============================================  =========================
gain               from                                          value (CI)
=================  ============================================  =========================
``speed-up``       ``throughput_rps`` ratio                      1 + rel (x baseline)
``cost saving``    ``cost_per_1k_correct_usd`` (else per req.)   -rel (share saved)
``memory saving``  ``peak_memory_mb``                            -rel (share saved)
``size saving``    ``size_on_disk_mb``                           -rel (share saved)
``TTFT p95 cut``   ``ttft_p95_ms``                               -rel (share saved)
=================  ============================================  =========================

:func:`kit.report.charts.serving.tradeoff_chart` draws it.
"""

from __future__ import annotations

import pandas as pd

TRADEOFF_COLUMNS = [
    "model",
    "gain",
    "gain_value",
    "gain_low",
    "gain_high",
    "gain_unit",
    "quality_metric",
    "quality_delta",
    "quality_low",
    "quality_high",
    "quality_source",
]
_GAINS = (
    ("speed-up", ("throughput_rps",), "ratio"),
    ("cost saving", ("cost_per_1k_correct_usd", "cost_per_request_usd"), "saved"),
    ("memory saving", ("peak_memory_mb",), "saved"),
    ("size saving", ("size_on_disk_mb",), "saved"),
    ("TTFT p95 cut", ("ttft_p95_ms",), "saved"),
)


def tradeoff_frame(
    evidence: pd.DataFrame, quality: pd.DataFrame | None = None, *, metric: str = "accuracy"
) -> pd.DataFrame:
    """One row per candidate and gain (module docstring); ``quality`` is stage 3's overall
    deltas (``model, slice, metric, delta, ci_low, ci_high``)."""
    overall = evidence[(evidence["slice"] == "overall") & evidence["baseline_value"].notna()]
    rows = []
    for model, g in overall.groupby("model", sort=False):
        q = _quality(model, g, quality, metric)
        if q is None:
            continue
        for gain, metrics, kind in _GAINS:
            row = next(
                (g[g["metric"] == m].iloc[0] for m in metrics if (g["metric"] == m).any()), None
            )
            if row is None:
                continue
            if kind == "ratio":
                value, low, high, unit = (
                    1 + row["rel"],
                    1 + row["rel_ci_low"],
                    1 + row["rel_ci_high"],
                    "x baseline",
                )
            else:
                value, low, high, unit = (
                    -row["rel"],
                    -row["rel_ci_high"],
                    -row["rel_ci_low"],
                    "share saved",
                )
            rows.append(
                {
                    "model": model,
                    "gain": gain,
                    "gain_value": value,
                    "gain_low": low,
                    "gain_high": high,
                    "gain_unit": unit,
                    **q,
                }
            )
    return pd.DataFrame(rows, columns=TRADEOFF_COLUMNS)


def _quality(model: str, g: pd.DataFrame, quality: pd.DataFrame | None, metric: str) -> dict | None:
    if quality is not None and not quality.empty:
        q = quality[
            (quality["model"] == model)
            & (quality["slice"] == "overall")
            & (quality["metric"] == metric)
        ]
        if len(q):
            r = q.iloc[0]
            return {
                "quality_metric": metric,
                "quality_delta": r["delta"],
                "quality_low": r["ci_low"],
                "quality_high": r["ci_high"],
                "quality_source": "stage 3 (unloaded)",
            }
    r = g[g["metric"] == "accuracy_under_load"]
    if r.empty:
        return None
    r = r.iloc[0]
    return {
        "quality_metric": "accuracy_under_load",
        "quality_delta": r["delta"],
        "quality_low": r["ci_low"],
        "quality_high": r["ci_high"],
        "quality_source": "stage 5 (under load)",
    }
