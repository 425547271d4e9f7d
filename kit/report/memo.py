"""The HTML decision memo: one self-contained file a reviewer signs off.

:func:`write_memo` renders ``templates/memo.html.j2`` with Jinja2 (``autoescape=True``,
``StrictUndefined``) into ``runs/NAME/memo.html``: the decision per candidate up front, a
banner when the budget file changed after freezing (the diff, escaped; verdicts used the
frozen copy), the rules table with verdicts and CIs, evidence charts, failing examples side
by side, noise-floor and sample-size caveats, the frozen baseline facts and provenance.

Everything shown comes from the run folder: ``verdict.json`` (:mod:`kit.verdicts`), the
manifest, the stage tables and the stored outputs. Every model output, input, rule text
and reason reaches the page through autoescaping; nothing from the data is marked safe.

Charts
------
The chart functions of :mod:`kit.report.charts` draw the stage tables; each chart is rendered to
SVG by vl-convert (Vega in an embedded JS engine, no browser) and inlined, so the memo
needs no script, no CDN and no network: it opens offline with its charts visible. The SVG
is generated markup (vl-convert escapes the data's text), checked by :func:`inline_svg`
(no script, event handler, foreignObject or external reference) before it is inlined,
and its element ids are prefixed so that several charts can share the page.

Example
-------
>>> write_memo("runs/demo")                                               # doctest: +SKIP
PosixPath('runs/demo/memo.html')
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kit.errors import CompkitError, DependencyMissing
from kit.metrics import format_interval, format_value
from kit.resources import templates_dir
from kit.run import Run
from kit.stats.intervals import METHODS
from kit.study import CANDIDATE_KINDS
from kit.verdicts import VerdictReport

MEMO_FILE = "memo.html"
TEMPLATE = "memo.html.j2"
TEMPLATES_DIR = templates_dir()
DECISION_WORDS = {
    "accepted": "may replace the baseline",
    "rejected": "may not replace the baseline",
    "inconclusive": "cannot be decided on this evidence",
    "accepted with routing rule": "may replace the baseline only behind its router, with the "
    "rule below (the large model stays as fallback)",
}


# --------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def format_number(x: Any, *, unit: str, quantity: str = "value") -> str:
    """A verdict number for the rules table (:func:`kit.metrics.format_value`; ``–`` if missing)."""
    return format_value(x, unit=unit, quantity=quantity) if _finite(x) else "–"


def format_ci(low: Any, high: Any, *, unit: str, quantity: str) -> str:
    """``a to b`` in :func:`format_number` units; ``–`` when either end is missing."""
    if low is None or high is None or not all(isinstance(x, int | float) for x in (low, high)):
        return "–"
    if math.isnan(low) or math.isnan(high):
        return "–"
    return format_interval(low, high, unit=unit, quantity=quantity)


def _count(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "–"


# --------------------------------------------------------------------------- charts


_FORBIDDEN_TAGS = {"script", "foreignobject", "iframe", "object", "embed", "image", "use"}


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1].lower()


def _check_svg(svg: str) -> None:
    try:
        root = ET.fromstring(svg)
    except ET.ParseError as exc:
        raise CompkitError(f"chart SVG does not parse: {exc}") from exc
    if _local(root.tag) != "svg":
        raise CompkitError(f"chart output is <{_local(root.tag)}>, not <svg>")
    for element in root.iter():
        tag = _local(element.tag)
        if tag in _FORBIDDEN_TAGS:
            raise CompkitError(f"chart SVG contains a <{tag}> element")
        for name, value in element.attrib.items():
            attr = _local(name)
            if attr.startswith("on"):
                raise CompkitError(f"chart SVG has an event handler attribute {attr!r}")
            if attr == "href" and not value.startswith("#"):
                raise CompkitError("chart SVG references an external resource")
            if "url(" in value and not re.fullmatch(r"url\(#[\w.-]+\)", value.strip()):
                raise CompkitError("chart SVG references an external resource")


def inline_svg(svg: str, *, prefix: str) -> Any:
    """Checked SVG markup, ready to inline (a :class:`markupsafe.Markup`).

    Raises :class:`~kit.errors.CompkitError` when the SVG has a script, an event handler,
    a ``foreignObject`` or a reference outside itself; element ids (``clip1``) and the
    ``url(#...)``/``href="#..."`` references to them are prefixed with ``prefix``.
    """
    from markupsafe import Markup

    _check_svg(svg)
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    for ident in sorted(ids, key=len, reverse=True):
        new = f"{prefix}{ident}"
        svg = svg.replace(f'id="{ident}"', f'id="{new}"')
        svg = svg.replace(f"url(#{ident})", f"url(#{new})")
        svg = svg.replace(f'href="#{ident}"', f'href="#{new}"')
    return Markup(svg)  # generated chart markup, checked above; never data


def chart_svg(chart: Any) -> str:
    """Render an altair chart to SVG with vl-convert (no network: ``allowed_base_urls=[]``)."""
    try:
        import altair as alt
        import vl_convert as vlc
    except ImportError as exc:
        raise DependencyMissing(
            exc.name or "vl-convert-python", "core", "the memo's charts"
        ) from None
    version = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    known = vlc.get_vegalite_versions()
    return vlc.vegalite_to_svg(
        chart.to_json(),
        vl_version=version if version in known else None,
        allowed_base_urls=[],
    )


@dataclass(frozen=True)
class Figure:
    """One memo chart: title, caption, and the inline SVG or why there is none."""

    key: str
    title: str
    caption: str
    svg: Any = None
    note: str = ""


def _figure(key: str, title: str, caption: str, make: Callable[[], Any]) -> Figure:
    try:
        svg = inline_svg(chart_svg(make()), prefix=f"{key}-")
    except Exception as exc:  # a chart that cannot be drawn must not sink the memo
        return Figure(key, title, caption, note=f"chart not drawn: {exc}")
    return Figure(key, title, caption, svg=svg)


def _read(run_dir: Path, name: str) -> pd.DataFrame | None:
    """A stage table (checked against its recorded sha256), or None when the stage has not run."""
    run = Run.open(run_dir)
    return run.table(name) if run.has_table(name) else None


def _drilldown_metric(run_dir: Path) -> str:
    import json

    path = run_dir / "tables" / "drilldown.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["parameters"].get("metric", "accuracy")
    return "accuracy"


def evidence_figures(run_dir: str | Path) -> list[Figure]:
    """The memo's charts from the stage tables that exist (slice deltas, flips, worst slices,
    noise floor, reliability), each rendered to inline SVG."""
    from kit.report.charts import calibration as cal
    from kit.report.charts import comparison as cmp

    run_dir = Path(run_dir)
    metric = _drilldown_metric(run_dir)
    table, flips = _read(run_dir, "slice_table"), _read(run_dir, "flips")
    worst, noise = _read(run_dir, "worst_slices"), _read(run_dir, "noise_floor")
    bins = _read(run_dir, "reliability")
    figures = []
    if table is not None and len(table):
        figures.append(
            _figure(
                "overall",
                f"Overall change in {metric}",
                "Candidate minus baseline over all items; bars are the paired intervals the "
                "rules table names per metric.",
                lambda: cmp.delta_chart(table, metric=metric),
            )
        )
        figures.append(
            _figure(
                "slices",
                f"Change in {metric} per slice",
                "Red: the whole CI is a drop; green: a gain; grey: the CI includes 0.",
                lambda: cmp.slice_overview_chart(table, metric=metric),
            )
        )
    if flips is not None and len(flips):
        figures.append(
            _figure(
                "flips",
                "Flips by direction",
                "Share of paired items whose outcome changed: right→wrong, wrong→right, "
                "wrong→other wrong.",
                lambda: cmp.flip_chart(flips),
            )
        )
    if worst is not None:
        figures.append(
            _figure(
                "worst",
                "Worst slices",
                "Slices ranked by the CI bound nearest zero (the drop the data are sure of).",
                lambda: cmp.worst_slices_chart(worst),
            )
        )
    if table is not None and noise is not None and len(noise):
        figures.append(
            _figure(
                "noise",
                "Candidates next to the baseline's own noise",
                "Grey: the baseline's repeats against each other; a candidate inside that "
                "spread is within run-to-run noise.",
                lambda: cmp.noise_floor_overlay(table, noise, metric=metric),
            )
        )
    if bins is not None and len(bins):
        figures.append(
            _figure(
                "reliability",
                "Reliability diagram",
                "Accuracy against stated confidence per bin; below the diagonal is "
                "over-confident. Bars: predictions per bin.",
                lambda: cal.reliability_chart(bins),
            )
        )
    return (
        figures
        + robustness_figures(run_dir)
        + serving_figures(run_dir, quality=table, metric=metric)
        + routing_figures(run_dir, metric=metric)
    )


def routing_figures(run_dir: Path, *, metric: str) -> list[Figure]:
    """Stage 6's deferral curve and Pareto fronts (judged items) when it has run."""
    from kit.report.charts import routing as rt
    from kit.routing.sweep import curve_points

    curve, oracle = _read(run_dir, "routing_curve"), _read(run_dir, "routing_oracle")
    rules = _read(run_dir, "routing_rules")
    if curve is None or curve.empty:
        return []
    name = metric if (curve["metric"] == metric).any() else "accuracy"
    points = curve_points(curve, metric=name)
    return [
        _figure(
            "deferral",
            f"Routing: {name} against the fallback rate",
            "Every threshold of the router on the held-out (judged) items, with 95% CIs; "
            "dashed: the oracle router; ring: the rule chosen on the calibration items.",
            lambda: rt.deferral_chart(points, oracle=oracle, rules=rules),
        ),
        _figure(
            "pareto_cost",
            f"Routing: {name} against the blended cost",
            "The small model is always paid, the large one on fallback (model seconds "
            "without a cost: block).",
            lambda: rt.pareto_chart(points, x="cost_per_request"),
        ),
        _figure(
            "pareto_p95",
            f"Routing: {name} against the blended p95 latency",
            "p95 of the per-request mixture: a fallback request pays small + large latency.",
            lambda: rt.pareto_chart(points, x="latency_p95_ms"),
        ),
    ]


