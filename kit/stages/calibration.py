"""Calibration (stage 4): read a run, compute every calibration table, write them.

The compute lives in :mod:`kit.analysis.calibration` (pure functions on frames); this module
only reads the run (stored outputs for the confidences, ``outcomes.parquet`` for correctness,
the frozen slices) and writes ``tables/``. Every interval has the study's ``confidence``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kit.analysis.calibration import (
    abstention_comparison,
    abstention_items,
    abstention_metrics,
    calibration_comparison,
    calibration_metrics,
    confidence_buckets,
    confidence_frame,
    missing_confidence,
    reliability_bins,
    risk_coverage_curves,
    selective_table,
    usable_predictions,
)
from kit.analysis.compare import RESULT_COLUMNS
from kit.analysis.slices import default_slice_columns
from kit.run import Run


@dataclass(frozen=True)
class CalibrationTables:
    """What :func:`write_calibration_tables` wrote (the frames and their paths)."""

    baseline: str
    source: str
    confidence: pd.DataFrame
    missing: pd.DataFrame
    metrics: pd.DataFrame
    comparison: pd.DataFrame
    reliability: pd.DataFrame
    buckets: pd.DataFrame
    risk_coverage: pd.DataFrame
    selective: pd.DataFrame
    abstention: pd.DataFrame
    paths: dict[str, Path]


def write_calibration_tables(
    run: str | Path | Run,
    *,
    confidence: str = "auto",
    n_bins: int = 10,
    coverage: float = 0.8,
    target_accuracy: float = 0.9,
    n_resamples: int = 2000,
    seed: int = 0,
    slice_columns: Sequence[str] | None = None,
    check: bool = True,
) -> CalibrationTables:
    """Compute every calibration table of a run and write them under ``tables/``.

    Writes ``calibration_metrics`` (per model; plus the abstention metrics),
    ``calibration_comparison`` (the evidence: :data:`kit.analysis.compare.RESULT_COLUMNS`
    with BCa intervals, per slice), ``reliability`` (per model x slice x bin, both
    strategies), ``confidence_buckets``, ``risk_coverage``, ``selective``, ``abstention`` (per
    item) and ``missing_confidence`` as parquet, and ``calibration.json`` (parameters, kit
    version, git sha, time).

    Parameters
    ----------
    confidence
        Confidence source, one of :data:`kit.analysis.calibration.SOURCES`.
    slice_columns
        Slice columns for the comparison and reliability tables; default every slice column.
    check
        Call :func:`kit.stages.freeze.require_unchanged` first (the gate of every later stage).
    """
    from kit.environment import kit_info
    from kit.stages.freeze import require_unchanged
    from kit.store import atomic_write_json, now_iso

    run = Run.open(run)
    if check:
        require_unchanged(run.root)
    level = run.confidence
    outputs, outcomes = run.outputs(), run.outcomes()
    conf = confidence_frame(outputs, outcomes, source=confidence)
    slices = run.slices()
    columns = list(slice_columns) if slice_columns is not None else default_slice_columns(slices)
    abstention = abstention_items(outcomes, run.eval_set, outputs=outputs)
    usable = set(usable_predictions(conf)["model"])
    comparison = pd.concat(
        [
            calibration_comparison(
                conf,
                baseline=run.baseline,
                slices_frame=slices,
                slice_columns=columns,
                n_bins=n_bins,
                coverage=coverage,
                n_resamples=n_resamples,
                confidence=level,
                seed=seed,
            )
            if run.baseline in usable and len(usable) > 1
            else pd.DataFrame(columns=RESULT_COLUMNS),
            abstention_comparison(
                abstention,
                baseline=run.baseline,
                n_resamples=n_resamples,
                confidence=level,
                seed=seed,
            ),
        ],
        ignore_index=True,
    )
    tables = CalibrationTables(
        baseline=run.baseline,
        source=confidence,
        confidence=conf,
        missing=missing_confidence(conf),
        metrics=pd.concat(
            [
                calibration_metrics(conf, n_bins=n_bins, coverage=coverage),
                abstention_metrics(outcomes, run.eval_set, outputs=outputs),
            ],
            ignore_index=True,
        ),
        comparison=comparison,
        reliability=reliability_bins(
            conf, slices_frame=slices, slice_columns=columns, n_bins=n_bins
        ),
        buckets=confidence_buckets(conf),
        risk_coverage=risk_coverage_curves(conf),
        selective=selective_table(conf, coverage=coverage, target_accuracy=target_accuracy),
        abstention=abstention,
        paths={},
    )
    names = {
        "calibration_metrics": tables.metrics,
        "calibration_comparison": tables.comparison,
        "reliability": tables.reliability,
        "confidence_buckets": tables.buckets,
        "risk_coverage": tables.risk_coverage,
        "selective": tables.selective,
        "abstention": tables.abstention,
        "missing_confidence": tables.missing,
    }
    for name, frame in names.items():
        tables.paths[name] = run.write_table(name, frame)
    tables.paths["provenance"] = run.tables_dir / "calibration.json"
    atomic_write_json(
        tables.paths["provenance"],
        {
            "kind": "compkit.calibration",
            "created_at": now_iso(),
            "kit": kit_info().model_dump(),
            "baseline": run.baseline,
            "models": sorted(conf["model"].astype(str).unique()),
            "parameters": {
                "confidence_source": confidence,
                "n_bins": n_bins,
                "coverage": coverage,
                "target_accuracy": target_accuracy,
                "n_resamples": n_resamples,
                "seed": seed,
                "slice_columns": columns,
                "confidence": level,
            },
            "tables": {k: str(v.name) for k, v in tables.paths.items()},
        },
    )
    return tables
