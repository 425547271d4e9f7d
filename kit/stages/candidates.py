"""Stage 2: run every candidate on exactly the inputs the baseline was frozen on.

Candidates come from the study file as it is now (candidates can be added after freezing),
but everything that makes the comparison fair comes from the frozen run: the canonical eval
items, the rendered prompts, the sampling settings, the repeats and their seeds. The stage
refuses to start when ``compkit check`` would fail.

Per candidate it writes ``outputs/<name>/`` (crash-safe parts, resumable) and
``candidates/<name>.json`` (:class:`CandidateManifest`: spec, recipe, identity, size on
disk, parameter count, timings). A finished candidate is not rerun unless ``force``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kit import scoring
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
from kit.runtimes import check_study_runtimes, open_runtime
from kit.runtimes.base import Runtime
from kit.stages.freeze import require_unchanged
from kit.store import OutputStore, atomic_write_json, atomic_write_text, now_iso
from kit.study import ModelSpec, Study, load_study


def models_cache(run_dir: Path) -> Path:
    """Where recipe-made model files of a run live (``runs/NAME/models``)."""
    return run_dir / "models"


def open_candidate(
    spec: ModelSpec, study: Study, *, run_dir: Path
) -> tuple[Runtime, dict[str, int | None]]:
    """Open a candidate's runtime, applying its compression recipe; returns the runtime and
    its footprint (``parameters``, ``size_bytes``, ``size_on_disk_bytes``)."""
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
    return _open_torch_recipe(spec, study, run_dir=run_dir)


def _open_torch_recipe(spec: ModelSpec, study: Study, *, run_dir: Path):
    from kit.runtimes.hf import TransformersRuntime

    base = TransformersRuntime(spec.model_copy(update={"recipe": None}), base_dir=study.root)
    model = apply_torch_recipe(base.model, spec.recipe)
    runtime = TransformersRuntime.from_model(model, base.tokenizer, spec, base_dir=study.root)
    footprint = model_footprint(model)
    disk = _save_if_possible(model, base.tokenizer, models_cache(run_dir) / spec.name)
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
    print(f"requantizing {source.name} -> {target.name} with llama.cpp ...", flush=True)
    gguf_requantize(source, target, type=str(qtype), threads=spec.recipe.params.get("threads"))
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
) -> pd.DataFrame:
    """Run the study's candidates on the frozen inputs; returns one summary row per candidate.

    Raises :class:`~kit.stages.freeze.FrozenInputsChanged` (with the drift report) when a frozen
    input changed.
    """
    run_dir = Path(run_dir)
    manifest = require_unchanged(run_dir)
    frozen = Run.open(run_dir)
    study = load_study(manifest.inputs.study_file)
    check_study_runtimes(study)
    specs = select_candidates(study, only)
    for spec in tqdm(
        specs, desc="candidates", unit="model", disable=not progress or len(specs) < 2
    ):
        _run_one(spec, study, frozen, force=force, progress=progress)
    write_outcomes(frozen)
    return candidate_summary(run_dir)


def _run_one(spec: ModelSpec, study: Study, frozen: Run, *, force: bool, progress: bool) -> None:
    run_dir = frozen.run_dir
    store = OutputStore(run_dir / "outputs" / spec.name)
    stamp = store.root / "_SPEC.json"
    if force:
        store.clear()
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
    runtime, footprint = open_candidate(spec, study, run_dir=run_dir)
    try:
        plan = RunPlan.from_prompts(
            model_name=spec.name,
            items=frozen.eval_set.items,
            prompts=frozen.prompts,
            continuations=frozen.continuations,
            runtime=runtime,
            sampling=frozen.sampling,
            repeats=frozen.manifest.inputs.repeats,
        )
        rows = run_model(runtime, plan, store, score_choices=spec.score_choices, progress=progress)
        identity = asdict(runtime.identity())
    finally:
        runtime.close()
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
    )
    atomic_write_text(run_dir / "candidates" / f"{spec.name}.json", cm.model_dump_json(indent=2))


def score_run(run: Run, *, sources=()) -> pd.DataFrame:
    """Score every stored output of a run (baseline and candidates) with the frozen
    continuations (for ``acc_norm``) and any extra score ``sources``."""
    outputs = run.outputs()
    if outputs.empty:
        raise CompkitError(f"{run.root}: no stored outputs (run stages 1 and 2 first)")
    return scoring.score_outputs(
        run.eval_set, outputs, continuations=run.continuations, sources=sources
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