_SYSTEM_METRICS = (
    "fallback_rate",
    "blended_latency_p95_ms",
    "blended_cost_per_request_usd",
    "blended_compute_s_per_request",
    "routing_cost_saving",
)


def _routing_rows(run_dir: Path, report: VerdictReport) -> list[dict[str, Any]]:
    """Per routed candidate: the rule to deploy and large-only / small-only / routed side by
    side on the judged items (the budget's metrics and slices, then the system figures)."""
    from kit.metrics import METRICS

    systems, rules = _read(run_dir, "routing_systems"), _read(run_dir, "routing_rules")
    if systems is None or rules is None or rules.empty:
        return []
    wanted = {(r.metric, r.slice) for r in report.rules}
    out = []
    for rule in rules.to_dict("records"):
        mine = systems[systems["candidate"] == rule["candidate"]]
        keys = [("accuracy", "overall"), *sorted(wanted - {("accuracy", "overall")})]
        keys = list(dict.fromkeys([*keys, *((m, "overall") for m in _SYSTEM_METRICS)]))
        rows = []
        for metric, where in keys:
            col, _, val = where.partition("=")
            pick = mine[(mine["metric"] == metric) & (mine["slice"] == (col or "overall"))]
            if val:
                pick = pick[pick["slice_value"].astype(str) == val]
            if pick.empty or metric not in METRICS:
                continue
            unit = METRICS[metric].unit
            cells = {}
            for r in pick.to_dict("records"):
                ci = format_ci(r["value_ci_low"], r["value_ci_high"], unit=unit, quantity="value")
                cells[r["system"]] = f"{format_number(r['value'], unit=unit)} ({ci})"
            rows.append({"metric": metric, "slice": where, "cells": cells})
        order = [f"{rule['fallback']} only", f"{rule['candidate']} only", rule["system"]]
        out.append({**rule, "systems": order, "rows": rows})
    return out


