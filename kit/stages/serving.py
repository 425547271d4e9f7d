"""Stage 5, the serving path: deploy, load and measure every served model of a run.

:func:`run_serving` reads a frozen run (its prompts, sampling and budget), the study's
``serving:`` block (load profiles) and each model's ``serving:`` / ``cost:`` blocks, then per
model: deploys it (:mod:`kit.serving.deploy`), samples its memory while it runs, loads it
with the profiles (:mod:`kit.serving.endpoint`, or :mod:`kit.serving.batch` in process) and
stops it, also on errors and Ctrl-C. Every profile's raw per-request timeline is written the
moment it finishes; then the tables are computed from the stored timelines only, so every
figure can be re-derived from them.

Run folder::

    runs/NAME/serving/<model>/profiles/NN-<profile>.parquet   raw timelines (one row a request)
    runs/NAME/serving/<model>/model.json                      deployment, cold start, memory
    runs/NAME/serving/<model>/_COMPLETE.json                  config fingerprint (resume)
    runs/NAME/serving.json                                    ServingReport (status, partial)
    runs/NAME/tables/serving_latency.parquet                  TTFT/TPOT/ITL/E2E percentiles + CIs
    runs/NAME/tables/serving_throughput.parquet               req/s, tokens/s, goodput, errors
    runs/NAME/tables/serving_errors.parquet                   failed requests by class
    runs/NAME/tables/serving_quality.parquet                  accuracy / parse failures under load
    runs/NAME/tables/serving_outcomes.parquet                 per-item outcomes under load
    runs/NAME/tables/serving_batch_flips.parquet              batch-size sensitivity (noise floor)
    runs/NAME/tables/serving_resources.parquet                memory, size, cold start
    runs/NAME/tables/serving_cost.parquet                     cost per request / 1,000 correct
    runs/NAME/tables/serving_variants.parquet                 vLLM / GuideLLM definitions
    runs/NAME/tables/serving_runtime_agreement.parquet        served vs stage-2 answers
    runs/NAME/tables/serving_evidence.parquet                 budget evidence (long)

A model that fails to start (readiness timeout, a crash while loading) is recorded as
``failed`` and the stage goes on; one whose server dies mid-sweep keeps the profiles it
finished and is ``partial``; either makes the report ``partial``. Errors a user can fix
before anything runs (no serving block, a missing GGUF, a port in use, an unreachable
endpoint) raise :class:`~kit.errors.CompkitError` at once, with nothing written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from kit.errors import CompkitError
from kit.run import Run
from kit.serving.batch import run_batch_profiles
from kit.serving.deploy import Deployment, DeployPlan, deploy, plan_deploy
from kit.serving.endpoint import (
    EndpointPlan,
    EndpointTarget,
    PromptSet,
    client_ceiling,
    run_endpoint,
)
from kit.serving.load import ProfileRun
from kit.serving.resources import MB, MemorySampler, tree_rss
from kit.serving.servers import ServerStartError
from kit.stages.freeze import require_unchanged
from kit.store import atomic_write_text, now_iso
from kit.study import ModelSpec, SLOConfig, Study, load_study

SERVING_DIR = "serving"
REPORT_FILE = "serving.json"
SCHEMA_VERSION = 1
#: Note stored with every report that deploys llama-cpp-python's server.
LLAMA_CPP_PYTHON_NOTE = (
    "llama-cpp-python's server (python -m llama_cpp.server) runs one request at a time: one "
    "Llama per model behind a lock, no parallel slots; concurrent requests queue, so their "
    "waiting shows in TTFT and throughput does not grow with concurrency"
)


class ModelRecord(BaseModel):
    """One served model's deployment and what it measured (``serving/<model>/model.json``)."""

    model: str
    deploy: str
    status: str  # measured | partial | failed
    reason: str | None = None
    profiles: list[str] = Field(default_factory=list)
    warmup_discarded: int = 0
    measured_requests: int = 0
    cold_start_s: float | None = None
    ready_s: float | None = None
    first_token_s: float | None = None
    peak_rss_mb: float | None = None
    mean_rss_mb: float | None = None
    base_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    gpu_source: str | None = None
    size_on_disk_mb: float | None = None
    deployment: dict[str, Any] = Field(default_factory=dict)
    fingerprint: str = ""
    started_at: str = ""
    finished_at: str = ""
    wall_s: float = 0.0


