"""Stage 2: run every candidate on exactly the inputs the baseline was frozen on.

Candidates come from the study file as it is now (candidates can be added after freezing),
but everything that makes the comparison fair comes from the frozen run: the canonical eval
items, the rendered prompts, the sampling settings, the repeats and their seeds. The stage
refuses to start when ``compkit check`` would fail.

Per candidate it writes ``outputs/<name>/`` (crash-safe parts, resumable) and
``candidates/<name>.json`` (:class:`CandidateManifest`: spec, recipe, identity, size on
disk, parameter count, timings, where it ran). A finished candidate is not rerun unless
``force``.

Where a candidate runs is the study's ``execution:`` (:mod:`kit.engines`), overridden by
``--ray`` / ``--workers``: here (``local``), or on Ray replicas (``ray``,
:func:`kit.execute_ray.run_model_on_ray`; in-process runtimes only: served and file
runtimes run here). One Ray session serves the whole stage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kit import scoring
from kit.engines import engine_module, resolve_execution
from kit.errors import CompkitError
from kit.execute import RunPlan, run_model
from kit.models import builtin_gguf_path
from kit.recipes import (
    RECIPES,
    apply_torch_recipe,
    check_recipe,
    gguf_requantize,
    has_packed_weights,
    model_footprint,
)
from kit.run import OUTCOMES, CandidateManifest, Run
from kit.runtimes import RUNTIMES, check_study_runtimes, open_runtime, with_threads
from kit.runtimes.base import Runtime
from kit.stages.freeze import require_unchanged
from kit.store import OutputStore, atomic_write_json, atomic_write_text, now_iso
from kit.study import ExecutionConfig, ModelSpec, Study, load_study
from kit.teacher_forcing import candidate_distributions, distribution_store

#: Why a candidate run on the ray engine has no token distributions (teacher forcing runs
#: in this process, where the runtime's logits are; the local engine measures them).
RAY_NO_FORCING = (
    "ran on the ray engine: teacher forcing of the baseline's answers runs in process only "
    "(the local engine measures token distributions)"
)


def models_cache(run_dir: Path) -> Path:
    """Where recipe-made model files of a run live (``runs/NAME/models``)."""
    return run_dir / "models"


def open_candidate(
    spec: ModelSpec, study: Study, *, run_dir: Path, save: bool = True
) -> tuple[Runtime, dict[str, int | None]]:
    """Open a candidate's runtime, applying its compression recipe; returns the runtime and
    its footprint (``parameters``, ``size_bytes``, ``size_on_disk_bytes``).

    ``save=False`` keeps a float recipe's model in memory only (the Ray replicas other than
    the first: one writer per folder); its size on disk is then unknown (``None``).
    """
    if spec.recipe is None:
        runtime = open_runtime(spec, base_dir=study.root)
        ident = runtime.identity()
        return runtime, {
            "parameters": ident.parameters,
            "size_bytes": ident.size_bytes,
            "size_on_disk_bytes": ident.size_bytes,
        }
    info = check_recipe(spec.recipe, runtime=spec.runtime)
    if info.runtime == "llamacpp":
        return _open_gguf_recipe(spec, study, run_dir=run_dir)
    return _open_torch_recipe(spec, study, run_dir=run_dir, save=save)


def open_candidate_replica(
    spec: ModelSpec, study: Study, run_dir: Path, rank: int, threads: int
) -> tuple[Runtime, dict[str, int | None]]:
    """Open replica ``rank`` of a candidate in a Ray actor (the opener of
    :func:`kit.execute_ray.run_model_on_ray`), on ``threads`` CPU threads; only replica 0
    saves a recipe's model files."""
    return open_candidate(with_threads(spec, threads), study, run_dir=run_dir, save=rank == 0)


def prepare_candidate_files(spec: ModelSpec, study: Study, *, run_dir: Path) -> None:
    """Make the files every replica opens, once, before replicas start (a requantized GGUF)."""
    if spec.recipe is not None and check_recipe(spec.recipe, runtime=spec.runtime).runtime == (
        "llamacpp"
    ):
        _requantized_gguf(spec, study, run_dir=run_dir)