def serving_figures(run_dir: Path, *, quality: pd.DataFrame | None, metric: str) -> list[Figure]:
    """The serving stage's charts (trade-off, latency percentiles, load curve, errors) when
    stage 5 has run."""
    from kit.report.charts import serving as srv
    from kit.serving.tables import load_curve
    from kit.serving.tradeoff import tradeoff_frame

    evidence, latency = _read(run_dir, "serving_evidence"), _read(run_dir, "serving_latency")
    throughput, errors = _read(run_dir, "serving_throughput"), _read(run_dir, "serving_errors")
    if evidence is None or evidence.empty:
        return []
    level = float(evidence["confidence"].dropna().iloc[0]) if "confidence" in evidence else 0.95
    trade = tradeoff_frame(evidence, quality, metric=metric)
    figures = []
    if len(trade):
        figures.append(
            _figure(
                "tradeoff",
                "The trade: serving gains against the quality paid",
                "Each point is a candidate: x is what it buys (speed-up in x baseline, savings "
                "as a share), y is its change in quality, both with paired intervals. Right of "
                "the dashed line is a gain; below zero is a quality loss.",
                lambda: srv.tradeoff_chart(trade, confidence=level),
            )
        )
    if latency is not None and len(latency):
        figures.append(
            _figure(
                "latency",
                "Time to first token by load profile",
                "p50/p95/p99 per model and profile with order-statistic intervals; an open "
                "bar means too few requests bound that percentile from above.",
                lambda: srv.latency_chart(latency, metric="ttft_ms"),
            )
        )
        if throughput is not None and len(throughput):
            figures.append(
                _figure(
                    "load_curve",
                    "Latency against throughput",
                    "p95 time to first token at each load level reached; a curve bending up "
                    "marks the model's saturation point.",
                    lambda: srv.load_curve_chart(load_curve(latency, throughput)),
                )
            )
    if errors is not None and len(errors):
        figures.append(
            _figure(
                "errors",
                "Failed requests under load",
                "Share of requests per failure class (HTTP error, timeout, interrupted stream, "
                "unparseable answer) per model and profile.",
                lambda: srv.error_chart(errors),
            )
        )
    return figures