class ServingReport(BaseModel):
    """The typed contents of ``serving.json``."""

    kind: str = "compkit.serving"
    schema_version: int = SCHEMA_VERSION
    created_at: str
    study: str
    config: dict[str, Any]
    slo: dict[str, Any] | None = None
    slo_source: str | None = None
    models: list[ModelRecord]
    partial: bool
    client: dict[str, Any] | None = None
    client_bound: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    tables: dict[str, str] = Field(default_factory=dict)
    kit: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | Path) -> ServingReport:
        path = Path(run_dir) / REPORT_FILE
        if not path.is_file():
            raise CompkitError(f"{run_dir}: the serving stage has not run (no {REPORT_FILE})")
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


@dataclass
class ServingResult:
    """What :func:`run_serving` returns: the report and every table (also on disk)."""

    run_dir: Path
    report: ServingReport
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- entry point


def run_serving(
    run_dir: str | Path,
    *,
    models: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    require_served: bool = True,
) -> ServingResult:
    """Deploy, load and measure the served models of a frozen run (module docstring).

    Parameters
    ----------
    run_dir
        A frozen run folder (stage 1; stage 2 first for ``gguf_requant`` candidates).
    models
        Only these models (each must have a ``serving:`` block); default every model with one.
    force
        Measure models again although their stored results match the current settings.
    progress
        Progress lines and a bar per profile on the terminal.
    require_served
        Without it (the pipeline), a study in which no model has a ``serving:`` block gets a
        report saying so and an empty evidence table instead of an error.

    Raises
    ------
    CompkitError
        No served model, an unknown name, a missing model file, a port in use, an
        unreachable endpoint, a changed frozen input (:class:`FrozenInputsChanged`).
    """
    run_dir = Path(run_dir)
    manifest = require_unchanged(run_dir)
    frozen = Run.open(run_dir)
    study = load_study(manifest.inputs.study_file)
    cfg = study.serving
    if not require_served and not models and not any(m.serving for m in study.models):
        return _nothing_served(run_dir, study)
    specs = select_served(study, models)
    plans = [plan_deploy(s, study, run_dir=run_dir) for s in specs]  # fail before starting
    prompts = served_prompts(frozen, seed=cfg.seed)
    slo, slo_source = serving_slo(study, run_dir)
    say = print if progress else (lambda *a, **k: None)
    todo = [p for p in plans if force or not _is_current(p, study, frozen, prompts)]
    client = _previous_client(run_dir)
    if cfg.client_check and (todo or client is None):
        client = _ceiling(study, say)
    records = []
    for plan in plans:
        records.append(
            _measure_or_reuse(plan, study, frozen, prompts, force=force, progress=progress, say=say)
        )
    records = stored_records(run_dir, study, fresh=records)
    tables, paths = write_serving_tables(run_dir, study, frozen, records=records, slo=slo)
    report = _report(study, records, tables, slo, slo_source, client, paths)
    atomic_write_text(run_dir / REPORT_FILE, report.model_dump_json(indent=2) + "\n")
    if report.partial:
        say(
            "serving: PARTIAL results: "
            + "; ".join(
                f"{r.model}: {r.status} ({(r.reason or '').splitlines()[0]})"
                for r in records
                if r.status != "measured"
            )
        )
    return ServingResult(run_dir, report, tables, paths)


def _nothing_served(run_dir: Path, study: Study) -> ServingResult:
    from kit.environment import kit_info
    from kit.serving.evidence import EVIDENCE_COLUMNS

    evidence = pd.DataFrame(columns=EVIDENCE_COLUMNS)
    path = Run.open(run_dir).write_table("serving_evidence", evidence)
    report = ServingReport(
        created_at=now_iso(),
        study=str(study.source),
        config=study.serving.model_dump(mode="json"),
        models=[],
        partial=False,
        notes=["no model has a serving: block; add `serving: {}` to a model to measure it"],
        tables={"evidence": str(path)},
        kit=kit_info().model_dump(mode="json"),
    )
    atomic_write_text(run_dir / REPORT_FILE, report.model_dump_json(indent=2) + "\n")
    return ServingResult(run_dir, report, {"evidence": evidence}, {"evidence": path})