def _open_torch_recipe(spec: ModelSpec, study: Study, *, run_dir: Path, save: bool = True):
    from kit.runtimes.hf import TransformersRuntime

    base = TransformersRuntime(spec.model_copy(update={"recipe": None}), base_dir=study.root)
    model = apply_torch_recipe(base.model, spec.recipe)
    runtime = TransformersRuntime.from_model(model, base.tokenizer, spec, base_dir=study.root)
    footprint = model_footprint(model)
    folder = models_cache(run_dir) / spec.name
    disk = _save_if_possible(model, base.tokenizer, folder) if save else None
    return runtime, {**footprint, "size_on_disk_bytes": disk}


def _save_if_possible(model: Any, tokenizer: Any, folder: Path) -> int | None:
    """Save float recipes (bf16, pruned) as a loadable safetensors folder and return its
    size; packed int8 layers have no standard on-disk form here, so ``None``."""
    if has_packed_weights(model):
        return None
    tmp = folder.with_name(f".{folder.name}.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _open_gguf_recipe(spec: ModelSpec, study: Study, *, run_dir: Path):
    target = _requantized_gguf(spec, study, run_dir=run_dir)
    runtime = open_runtime(
        spec.model_copy(update={"model": str(target.resolve()), "recipe": None}),
        base_dir=study.root,
    )
    runtime.spec = spec  # rows and manifests carry the candidate's own spec
    ident = runtime.identity()
    return runtime, {
        "parameters": ident.parameters,
        "size_bytes": target.stat().st_size,
        "size_on_disk_bytes": target.stat().st_size,
    }


def _requantized_gguf(spec: ModelSpec, study: Study, *, run_dir: Path) -> Path:
    """The candidate's requantized GGUF in ``runs/NAME/models`` (made once, then reused)."""
    source = (
        builtin_gguf_path(spec.model.removeprefix("builtin:"))
        if spec.model.startswith("builtin:")
        else study.resolve(spec.model)
    )
    if not source.is_file():
        raise CompkitError(f"candidate {spec.name!r}: GGUF file not found: {source}")
    qtype = spec.recipe.params.get("type")
    if not qtype:
        raise CompkitError(
            f"candidate {spec.name!r}: recipe gguf_requant needs params.type (e.g. Q2_K)"
        )
    target = models_cache(run_dir) / f"{source.stem}.{str(qtype).upper()}.gguf"
    if not target.exists():
        print(f"requantizing {source.name} -> {target.name} with llama.cpp ...", flush=True)
    return gguf_requantize(
        source, target, type=str(qtype), threads=spec.recipe.params.get("threads")
    )


def select_candidates(study: Study, only: list[str] | None) -> list[ModelSpec]:
    if not study.candidates:
        raise CompkitError(
            f"study {study.source}: no candidates; add them under 'candidates:' "
            f"(recipes: {sorted(RECIPES)})"
        )
    if not only:
        return list(study.candidates)
    names = [c.name for c in study.candidates]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise CompkitError(
            f"--only {unknown}: not candidates of study {study.name!r}; candidates: {names}"
        )
    return [c for c in study.candidates if c.name in only]


def run_candidates(
    run_dir: str | Path,
    *,
    only: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    ray: str | bool | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Run the study's candidates on the frozen inputs; returns one summary row per candidate.

    Parameters
    ----------
    ray, workers
        ``compkit candidates --ray [ADDRESS] --workers N``: run on Ray (at ``ADDRESS``, else the
        study's ``execution.address``, else a local Ray), overriding the study's ``execution:``
        (:func:`kit.engines.resolve_execution`).

    Raises :class:`~kit.stages.freeze.FrozenInputsChanged` (with the drift report) when a frozen
    input changed.
    """
    run_dir = Path(run_dir)
    manifest = require_unchanged(run_dir)
    frozen = Run.open(run_dir)
    study = load_study(manifest.inputs.study_file)
    check_study_runtimes(study)
    specs = select_candidates(study, only)
    execution = resolve_execution(study.execution, ray=ray, workers=workers)
    with _engine_session(execution, specs):
        for spec in tqdm(
            specs, desc="candidates", unit="model", disable=not progress or len(specs) < 2
        ):
            _run_one(spec, study, frozen, execution, force=force, progress=progress)
    write_outcomes(frozen)
    return candidate_summary(run_dir)


def _sharded(execution: ExecutionConfig, spec: ModelSpec) -> bool:
    """Whether ``spec`` runs on Ray replicas: an in-process runtime under ``engine: ray``.
    Served and file runtimes run here (an endpoint scales behind its own URL)."""
    return execution.engine == "ray" and RUNTIMES[spec.runtime].in_process


@contextlib.contextmanager
def _engine_session(execution: ExecutionConfig, specs: list[ModelSpec]) -> Iterator[None]:
    """One Ray session for the whole stage (a local Ray starts once, not per candidate)."""
    if not any(_sharded(execution, s) for s in specs):
        yield
        return
    engine_module(execution.engine, purpose=f"execution.engine {execution.engine!r}")
    from kit.execute_ray import ray_session

    with ray_session(execution.address):
        yield


def _run_one(
    spec: ModelSpec,
    study: Study,
    frozen: Run,
    execution: ExecutionConfig,
    *,
    force: bool,
    progress: bool,
) -> None:
    run_dir = frozen.run_dir
    store = OutputStore(run_dir / "outputs" / spec.name)
    stamp = store.root / "_SPEC.json"
    if force:
        store.clear()
        distribution_store(run_dir, spec.name).clear()
    elif stamp.exists():
        before = json.loads(stamp.read_text(encoding="utf-8"))
        if before["fingerprint"] != spec.fingerprint():
            raise CompkitError(
                f"candidate {spec.name!r} changed since its results were stored "
                f"({store.root}); rerun with --force to discard them"
            )
        if store.is_complete() and (run_dir / "candidates" / f"{spec.name}.json").exists():
            print(f"candidate {spec.name!r}: already complete, skipped (--force reruns it)")
            return
    atomic_write_json(
        stamp, {"fingerprint": spec.fingerprint(), "spec": spec.model_dump(mode="json")}
    )
    started, t0 = now_iso(), time.perf_counter()
    if _sharded(execution, spec):
        rows, identity, footprint, record = _run_on_ray(
            spec, study, frozen, store, execution, progress=progress
        )
        forced = {"status": "not measured", "reason": RAY_NO_FORCING}
    else:
        if execution.engine != "local":
            print(
                f"candidate {spec.name!r}: the {spec.runtime} runtime is not in-process; it runs "
                "here (scale an endpoint behind its URL, e.g. vLLM data parallel)",
                flush=True,
            )
        rows, identity, footprint, forced = _run_here(spec, study, frozen, store, progress=progress)
        record = {"engine": "local"}
    cm = CandidateManifest(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_fingerprint=spec.fingerprint(),
        recipe=spec.recipe.model_dump(mode="json") if spec.recipe else None,
        identity=identity,
        footprint=footprint,
        baseline=frozen.manifest.outputs.model,
        rows=len(rows),
        items=rows["item_id"].nunique(),
        repeats=frozen.manifest.inputs.repeats,
        errors=int(rows["error"].notna().sum()),
        started_at=started,
        finished_at=now_iso(),
        wall_s=round(time.perf_counter() - t0, 3),
        execution=record,
        distributions=forced,
    )
    atomic_write_text(run_dir / "candidates" / f"{spec.name}.json", cm.model_dump_json(indent=2))


def _run_here(spec: ModelSpec, study: Study, frozen: Run, store: OutputStore, *, progress: bool):
    """The local engine: one replica in this process; then teacher forcing of the baseline's
    answers (token distributions, :mod:`kit.teacher_forcing`)."""
    runtime, footprint = open_candidate(spec, study, run_dir=frozen.run_dir)
    try:
        plan = RunPlan.from_prompts(
            model_name=spec.name,
            items=frozen.scoring_set.items,
            prompts=frozen.prompts,
            continuations=frozen.continuations,
            runtime=runtime,
            sampling=frozen.sampling,
            repeats=frozen.manifest.inputs.repeats,
            schemas=frozen.schemas,
            structured_output=spec.structured_output,
        )
        plan.max_new_tokens = frozen.study.task_token_limits
        rows = run_model(runtime, plan, store, score_choices=spec.score_choices, progress=progress)
        forced = candidate_distributions(
            runtime,
            run_dir=frozen.run_dir,
            baseline=frozen.baseline,
            model=spec.name,
            progress=progress,
        )
        identity = asdict(runtime.identity())
    finally:
        runtime.close()
    return rows, identity, footprint, forced


def _run_on_ray(
    spec: ModelSpec,
    study: Study,
    frozen: Run,
    store: OutputStore,
    execution: ExecutionConfig,
    *,
    progress: bool,
):
    """The ray engine: ``execution.workers`` replicas, each opening the candidate itself."""
    from kit.execute_ray import PlanInputs, run_model_on_ray

    prepare_candidate_files(spec, study, run_dir=frozen.run_dir)
    result = run_model_on_ray(
        opener=functools.partial(open_candidate_replica, spec, study, frozen.run_dir.resolve()),
        inputs=PlanInputs(
            model_name=spec.name,
            items=frozen.scoring_set.items,
            prompts=frozen.prompts,
            continuations=frozen.continuations,
            sampling=frozen.sampling,
            repeats=frozen.manifest.inputs.repeats,
            schemas=frozen.schemas,
            structured_output=spec.structured_output,
            max_new_tokens=frozen.study.task_token_limits,
        ),
        store=store,
        execution=execution,
        score_choices=spec.score_choices,
        progress=progress,
    )
    return result.rows, result.identity, result.footprint, result.execution


def score_run(run: Run, *, sources=()) -> pd.DataFrame:
    """Score every stored output of a run (baseline and candidates) with the frozen
    continuations (for ``acc_norm``) and any extra score ``sources``."""
    outputs = run.outputs(items="all")
    if outputs.empty:
        raise CompkitError(f"{run.root}: no stored outputs (run stages 1 and 2 first)")
    return scoring.score_outputs(
        run.scoring_set,
        outputs,
        continuations=run.continuations,
        sources=sources,
        choice_answer=run.study.choice_answer_tasks,
    )


def write_outcomes(run: Run, *, sources=()) -> pd.DataFrame:
    """Score every stored output and write ``outcomes.parquet`` (model x item x repeat).

    This is the one place outputs are scored: stages 3, 4, 7 and the memo read the file.
    """
    outcomes = score_run(run, sources=sources)
    run.write_outcomes(outcomes)
    return outcomes


def candidate_summary(run_dir: str | Path) -> pd.DataFrame:
    """One row per finished candidate: size, parameters, errors, wall time, accuracy."""
    run_dir = Path(run_dir)
    rows = []
    acc = (
        Run.open(run_dir).outcomes().groupby("model")["correct"].mean()
        if (run_dir / OUTCOMES).exists()
        else pd.Series(dtype=float)
    )
    for path in sorted((run_dir / "candidates").glob("*.json")):
        cm = CandidateManifest.load(path)
        rows.append(
            {
                "candidate": cm.name,
                "kind": cm.spec.get("kind", "compressed"),
                "runtime": cm.spec["runtime"],
                "recipe": (cm.recipe or {}).get("name"),
                "parameters": cm.footprint.get("parameters"),
                "size_mb": (cm.footprint.get("size_bytes") or 0) / 1e6,
                "size_on_disk_mb": (cm.footprint.get("size_on_disk_bytes") or 0) / 1e6 or None,
                "rows": cm.rows,
                "errors": cm.errors,
                "wall_s": cm.wall_s,
                "accuracy": acc.get(cm.name),
            }
        )
    return pd.DataFrame(rows)