def robustness_figures(run_dir: str | Path) -> list[Figure]:
    """The robustness stage's charts: perturbation x candidate heat map, KL percentiles,
    numerical artifacts (those whose tables exist and hold rows)."""
    from kit.report.charts import robustness as rob

    run_dir = Path(run_dir)
    gaps, pct = _read(run_dir, "robustness_evidence"), _read(run_dir, "kl_percentiles")
    rates = _read(run_dir, "artifact_rates")
    figures = []
    if gaps is not None and (gaps["metric"] == "accuracy_shift").any():
        figures.append(
            _figure(
                "perturbations",
                "Robustness gap per perturbation",
                "Per candidate and perturbation: its accuracy shift (perturbed copy minus "
                "original) minus the baseline's, in points; red is a larger drop than the "
                "baseline's, * marks an interval that excludes 0.",
                lambda: rob.perturbation_heatmap(gaps),
            )
        )
    if pct is not None and len(pct):
        figures.append(
            _figure(
                "kl",
                "Token KL percentiles",
                "KL(baseline || candidate) per token of the baseline's answers (teacher "
                "forcing), at llama.cpp's percentiles; dashed: the top-k truncation bound.",
                lambda: rob.kl_percentile_chart(pct),
            )
        )
    if rates is not None and len(rates):
        figures.append(
            _figure(
                "artifacts",
                "Numerical artifacts",
                "Empty, looping, truncated and NaN/inf-logit answers on the clean items.",
                lambda: rob.artifact_chart(rates),
            )
        )
    return figures