def select_served(study: Study, names: list[str] | None) -> list[ModelSpec]:
    """The models to serve: those named (each with a ``serving:`` block), else all with one."""
    if names:
        specs = [study.model(n) for n in dict.fromkeys(names)]
        bare = [s.name for s in specs if s.serving is None]
        if bare:
            raise CompkitError(
                f"model(s) {bare} have no serving: block in {study.source}; add e.g. "
                "`serving: {}` (deploy the default way for the runtime) to each"
            )
        return specs
    specs = [m for m in study.models if m.serving is not None]
    if not specs:
        raise CompkitError(
            f"study {study.source}: no model has a serving: block, so stage 5 has nothing to "
            "measure; add `serving: {}` (or e.g. `serving: {deploy: llamacpp_server, threads: 2}`) "
            "to the baseline and the candidates to serve"
        )
    return specs


def serving_slo(study: Study, run_dir: Path) -> tuple[SLOConfig | None, str | None]:
    """The goodput SLO: the study's ``serving.slo``, else the frozen budget's absolute
    latency rules (``p95 first-token latency must stay below 400 ms`` -> TTFT <= 400 ms)."""
    if study.serving.slo is not None:
        return study.serving.slo, "study serving.slo"
    return budget_slo(run_dir)


def budget_slo(run_dir: Path) -> tuple[SLOConfig | None, str | None]:
    """SLO limits from the frozen budget's absolute rules on ``ttft_p*_ms``, ``tpot_p*_ms``
    and ``e2e_p*_ms`` (below / at most); the tightest per kind. Seam: reads
    :mod:`kit.budget.grammar` rule objects (``metric``, ``bound.op``, ``bound.value``)."""
    from kit.budget.frozen import load_frozen_budget
    from kit.budget.grammar import AbsoluteBound

    if Run.open(run_dir).frozen_budget is None:
        return None, None
    limits: dict[str, float] = {}
    used: list[str] = []
    for rule in load_frozen_budget(run_dir):
        m = re.fullmatch(r"(ttft|tpot|e2e)_p\d+_ms", rule.metric)
        if m and isinstance(rule.bound, AbsoluteBound) and rule.bound.op in ("<", "<="):
            key = f"{m.group(1)}_ms"
            limits[key] = min(limits.get(key, float("inf")), float(rule.bound.value))
            used.append(rule.text)
    if not limits:
        return None, None
    return SLOConfig(**limits), "budget: " + "; ".join(used)


# --------------------------------------------------------------------------- one model


def model_folder(run_dir: Path, model: str) -> Path:
    return run_dir / SERVING_DIR / model


def served_prompts(frozen: Run, *, seed: int) -> PromptSet:
    """The frozen prompts as they are deployed: each with its answer schema and its task's
    token limit, as stage 2 ran them."""
    limits = frozen.study.task_token_limits
    by_item = {it.id: limits[it.task] for it in frozen.scoring_set.items if it.task in limits}
    return PromptSet.from_frozen(frozen.prompts, seed=seed, schemas=frozen.schemas, limits=by_item)


def fingerprint(plan: DeployPlan, study: Study, frozen: Run, prompts: PromptSet) -> str:
    """Hash of everything that changes a model's serving measurements."""
    payload = {
        "deploy": plan.describe(),
        "spec": plan.spec.fingerprint(),
        "cost": plan.spec.cost.model_dump(mode="json") if plan.spec.cost else None,
        "serving": study.serving.model_dump(mode="json"),
        "sampling": frozen.manifest.inputs.sampling,
        "prompts": list(prompts.ids),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _is_current(plan, study, frozen, prompts) -> bool:
    """Whether the model's stored measurements were made with exactly these settings."""
    done = model_folder(frozen.run_dir, plan.spec.name) / "_COMPLETE.json"
    if not done.is_file():
        return False
    return json.loads(done.read_text())["fingerprint"] == fingerprint(plan, study, frozen, prompts)


def _previous_client(run_dir: Path) -> dict[str, Any] | None:
    if not (run_dir / REPORT_FILE).is_file():
        return None
    try:
        return ServingReport.load(run_dir).client
    except ValueError:
        return None


def _measure_or_reuse(plan, study, frozen, prompts, *, force, progress, say) -> ModelRecord:
    folder = model_folder(frozen.run_dir, plan.spec.name)
    fp = fingerprint(plan, study, frozen, prompts)
    done = folder / "_COMPLETE.json"
    if not force and _is_current(plan, study, frozen, prompts):
        say(f"serving {plan.spec.name}: measured already with these settings (force reruns it)")
        return ModelRecord.model_validate_json((folder / "model.json").read_text(encoding="utf-8"))
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "profiles").mkdir(parents=True)
    record = measure_model(plan, study, frozen, prompts, folder=folder, progress=progress, say=say)
    record.fingerprint = fp
    atomic_write_text(folder / "model.json", record.model_dump_json(indent=2) + "\n")
    if record.status == "measured":
        atomic_write_text(done, json.dumps({"fingerprint": fp, "finished_at": now_iso()}) + "\n")
    return record


