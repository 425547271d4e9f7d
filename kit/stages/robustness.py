"""Robustness (stage 4b): perturbations, prediction distributions and numerical artifacts.

Reads the run folder only: ``outcomes.parquet`` (clean and perturbed items, scored once by
stage 2), the frozen perturbation record, the stored outputs (option probabilities,
confidences, lengths) and the teacher-forced token distributions (``distributions/``).
Computes with :mod:`kit.analysis.robustness` and :mod:`kit.analysis.distributions`; every
interval has the study's ``confidence``.

Tables (``runs/NAME/tables/``)
------------------------------
``robustness_evidence``    evidence: ``*_shift`` (the candidate's change under each
                           perturbation; ``delta`` = the robustness gap) and
                           ``perturbation_flip_rate``, per perturbation and pooled
``perturbation_flips``     flips by direction under each perturbation, every model
``perturbation_items``     the frozen perturbed items (source, detail, prompt length, bucket)
``distribution_evidence``  evidence: ``mean_token_kl``, ``same_top_token_rate``,
                           ``reference_token_delta_p``, ``choice_kl``, ``choice_js``
``kl_statistics``          llama.cpp-style statistics per candidate (long)
``kl_percentiles``         token-KL percentiles per candidate (the percentile chart)
``token_divergence``       per candidate and item: positions, KL sum / mean / max, ...
``choice_divergence``      per candidate and choice item: KL, JS, TV, top option changed
``distribution_shift``     label / option / confidence / length / caveat shift tests
``kl_flip``                KL next to the flip rate per slice value (``kl_flip_relation``)
``kl_flip_relation``       correlations over slices, AUC of item KL for flipped items
``artifact_rates``         empty / looping / truncated / NaN-logit answers per model, on the
                           clean items and under each perturbation (Clopper–Pearson)
``robustness.json``        parameters, per-candidate distribution status, kit version, time
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kit.analysis.compare import RESULT_COLUMNS, item_flips
from kit.analysis.distributions import (
    choice_divergence_items,
    choice_evidence,
    distribution_shift,
    item_divergence,
    kl_flip_relation,
    kl_flip_table,
    kl_percentiles,
    kl_statistics,
    not_comparable_rows,
    token_divergence,
    token_evidence,
)
from kit.analysis.robustness import (
    perturbation_flip_evidence,
    perturbation_flips,
    perturbation_pairs,
    robustness_evidence,
    shift_metrics,
)
from kit.analysis.slices import default_slice_columns
from kit.run import Run
from kit.scoring.artifacts import ARTIFACT_COLUMNS
from kit.stats.intervals import proportion_ci

TOKEN_METRICS = ("mean_token_kl", "same_top_token_rate", "reference_token_delta_p")
ARTIFACT_METRICS = {
    "empty_output": "empty_output_rate",
    "degenerate_repetition": "repetition_rate",
    "truncated": "truncation_rate",
    "nonfinite_logits": "nonfinite_logit_rate",
}
#: Slice columns the distribution evidence is broken down by (when the run has them).
EVIDENCE_SLICES = ("task", "language", "length_bucket")


@dataclass
class RobustnessTables:
    """What :func:`write_robustness_tables` wrote (frames by table name) and its status."""

    baseline: str
    candidates: list[str]
    tables: dict[str, pd.DataFrame]
    status: dict[str, dict[str, Any]]
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


# --------------------------------------------------------------------------- perturbations


def perturbation_tables(run: Run, *, n_resamples: int, seed: int) -> dict[str, pd.DataFrame]:
    """``robustness_evidence``, ``perturbation_flips`` and ``perturbation_items``."""
    level, baseline, cands = run.confidence, run.baseline, run.candidates()
    items = run.perturbations()
    empty = {
        "robustness_evidence": pd.DataFrame(columns=RESULT_COLUMNS),
        "perturbation_flips": perturbation_flips(
            pd.DataFrame(columns=["model", "perturbation", "original", "perturbed"]),
            confidence=level,
        ),
        "perturbation_items": items,
    }
    if items.empty:
        return empty
    outcomes = run.outcomes(items="all")
    pairs = {
        metric: perturbation_pairs(outcomes, items, column=column)
        for metric, column in shift_metrics(outcomes).items()
    }
    if "accuracy_shift" not in pairs:
        return empty
    evidence = [
        robustness_evidence(
            pairs,
            baseline=baseline,
            candidates=cands,
            confidence=level,
            n_resamples=n_resamples,
            seed=seed,
        ),
        perturbation_flip_evidence(
            pairs["accuracy_shift"],
            baseline=baseline,
            candidates=cands,
            confidence=level,
            n_resamples=n_resamples,
            seed=seed,
        ),
    ]
    return {
        "robustness_evidence": pd.concat(evidence, ignore_index=True),
        "perturbation_flips": perturbation_flips(pairs["accuracy_shift"], confidence=level),
        "perturbation_items": items,
    }


# --------------------------------------------------------------------------- distributions


def _distribution_inputs(run: Run) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """Stored distributions of the comparable models, and a status per candidate."""
    status: dict[str, dict[str, Any]] = {}
    stored = set(run.distribution_models())
    if run.baseline not in stored:
        reason = (
            "the baseline has no token distributions (its runtime exposes no logits, or the "
            "study set distributions.enabled: false)"
        )
        return {}, {c: {"status": "not measured", "reason": reason} for c in run.candidates()}
    frames = {run.baseline: run.distributions(run.baseline)}
    for cand in run.candidates():
        meta = run.distribution_meta(cand)
        if cand not in stored:
            status[cand] = {"status": "not measured", "reason": _unmeasured_reason(run, cand)}
        elif meta.get("comparable") is False:
            status[cand] = {"status": "not comparable", "reason": meta.get("reason", "")}
        else:
            frames[cand] = run.distributions(cand)
            status[cand] = {"status": "scored", "reason": ""}
    return frames, status


def _unmeasured_reason(run: Run, cand: str) -> str:
    """Why stage 2 stored no distributions for ``cand`` (its manifest says, e.g. the ray
    engine), else: its runtime exposes no logits."""
    manifest = run.candidate_manifest(cand)
    reason = (manifest.distributions or {}).get("reason") if manifest is not None else None
    return reason or "no token distributions: the candidate's runtime exposes no logits"


def _slice_columns(run: Run) -> list[str]:
    present = default_slice_columns(run.slices())
    return [c for c in EVIDENCE_SLICES if c in present]


def distribution_tables(run: Run, *, n_resamples: int, seed: int) -> tuple[dict, dict]:
    """Token and choice distribution tables, shift tests and the KL-vs-flip relation."""
    level, baseline, cands = run.confidence, run.baseline, run.candidates()
    slices, columns = run.slices(), _slice_columns(run)
    frames, status = _distribution_inputs(run)
    positions = token_divergence(frames, baseline=baseline) if len(frames) > 1 else None
    if positions is None:
        positions = token_divergence({baseline: pd.DataFrame()}, baseline=baseline)
    per_item = item_divergence(positions)
    outputs, outcomes = run.outputs(), run.outcomes()
    choices = choice_divergence_items(outputs, baseline=baseline, candidates=cands)
    evidence = [
        token_evidence(
            per_item,
            slices=slices,
            slice_columns=columns,
            confidence=level,
            n_resamples=n_resamples,
            seed=seed,
        ),
        choice_evidence(
            choices,
            slices=slices,
            slice_columns=columns,
            confidence=level,
            n_resamples=n_resamples,
            seed=seed,
        ),
    ]
    for cand, st in status.items():
        if st["status"] == "not comparable":
            evidence.append(
                not_comparable_rows(cand, st["reason"], TOKEN_METRICS, confidence=level)
            )
    flips = item_flips(outcomes, baseline=baseline, candidates=cands) if cands else None
    kl_items = per_item.rename(columns={"kl_mean": "kl"})[["model", "item_id", "kl"]]
    measure = "token_kl"
    if kl_items.empty:
        kl_items, measure = choices[["model", "item_id", "kl"]], "choice_kl"
    kl_flip = kl_flip_table(
        kl_items,
        flips if flips is not None else pd.DataFrame(columns=["model", "item_id", "flip"]),
        slices=slices,
        slice_columns=default_slice_columns(slices),
        measure=measure,
    )
    tables = {
        "distribution_evidence": _concat(evidence),
        "kl_statistics": kl_statistics(positions),
        "kl_percentiles": kl_percentiles(positions),
        "token_divergence": per_item,
        "choice_divergence": choices,
        "distribution_shift": distribution_shift(
            outputs, outcomes, baseline=baseline, candidates=cands, confidence=level
        ),
        "kl_flip": kl_flip,
        "kl_flip_relation": kl_flip_relation(
            kl_flip,
            kl_items,
            flips if flips is not None else pd.DataFrame(columns=["model", "item_id", "flip"]),
        ),
    }
    return tables, status


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.concat(frames, ignore_index=True).reindex(columns=RESULT_COLUMNS)


# --------------------------------------------------------------------------- artifacts


def artifact_rates(run: Run) -> pd.DataFrame:
    """Empty, looping, truncated and NaN-logit answers per model: on the clean items
    (``items = "clean"``) and on the perturbed copies of each perturbation."""
    outcomes = run.outcomes(items="all")
    groups = {"clean": outcomes[outcomes["item_id"].isin(run.item_ids("clean"))]}
    items = run.perturbations()
    if len(items):
        names = outcomes["item_id"].map(items.set_index("id")["perturbation"])
        for name in sorted(items["perturbation"].unique()):
            groups[str(name)] = outcomes[names == name]
    rows = []
    for label, part in groups.items():
        for column, metric in ARTIFACT_METRICS.items():
            if column not in part.columns:
                continue
            per_item = part.groupby(["model", "item_id"])[column].max().dropna()
            for model, values in per_item.groupby(level="model", sort=False):
                count, n = int(values.sum()), int(values.size)
                lo, hi = proportion_ci(count, n, confidence=run.confidence)
                rows.append(
                    {
                        "model": model,
                        "metric": metric,
                        "items": label,
                        "count": count,
                        "n": n,
                        "rate": count / n if n else np.nan,
                        "ci_low": lo,
                        "ci_high": hi,
                        "method": "clopper_pearson",
                        "confidence": run.confidence,
                    }
                )
    columns = [
        "model",
        "metric",
        "items",
        "count",
        "n",
        "rate",
        "ci_low",
        "ci_high",
        "method",
        "confidence",
    ]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- the stage


def write_robustness_tables(
    run: str | Path | Run,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    check: bool = True,
) -> RobustnessTables:
    """Compute every robustness table of a run and write them under ``tables/``.

    Parameters
    ----------
    n_resamples, seed
        Bootstrap settings (pooled rows, token and choice metrics).
    check
        Call :func:`kit.stages.freeze.require_unchanged` first (the gate of every later stage).
    """
    from kit.environment import kit_info
    from kit.stages.freeze import require_unchanged
    from kit.store import atomic_write_json, now_iso

    run = Run.open(run)
    if check:
        require_unchanged(run.root)
    tables = perturbation_tables(run, n_resamples=n_resamples, seed=seed)
    dist, status = distribution_tables(run, n_resamples=n_resamples, seed=seed)
    tables |= dist
    tables["artifact_rates"] = artifact_rates(run)
    out = RobustnessTables(run.baseline, run.candidates(), tables, status)
    for name, frame in tables.items():
        out.paths[name] = run.write_table(name, frame)
    out.paths["provenance"] = run.tables_dir / "robustness.json"
    record = run.perturbation_record()
    atomic_write_json(
        out.paths["provenance"],
        {
            "kind": "compkit.robustness",
            "created_at": now_iso(),
            "kit": kit_info().model_dump(),
            "baseline": run.baseline,
            "candidates": out.candidates,
            "distributions": status,
            "perturbations": {
                "items": len(tables["perturbation_items"]),
                "skipped": len(record.get("skipped", [])),
                "suite": (record.get("config") or {}).get("suite", []),
            },
            "parameters": {
                "n_resamples": n_resamples,
                "seed": seed,
                "confidence": run.confidence,
                "artifact_columns": list(ARTIFACT_COLUMNS),
            },
            "tables": {k: str(v.name) for k, v in out.paths.items()},
        },
    )
    return out