# --------------------------------------------------------------------------- context


def _verdict_rows(report: VerdictReport) -> dict[str, list[dict[str, Any]]]:
    limits = {r.rule_id: r.limit for r in report.rules}
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in report.candidates}
    for v in report.verdicts:
        fmt = {"unit": v.unit, "quantity": v.quantity}
        rows.setdefault(v.candidate, []).append(
            {
                "rule_id": v.rule_id,
                "rule": v.rule,
                "why": v.why or "",
                "slice": v.slice,
                "verdict": v.verdict,
                "css": v.verdict.replace(" ", "-"),
                "quantity": v.quantity,
                "observed": format_number(v.observed, **fmt),
                "baseline": format_number(v.baseline, unit=v.unit),
                "limit": limits.get(v.rule_id) or format_number(v.threshold, **fmt),
                "ci": format_ci(v.ci_low, v.ci_high, **fmt),
                "n": _count(v.n),
                "n_needed": _count(v.n_needed),
                "method": METHODS.get(v.method or "", v.method or "–"),
                "reason": v.reason,
            }
        )
    return rows


def _baseline_facts(manifest: Any) -> list[tuple[str, str]]:
    m, hw, inputs = manifest.model, manifest.hardware, manifest.inputs
    sampling = ", ".join(f"{k}={v}" for k, v in inputs.sampling.items())
    gpu = f", GPU {hw.gpu} ({hw.gpu_memory_gb} GB)" if hw.gpu else ", no GPU"
    return [
        ("baseline", manifest.outputs.model),
        ("model", str(m.get("model"))),
        ("weights sha256", str(m.get("weights_sha256"))),
        ("runtime", f"{m.get('runtime')} ({m.get('runtime_version')})"),
        ("dtype / device", f"{m.get('dtype')} / {m.get('device')}"),
        ("parameters", _count(m.get("parameters"))),
        ("prompt template", f"{inputs.template_path} (sha256 {inputs.template_sha256})"),
        ("sampling", sampling),
        ("repeats", str(inputs.repeats)),
        (
            "eval set",
            f"{inputs.eval_set_path}: {inputs.eval_set_rows} items "
            f"(sha256 {inputs.eval_set_sha256})",
        ),
        ("hardware", f"{hw.cpu} x{hw.cores}, {hw.memory_gb} GB{gpu}; {hw.platform}"),
        ("frozen at", manifest.created_at),
        ("frozen by", f"compkit {manifest.kit.version} @ {manifest.kit.git_sha}"),
    ]


def _candidate_facts(run_dir: Path) -> list[dict[str, Any]]:
    from kit.stages.candidates import candidate_summary

    rows = []
    for r in candidate_summary(run_dir).to_dict("records"):
        rows.append(
            {
                "candidate": r["candidate"],
                "kind": CANDIDATE_KINDS[r["kind"]][0],
                "kind_note": CANDIDATE_KINDS[r["kind"]][1],
                "runtime": _text(r["runtime"]),
                "recipe": _text(r["recipe"]) or "–",
                "parameters": _count(r["parameters"]),
                "size": f"{r['size_mb']:.1f} MB" if _finite(r["size_mb"]) else "–",
                "accuracy": format_number(r["accuracy"], unit="share"),
                "errors": _count(r["errors"]),
            }
        )
    return rows


def _candidate_kinds(run: Run) -> dict[str, str]:
    """Candidate -> its ``kind`` in the frozen study (``compressed`` by default)."""
    try:
        return {c.name: c.kind for c in run.study.candidates}
    except CompkitError:
        return {}