def measure_model(
    plan: DeployPlan,
    study: Study,
    frozen: Run,
    prompts: PromptSet,
    *,
    folder: Path,
    progress: bool,
    say: Any = print,
) -> ModelRecord:
    """Deploy one model, run its profiles, stop it; the record says how far it got."""
    cfg, name = study.serving, plan.spec.name
    record = ModelRecord(model=name, deploy=plan.kind, status="measured", started_at=now_iso())
    t0 = time.perf_counter()
    writer = _ProfileWriter(frozen, name)
    say(f"serving {name}: deploying ({plan.kind}) ...")
    base_rss = tree_rss(os.getpid()) if plan.kind == "transformers" else None
    try:
        with deploy(
            plan, study, run_dir=frozen.run_dir, sampling=frozen.sampling, timeout_s=cfg.timeout_s
        ) as dep:
            _note_deployment(record, dep, say)
            sampler = MemorySampler(dep.pid).start() if dep.pid is not None else None
            try:
                runs = _load(dep, study, frozen, prompts, writer, progress)
            finally:
                memory = sampler.stop() if sampler is not None else None
            _note_runs(record, runs, memory, base_rss)
    except ServerStartError as exc:
        record.status, record.reason = "failed", str(exc)
        say(f"serving {name}: FAILED to start: {str(exc).splitlines()[0]}")
    record.finished_at, record.wall_s = now_iso(), round(time.perf_counter() - t0, 3)
    return record


def _load(
    dep: Deployment, study: Study, frozen: Run, prompts: PromptSet, writer, progress
) -> list[ProfileRun]:
    cfg = study.serving
    if not dep.plan.spec.structured_output:  # measured without constrained decoding
        prompts = dataclasses.replace(prompts, schemas={})
    if dep.in_process:
        return run_batch_profiles(
            dep.runtime,
            prompts,
            model=dep.plan.spec.name,
            batch_sizes=dep.plan.deploy.batch_sizes,
            config=cfg,
            sampling=frozen.sampling,
            progress=progress,
            on_profile=writer,
        )
    target = EndpointTarget(dep.runtime, frozen.sampling, max_new_tokens=cfg.max_new_tokens)
    plan = EndpointPlan(
        dep.plan.spec.name, cfg, prompts, progress=progress, alive=dep.alive, on_profile=writer
    )
    return run_endpoint(target, plan)


def _note_deployment(record: ModelRecord, dep: Deployment, say) -> None:
    if dep.cold_start is not None:
        record.ready_s, record.first_token_s = dep.cold_start.ready_s, dep.cold_start.first_token_s
        record.cold_start_s = dep.cold_start.total_s
    if dep.size_on_disk_bytes is not None:
        record.size_on_disk_mb = dep.size_on_disk_bytes / MB
    record.deployment = {**dep.plan.describe(), **dep.info}
    ready = f"ready in {dep.cold_start.ready_s:.2f} s" if dep.cold_start else "reachable"
    say(f"serving {record.model}: {ready}; running {len(record.profiles) or 'its'} profiles")


def _note_runs(record: ModelRecord, runs: list[ProfileRun], memory, base_rss: int | None) -> None:
    record.profiles = [r.spec.name for r in runs]
    record.warmup_discarded = sum(len(r.records) - len(r.measured) for r in runs)
    record.measured_requests = sum(len(r.measured) for r in runs)
    aborted = next((r for r in runs if r.aborted), None)
    if aborted is not None:
        record.status = "partial"
        record.reason = f"stopped in profile {aborted.spec.name!r}: {aborted.aborted}"
    if memory is not None:
        record.peak_rss_mb, record.mean_rss_mb = memory.peak_rss_mb, memory.mean_rss_mb
        record.peak_gpu_mb, record.gpu_source = memory.peak_gpu_mb, memory.gpu_source
    if base_rss is not None:
        record.base_rss_mb = base_rss / MB


