"""Every serving table from the stored timelines (pure compute; the stage does the I/O).

:func:`compute_tables` takes the concatenated per-request timelines of a run, the eval set,
the models' deployment records and cost blocks, and returns the frames the stage writes as
``tables/serving_<name>.parquet``: ``latency``, ``throughput``, ``errors``, ``variants``,
``outcomes``, ``quality``, ``batch_flips``, ``resources``, ``cost``, ``runtime_agreement``,
``status``, ``points`` (which profile each overall figure comes from) and ``evidence``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kit.evalset import EvalSet
from kit.serving.cost import EVAL_GROUPS, PointData, cost_rows, operating_point
from kit.serving.evidence import EVIDENCE_COLUMNS, Measured, serving_evidence
from kit.serving.latency import (
    error_table,
    latency_table,
    per_request,
    throughput_table,
    variant_table,
)
from kit.serving.quality import batch_flips, quality_table, runtime_agreement, score_under_load
from kit.study import CostSpec, ServingConfig, SLOConfig

TABLE_NAMES = (
    "latency",
    "throughput",
    "errors",
    "variants",
    "outcomes",
    "quality",
    "batch_flips",
    "resources",
    "cost",
    "runtime_agreement",
    "status",
    "points",
    "evidence",
)
RESOURCE_FIELDS = {
    "peak_memory_mb": "peak_rss_mb",
    "peak_gpu_memory_mb": "peak_gpu_mb",
    "size_on_disk_mb": "size_on_disk_mb",
    "cold_start_s": "cold_start_s",
}


@dataclass(frozen=True)
class TableInputs:
    """What :func:`compute_tables` reads besides the timelines."""

    eval_set: EvalSet
    config: ServingConfig
    baseline: str
    records: Sequence[Mapping[str, Any]]  # kit.stages.serving.ModelRecord dumps
    costs: Mapping[str, CostSpec]
    slo: SLOConfig | None
    stored_outputs: pd.DataFrame  # stage 1-2 output rows (for runtime agreement)
    confidence: float = 0.95


def compute_tables(timeline: pd.DataFrame, inputs: TableInputs) -> dict[str, pd.DataFrame]:
    """All serving tables (module docstring); empty frames where nothing was measured."""
    conf, half = inputs.confidence, 1 - (1 - inputs.confidence) / 2
    status = pd.DataFrame([_status(r) for r in inputs.records])
    if timeline.empty:
        empty = {k: pd.DataFrame() for k in TABLE_NAMES if k not in ("status", "evidence")}
        return {"status": status, **empty, "evidence": pd.DataFrame(columns=EVIDENCE_COLUMNS)}
    reqs = per_request(timeline)
    throughput = throughput_table(timeline, slo=inputs.slo, confidence=conf)
    outcomes = score_under_load(inputs.eval_set, timeline)
    profiles = _profiles(timeline)
    refs = _quality_references(profiles)
    points = _points(profiles, throughput, inputs)
    tables = {
        "latency": latency_table(timeline, confidence=conf),
        "throughput": throughput,
        "errors": error_table(timeline, confidence=conf),
        "variants": variant_table(timeline),
        "outcomes": outcomes,
        "quality": quality_table(outcomes, references=refs, confidence=conf),
        "batch_flips": _batch_table(outcomes, profiles, inputs),
        "resources": _resources(inputs.records),
        "cost": _costs(reqs, throughput, outcomes, points, inputs),
        "runtime_agreement": runtime_agreement(outcomes, inputs.stored_outputs),
        "status": status,
        "points": _points_frame(points),
    }
    measured = Measured(
        baseline=inputs.baseline,
        reqs=reqs,
        latency=tables["latency"],
        throughput=throughput,
        throughput_half=throughput_table(timeline, slo=inputs.slo, confidence=half),
        outcomes=outcomes,
        quality=tables["quality"],
        batch=tables["batch_flips"],
        resources=tables["resources"],
        cost=tables["cost"],
        references={m: p["reference"] for m, p in points.items() if p["reference"]},
        operating={m: p["operating"] for m, p in points.items() if p["operating"]},
        confidence=conf,
        peaks={(m, k): v for m, p in points.items() for k, v in p["peaks"].items() if v},
    )
    tables["evidence"] = serving_evidence(measured)
    return tables


def _status(r: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "model",
        "deploy",
        "status",
        "reason",
        "measured_requests",
        "warmup_discarded",
        "wall_s",
    )
    return {**{k: r.get(k) for k in keys}, "profiles": ", ".join(r.get("profiles") or [])}


def _profiles(timeline: pd.DataFrame) -> pd.DataFrame:
    cols = ["model", "profile", "kind", "group", "slice", "slice_value", "concurrency"]
    return timeline[cols].drop_duplicates(["model", "profile"]).reset_index(drop=True)


def _quality_references(profiles: pd.DataFrame) -> dict[str, str]:
    refs = {}
    for model, g in profiles.groupby("model", sort=False):
        names = set(g["profile"])
        ref = (
            "synchronous"
            if "synchronous" in names
            else ("batch_size=1" if "batch_size=1" in names else None)
        )
        if ref is not None:
            refs[model] = ref
    return refs


def latency_reference(reference: str, names: set[str]) -> str | None:
    """The profile whose latencies are a model's overall figures: ``reference`` itself, or
    for a model in process its batch counterpart (synchronous = batch size 1, concurrency=N
    = batch size N, throughput = the largest batch)."""
    if reference in names:
        return reference
    batch = sorted(int(n.split("=")[1]) for n in names if n.startswith("batch_size="))
    if not batch:
        return None
    if reference == "synchronous":
        return "batch_size=1" if 1 in batch else None
    if reference == "throughput":
        return f"batch_size={batch[-1]}"
    m = re.fullmatch(r"(?:concurrency|batch_size)=(\d+)", reference)
    return f"batch_size={m.group(1)}" if m and int(m.group(1)) in batch else None


def _points(profiles, throughput, inputs: TableInputs) -> dict[str, dict[str, Any]]:
    out = {}
    for model, g in profiles.groupby("model", sort=False):
        peaks = {}
        for metric in ("throughput_rps", "output_tokens_per_s", "goodput_rps"):
            rows = throughput[
                (throughput["model"] == model)
                & (throughput["metric"] == metric)
                & throughput["group"].isin(EVAL_GROUPS)
            ].dropna(subset=["value"])
            peaks[metric] = (
                str(
                    rows.sort_values(["value", "profile"], ascending=[False, True]).iloc[0][
                        "profile"
                    ]
                )
                if len(rows)
                else None
            )
        out[model] = {
            "reference": latency_reference(inputs.config.reference, set(g["profile"])),
            "operating": operating_point(throughput, model, goodput=inputs.slo is not None),
            "peaks": peaks,
        }
    return out


def _points_frame(points: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for model, p in points.items():
        rows.append({"model": model, "figure": "latency (overall rows)", "profile": p["reference"]})
        rows.append(
            {
                "model": model,
                "figure": "operating point (accuracy, cost, goodput share)",
                "profile": p["operating"],
            }
        )
        rows += [
            {"model": model, "figure": f"peak {k}", "profile": v} for k, v in p["peaks"].items()
        ]
    return pd.DataFrame(rows, columns=["model", "figure", "profile"])


def _batch_table(outcomes, profiles, inputs: TableInputs) -> pd.DataFrame:
    rows = []
    if not inputs.config.batch_flip:
        return pd.DataFrame()
    for model, g in profiles.groupby("model", sort=False):
        names = set(g["profile"])
        if "batch_size=1" in names:
            single, prefix, sl = "batch_size=1", "batch_size=", "batch_size"
        elif "synchronous" in names:
            single, prefix, sl = "synchronous", "concurrency=", "concurrency"
        else:
            continue
        sizes = sorted(
            int(n.removeprefix(prefix))
            for n in names
            if n.startswith(prefix) and n.removeprefix(prefix).isdigit()
        )
        sizes = [s for s in sizes if s > 1]
        for s in sizes:
            row = batch_flips(
                outcomes,
                model=model,
                single=single,
                batched=f"{prefix}{s}",
                confidence=inputs.confidence,
            )
            if row is not None:
                rows.append({**row, "slice": sl, "slice_value": str(s), "overall": s == sizes[-1]})
    return pd.DataFrame(rows)


def _resources(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in records:
        for metric, key in RESOURCE_FIELDS.items():
            value = r.get(key)
            if value is not None:
                rows.append(
                    {
                        "model": r["model"],
                        "metric": metric,
                        "value": float(value),
                        "deploy": r.get("deploy"),
                        "note": _note(metric, r),
                    }
                )
    return pd.DataFrame(rows, columns=["model", "metric", "value", "deploy", "note"])


def _note(metric: str, r: Mapping[str, Any]) -> str:
    if metric == "peak_memory_mb" and r.get("deploy") == "transformers":
        return (
            f"this process's RSS, {r.get('base_rss_mb') or 0:.0f} MB of it before the model loaded"
        )
    if metric == "peak_gpu_memory_mb":
        return f"source: {r.get('gpu_source')}"
    if metric == "cold_start_s":
        return (
            f"ready {r.get('ready_s') or 0:.2f} s + first token {r.get('first_token_s') or 0:.2f} s"
        )
    return ""


def _costs(reqs, throughput, outcomes, points, inputs: TableInputs) -> pd.DataFrame:
    rows = []
    half = 1 - (1 - inputs.confidence) / 2
    for model, cost in inputs.costs.items():
        profile = (points.get(model) or {}).get("operating")
        if profile is None:
            continue
        point = _point_data(reqs, throughput, outcomes, model, profile)
        full = cost_rows(cost, point, confidence=inputs.confidence)
        halves = {r["metric"]: r for r in cost_rows(cost, point, confidence=half)}
        for r in full:
            h = halves.get(r["metric"], {})
            rows.append(
                {
                    "model": model,
                    "profile": profile,
                    **r,
                    "half_low": h.get("ci_low", math.nan),
                    "half_high": h.get("ci_high", math.nan),
                }
            )
    columns = [
        "model",
        "profile",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "n",
        "method",
        "mode",
        "half_low",
        "half_high",
    ]
    return pd.DataFrame(rows, columns=columns)


def _point_data(reqs, throughput, outcomes, model, profile) -> PointData:
    g = reqs[(reqs["model"] == model) & (reqs["profile"] == profile)]
    ok = g[g["status"] == "ok"]
    t = throughput[(throughput["model"] == model) & (throughput["profile"] == profile)].set_index(
        "metric"
    )["value"]
    o = outcomes[(outcomes["model"] == model) & (outcomes["profile"] == profile)]
    return PointData(
        ok=len(ok),
        window_s=float(t.get("window_s", 0.0)),
        correct=int(o["correct"].sum()) if len(o) else 0,
        answered_of=len(o),
        prompt_tokens=pd.to_numeric(ok["prompt_tokens"], errors="coerce").to_numpy(dtype=float),
        output_tokens=pd.to_numeric(ok["output_tokens"], errors="coerce").to_numpy(dtype=float),
    )


def load_curve(
    latency: pd.DataFrame,
    throughput: pd.DataFrame,
    *,
    metric: str = "ttft_ms",
    stat: str = "p95",
    groups: Sequence[str] = EVAL_GROUPS,
) -> pd.DataFrame:
    """Per model and eval-traffic profile: measured ``throughput_rps`` and the latency
    ``stat`` of ``metric`` with its CI, sorted by throughput (the sweep's curve):
    ``model, profile, group, throughput_rps, latency_ms, ci_low, ci_high, label``."""
    lat = latency[
        (latency["metric"] == metric) & (latency["stat"] == stat) & latency["group"].isin(groups)
    ]
    thr = throughput[throughput["metric"] == "throughput_rps"][["model", "profile", "value"]]
    out = lat.merge(thr.rename(columns={"value": "throughput_rps"}), on=["model", "profile"])
    out = out.rename(columns={"value_ms": "latency_ms"}).assign(
        label=f"{metric.removesuffix('_ms')} {stat} (ms)"
    )
    columns = [
        "model",
        "profile",
        "group",
        "throughput_rps",
        "latency_ms",
        "ci_low",
        "ci_high",
        "label",
    ]
    return out[columns].sort_values(["model", "throughput_rps"]).reset_index(drop=True)


def summary(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model and profile with the headline figures (for the notebook/CLI)."""
    lat, thr = tables.get("latency"), tables.get("throughput")
    if lat is None or lat.empty:
        return pd.DataFrame()
    wide = lat[lat["stat"].isin(["p50", "p95", "p99"])].assign(
        col=lambda d: d["metric"].str.removesuffix("_ms") + "_" + d["stat"] + "_ms"
    )
    left = wide.pivot_table(
        index=["model", "profile"], columns="col", values="value_ms", sort=False
    )
    right = thr[
        thr["metric"].isin(
            ["throughput_rps", "output_tokens_per_s", "error_rate_under_load", "goodput_rps"]
        )
    ].pivot_table(index=["model", "profile"], columns="metric", values="value", sort=False)
    cols = [
        c
        for c in (
            "ttft_p50_ms",
            "ttft_p95_ms",
            "tpot_p50_ms",
            "itl_p50_ms",
            "e2e_p50_ms",
            "e2e_p99_ms",
        )
        if c in left
    ]
    out = left[cols].join(right, how="outer").reset_index()
    return out.replace([np.inf, -np.inf], np.nan)