def _failing(run: Run, candidates: list[str], k: int) -> dict[str, list[dict[str, Any]]]:
    from kit.stages.drilldown import failing_examples

    stored = set(run.candidates())
    if k <= 0 or not stored:
        return {}  # a run measured only by the serving stage has no per-item outcomes
    outcomes = run.outcomes()
    out = {}
    for name in (c for c in candidates if c in stored):
        frame = failing_examples(run, candidate=name, k=k, outcomes=outcomes)
        out[name] = [{k_: _text(v) for k_, v in row.items()} for row in frame.to_dict("records")]
    return out


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _noise_rows(run_dir: Path) -> list[dict[str, str]]:
    noise = _read(run_dir, "noise_floor")
    if noise is None or noise.empty:
        return []
    overall = noise[(noise["slice"] == "overall") & (noise["metric"] == _drilldown_metric(run_dir))]
    return [
        {
            "comparison": f"{r['model']} repeat {r['repeat']} vs repeat 0",
            "delta": format_number(r["delta"], unit="share", quantity="change"),
            "ci": format_ci(r["ci_low"], r["ci_high"], unit="share", quantity="change"),
            "flip_rate": format_number(r.get("flip_rate"), unit="share"),
            "n": _count(r["n"]),
        }
        for r in overall.to_dict("records")
    ]


def _robustness(run_dir: Path) -> dict[str, Any]:
    """The memo's robustness section: gap rows, token-distribution rows, artifact rows
    (empty lists where the robustness stage has not run or measured nothing)."""
    import json

    gaps = _read(run_dir, "robustness_evidence")
    stats = _read(run_dir, "kl_statistics")
    rates = _read(run_dir, "artifact_rates")
    provenance = run_dir / "tables" / "robustness.json"
    status = (
        json.loads(provenance.read_text(encoding="utf-8")).get("distributions", {})
        if provenance.is_file()
        else {}
    )
    return {
        "ran": gaps is not None,
        "gaps": _gap_rows(gaps),
        "distributions": _distribution_rows(stats, status),
        "artifacts": _artifact_rows(rates),
    }


def _gap_rows(gaps: pd.DataFrame | None) -> list[dict[str, str]]:
    if gaps is None:
        return []
    rows = gaps[gaps["metric"] == "accuracy_shift"]
    out = []
    for r in rows.to_dict("records"):
        pooled = r["slice"] == "overall"
        out.append(
            {
                "candidate": r["model"],
                "perturbation": "pooled" if pooled else r["slice_value"],
                "shift": format_number(r["value"], unit="share", quantity="change"),
                "baseline_shift": format_number(
                    r["baseline_value"], unit="share", quantity="change"
                ),
                "gap": format_number(r["delta"], unit="share", quantity="change"),
                "ci": format_ci(r["ci_low"], r["ci_high"], unit="share", quantity="change"),
                "method": METHODS.get(_text(r["delta_method"]), _text(r["delta_method"]) or "–"),
                "n": _count(r["n"]),
            }
        )
    return out


def _distribution_rows(stats: pd.DataFrame | None, status: dict) -> list[dict[str, str]]:
    wide = (
        stats.pivot(index="model", columns="statistic", values="value")
        if stats is not None and len(stats)
        else pd.DataFrame()
    )
    out = []
    for name, st in status.items():
        row = {"candidate": name, "status": st.get("status", ""), "reason": st.get("reason", "")}
        if st.get("status") == "scored" and name in wide.index:
            row |= _kl_cells(wide.loc[name])
        else:
            row |= dict.fromkeys(("mean_kl", "p99_kl", "max_kl", "same_top", "delta_p"), "–")
            row |= {"positions": "–", "tail": "–"}
        out.append(row)
    return out