class _ProfileWriter:
    """Writes each finished profile's timeline at once (an atomic, recorded artifact)."""

    def __init__(self, run: Run, model: str):
        self.run, self.model, self.count = run, model, 0

    def __call__(self, profile: ProfileRun) -> None:
        frame = profile.frame(model=self.model)
        frame["stopped_by"], frame["aborted"] = profile.stopped_by, profile.aborted
        frame["profile_wall_s"] = profile.wall_s
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", profile.spec.name)
        relpath = f"{SERVING_DIR}/{self.model}/profiles/{self.count:02d}-{slug}.parquet"
        self.run.write_artifact(relpath, frame)
        self.count += 1


def load_timelines(run: str | Path | Run, models: list[str] | None = None) -> pd.DataFrame:
    """Every stored per-request timeline of the run (optionally of some models), each file
    checked against the digest recorded when it was written."""
    run = Run.open(run)
    root = run.root / SERVING_DIR
    files = sorted(root.glob("*/profiles/*.parquet")) if root.is_dir() else []
    frames = [
        run.read_artifact(str(f.relative_to(run.root)))
        for f in files
        if models is None or f.parts[-3] in models
    ]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# --------------------------------------------------------------------------- tables


def stored_records(run_dir: Path, study: Study, *, fresh: list[ModelRecord]) -> list[ModelRecord]:
    """The records of this run's models plus those measured earlier (``--model`` runs one
    at a time), in study order."""
    by_name = {r.model: r for r in fresh}
    out = []
    for spec in study.models:
        path = model_folder(run_dir, spec.name) / "model.json"
        if spec.name in by_name:
            out.append(by_name[spec.name])
        elif spec.serving is not None and path.is_file():
            out.append(ModelRecord.model_validate_json(path.read_text(encoding="utf-8")))
    return out


def write_serving_tables(
    run_dir: Path,
    study: Study,
    frozen: Run,
    *,
    records: list[ModelRecord],
    slo: SLOConfig | None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Path]]:
    """Compute every table from the stored timelines and write ``tables/serving_*.parquet``."""
    from kit.serving.tables import TableInputs, compute_tables

    names = [r.model for r in records]
    inputs = TableInputs(
        eval_set=frozen.eval_set,
        config=study.serving,
        baseline=frozen.manifest.outputs.model,
        records=[r.model_dump(mode="json") for r in records],
        costs={m.name: m.cost for m in study.models if m.cost is not None and m.name in names},
        slo=slo,
        stored_outputs=frozen.outputs(),
        confidence=frozen.confidence,
    )
    tables = compute_tables(load_timelines(frozen, names), inputs)
    paths = {name: frozen.write_table(f"serving_{name}", frame) for name, frame in tables.items()}
    return tables, paths


# --------------------------------------------------------------------------- report


def _ceiling(study: Study, say) -> dict[str, Any]:
    cfg = study.serving
    level = max([cfg.max_concurrency, *cfg.concurrency])
    say(
        f"serving: measuring the load generator's own ceiling (instant fake server, {level} in flight) ..."
    )
    result = client_ceiling(concurrency=level)
    say(f"serving: client ceiling {result['ceiling_rps']:.0f} requests/s")
    return result


def _report(study, records, tables, slo, slo_source, client, paths) -> ServingReport:
    from kit.environment import kit_info

    notes = []
    if any(r.deploy == "llamacpp_server" for r in records):
        notes.append(LLAMA_CPP_PYTHON_NOTE)
    bound: list[str] = []
    thr = tables.get("throughput", pd.DataFrame())
    if client is not None and not thr.empty:
        rps = thr[thr["metric"] == "throughput_rps"]
        limit = 0.5 * client["ceiling_rps"]
        bound = [f"{r.model} {r.profile}" for r in rps.itertuples() if r.value > limit]
        if bound:
            notes.append(
                f"throughput above half the client ceiling ({limit:.0f} req/s) may be the client's: {bound}"
            )
    return ServingReport(
        created_at=now_iso(),
        study=str(study.source),
        config=study.serving.model_dump(mode="json"),
        slo=slo.model_dump(mode="json") if slo else None,
        slo_source=slo_source,
        models=records,
        partial=any(r.status != "measured" for r in records),
        client=client,
        client_bound=bound,
        notes=notes,
        tables={k: str(p) for k, p in paths.items()},
        kit=kit_info().model_dump(mode="json"),
    )