def _kl_cells(v: pd.Series) -> dict[str, str]:
    return {
        "mean_kl": f"{v['mean_kl']:.4g} ± {v['sd_kl']:.3g}",
        "p99_kl": f"{v['kl_p99']:.4g}",
        "max_kl": f"{v['max_kl']:.4g}",
        "same_top": format_number(v["same_top"], unit="share"),
        "delta_p": format_number(v["mean_delta_p"], unit="share", quantity="change"),
        "positions": _count(v["positions"]),
        "tail": f"{v['mean_p_tail']:.2g}",
    }


def _artifact_rows(rates: pd.DataFrame | None) -> list[dict[str, str]]:
    if rates is None:
        return []
    clean = rates[rates["items"] == "clean"]
    return [
        {
            "model": r["model"],
            "metric": r["metric"],
            "rate": format_number(r["rate"], unit="share"),
            "ci": format_ci(r["ci_low"], r["ci_high"], unit="share", quantity="value"),
            "count": f"{int(r['count'])} / {int(r['n'])}",
        }
        for r in clean.to_dict("records")
    ]


def _runtime_floor_rows(run: Run) -> list[dict[str, str]]:
    """Runtime-change candidates (same weights, another runtime) against the baseline: the
    runtime noise floor a compressed candidate's change is read against."""
    kinds = _candidate_kinds(run)
    floor = [c for c, k in kinds.items() if k == "runtime_change"]
    deltas, flips = _read(run.root, "overall_deltas"), _read(run.root, "flip_evidence")
    if not floor or deltas is None:
        return []
    rows = []
    for name in floor:
        acc = deltas[(deltas["model"] == name) & (deltas["metric"] == "accuracy")]
        if acc.empty:
            continue
        r = acc.iloc[0]
        flip = None
        if flips is not None:
            f = flips[(flips["model"] == name) & (flips["slice"] == "overall")]
            flip = f["value"].iloc[0] if not f.empty else None
        rows.append(
            {
                "comparison": f"{name} ({CANDIDATE_KINDS['runtime_change'][0]}) vs baseline",
                "delta": format_number(r["delta"], unit="share", quantity="change"),
                "ci": format_ci(r["ci_low"], r["ci_high"], unit="share", quantity="change"),
                "flip_rate": format_number(flip, unit="share"),
                "n": _count(r["n"]),
            }
        )
    return rows


def structured_output_rows(run: Run) -> list[dict[str, str]]:
    """JSON parse failures per model with the study's structured output on or off.

    One row per model that answered a JSON task: whether its decoding was constrained
    (the study's ``tasks.<task>.structured_output`` and the model's ``structured_output``)
    and its parse-failure share; empty when no model answered a JSON task.
    """
    outcomes = run.outcomes() if (run.root / "outcomes.parquet").exists() else None
    if outcomes is None or "json_parse_failure" not in outcomes.columns:
        return []
    study = run.study
    asked = sorted(study.structured_tasks)
    specs = {m.name: m for m in study.models}
    part = outcomes.dropna(subset=["json_parse_failure"])
    rows = []
    for (model, task), g in part.groupby(["model", "task"], sort=False):
        on = task in asked and (model not in specs or specs[model].structured_output)
        rows.append(
            {
                "model": str(model),
                "task": str(task),
                "structured": "json_schema" if on else "free decoding",
                "failures": format_number(g["json_parse_failure"].mean(), unit="share"),
                "n": _count(len(g)),
            }
        )
    return rows


def _undecided(report: VerdictReport) -> list[dict[str, str]]:
    return [
        {
            "candidate": v.candidate,
            "rule": v.rule,
            "verdict": v.verdict,
            "n": _count(v.n),
            "n_needed": _count(v.n_needed),
            "reason": v.reason,
        }
        for v in report.verdicts
        if v.verdict in ("inconclusive", "not measured")
    ]


def memo_context(
    run_dir: str | Path, *, report: VerdictReport | None = None, examples: int = 5
) -> dict[str, Any]:
    """Everything the memo template shows, as plain values (strings, lists, dicts).

    Parameters
    ----------
    run_dir
        A judged run folder (``verdict.json``; see :func:`kit.verdicts.judge_run`).
    report
        The verdict; default: read ``verdict.json``.
    examples
        Failing examples (baseline right, candidate wrong) per candidate.
    """
    from kit.environment import kit_info
    from kit.store import now_iso

    run = Run.open(run_dir)
    run_dir = run.root
    report = report if report is not None else VerdictReport.load(run_dir)
    manifest = run.manifest
    kinds = _candidate_kinds(run)
    decisions = [
        {
            **d.model_dump(),
            "words": DECISION_WORDS[d.decision],
            "kind": CANDIDATE_KINDS[kinds.get(d.candidate, "compressed")][0],
            "kind_note": CANDIDATE_KINDS[kinds.get(d.candidate, "compressed")][1],
        }
        for d in report.decisions
    ]
    kit = kit_info()
    return {
        "title": f"Decision memo · {report.study}",
        "study": report.study,
        "description": run.study.description,
        "run": str(run_dir.resolve()),
        "baseline": report.baseline,
        "confidence": f"{report.confidence * 100:g}%",
        "judged": report.judged,
        "combination": report.combination,
        "decisions": decisions,
        "budget": report.budget.model_dump(),
        "rules": [r.model_dump() for r in report.rules],
        "verdicts": _verdict_rows(report),
        "figures": evidence_figures(run_dir),
        "examples": _failing(run, list(report.candidates), examples),
        "examples_k": examples,
        "candidates": _candidate_facts(run_dir),
        "baseline_facts": _baseline_facts(manifest),
        "noise": _noise_rows(run_dir),
        "robustness": _robustness(run_dir),
        "routing": _routing_rows(run_dir, report),
        "runtime_floor": _runtime_floor_rows(run),
        "structured": structured_output_rows(run),
        "repeats": manifest.inputs.repeats,
        "undecided": _undecided(report),
        "evidence": [e.model_dump() for e in report.evidence],
        "hashes": report.hashes,
        "verdict_created_at": report.created_at,
        "verdict_kit": report.kit.model_dump() if report.kit else {},
        "memo_kit": kit.model_dump(),
        "memo_created_at": now_iso(),
    }


# --------------------------------------------------------------------------- rendering


def _environment(templates: Path) -> Any:
    import jinja2

    if not (templates / TEMPLATE).is_file():
        raise CompkitError(f"memo template {templates / TEMPLATE} is missing")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_memo(context: Mapping[str, Any], *, templates: str | Path = TEMPLATES_DIR) -> str:
    """The memo's HTML from :func:`memo_context` (autoescaped Jinja2)."""
    return _environment(Path(templates)).get_template(TEMPLATE).render(**context)


def write_memo(
    run_dir: str | Path,
    *,
    report: VerdictReport | None = None,
    examples: int = 5,
    templates: str | Path = TEMPLATES_DIR,
) -> Path:
    """Render the decision memo of a judged run to ``run_dir/memo.html`` (atomically).

    Parameters
    ----------
    run_dir
        A run folder with ``verdict.json`` (:func:`kit.verdicts.judge_run` writes it; when
        it is missing the run is judged first).
    report
        The verdict to render; default: ``verdict.json``.
    examples
        Failing examples per candidate.
    templates
        Folder holding ``memo.html.j2``.

    Returns
    -------
    Path
        The memo file.
    """
    from kit.store import atomic_write_text
    from kit.verdicts import VERDICT_FILE, judge_run

    run_dir = Path(run_dir)
    if report is None and not (run_dir / VERDICT_FILE).is_file():
        judge_run(run_dir)
    context = memo_context(run_dir, report=report, examples=examples)
    path = run_dir / MEMO_FILE
    atomic_write_text(path, render_memo(context, templates=templates))
    return path
