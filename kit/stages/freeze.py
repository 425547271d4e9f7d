"""Stage 1: freeze the baseline, and detect when a frozen input changed.

``freeze_baseline`` runs the original model on every item and writes ``manifest.json``: the
model's identity (weight hashes), runtime and library versions, prompt template hash,
sampling, hardware, kit version and git sha, the eval set's content hash, the budget's hash,
and the baseline's scores. Copies of the study, template, eval set and budget go to
``frozen/``. ``check_frozen`` re-hashes every frozen input and reports what changed.

Run folder written here::

    runs/NAME/
      manifest.json            BaselineManifest (written last: its presence means "frozen")
      pending.json             while a freeze is running or was interrupted (resumable)
      frozen/                  study.yaml, prompt.jinja, eval_set.jsonl, item_hashes.json,
                               budget.yaml, slices.parquet, prompts.jsonl
      outputs/<baseline>/      per-(item, repeat) parquet parts (kit.store)
      tables/                  baseline_outcomes.parquet, baseline_scores.csv
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from kit import scoring
from kit.budget.grammar import load_budget, slice_vocabulary
from kit.environment import (
    OUTPUT_LIBRARIES,
    hardware,
    kit_info,
    library_versions,
)
from kit.errors import CompkitError
from kit.evalset import (
    EvalSet,
    derive_slices,
    length_bucket_labels,
    load_eval_set,
    stratified_sample,
)
from kit.execute import RunPlan, run_model
from kit.prompts import PromptBuilder, template_sha256
from kit.run import MANIFEST, PENDING, BaselineManifest, FrozenInputs, OutputsSummary
from kit.runtimes import check_study_runtimes, open_runtime, runtime_class
from kit.runtimes.base import Runtime
from kit.store import OutputStore, atomic_write_json, atomic_write_text, file_sha256, now_iso
from kit.study import Study, load_study

# --------------------------------------------------------------------------- freeze


def load_study_eval_set(study: Study) -> EvalSet:
    """The eval set exactly as a study uses it: renamed, validated, limited and sampled."""
    cfg = study.eval_set
    eval_set = load_eval_set(
        study.resolve(cfg.path),
        columns=cfg.columns,
        default_task=cfg.task,
        slice_columns=cfg.slice_columns,
        limit=cfg.limit,
    )
    if cfg.sample is not None:
        eval_set = stratified_sample(
            eval_set,
            n=cfg.sample.n,
            by=cfg.sample.by,
            seed=cfg.sample.seed,
            min_per_stratum=cfg.sample.min_per_stratum,
        )
    return eval_set


def prepare(study_path: str | Path) -> tuple[Study, EvalSet, PromptBuilder, FrozenInputs]:
    """Load and validate every input; renders every prompt. Writes nothing."""
    study = load_study(study_path)
    check_study_runtimes(study)
    cfg = study.eval_set
    eval_set = load_study_eval_set(study)
    builder = PromptBuilder(
        study.resolve(study.prompt.template),
        eval_set,
        chat=study.prompt.chat,
        system=study.prompt.system,
        choice_labels=study.prompt.choice_labels,
    )
    for item in eval_set:  # a template error surfaces now, before anything is written
        builder.render(item)
    budget = study.resolve(study.budget) if study.budget else None
    if budget is not None:  # a rule that cannot be judged must fail now, before any result exists
        load_budget(budget, slices=_budget_vocabulary(eval_set, cfg.length_buckets))
    inputs = FrozenInputs(
        study_file=str(study.source),
        study_sha256=file_sha256(study.source),
        eval_set_path=str(study.resolve(cfg.path)),
        eval_set_sha256=eval_set.sha256,
        eval_set_rows=len(eval_set),
        eval_set_config=cfg.model_dump(mode="json"),
        template_path=str(builder.template_path),
        template_sha256=builder.sha256,
        prompt=study.prompt.model_dump(mode="json"),
        sampling=study.sampling.model_dump(mode="json"),
        repeats=study.repeats,
        baseline=study.baseline.model_dump(mode="json"),
        baseline_fingerprint=study.baseline.fingerprint(),
        budget_path=str(budget) if budget else None,
        budget_sha256=file_sha256(budget) if budget else None,
    )
    return study, eval_set, builder, inputs


def _budget_vocabulary(eval_set: EvalSet, length_edges: list[int]) -> dict[str, tuple[str, ...]]:
    """Slice values a budget rule may name, known before the baseline has run."""
    vocab = dict(slice_vocabulary(eval_set.frame().drop(columns=["id"])))
    vocab["label_rarity"] = ("rare", "common")
    vocab["length_bucket"] = tuple(length_bucket_labels(length_edges))
    return vocab


def freeze_baseline(
    study_path: str | Path,
    out: str | Path,
    *,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> BaselineManifest:
    """Run the baseline on every item and write the manifest; resumes an interrupted freeze.

    Parameters
    ----------
    study_path
        The study YAML.
    out
        Run folder to create (``runs/NAME``). An already frozen folder is never overwritten.
    runtime
        An already opened runtime for the baseline (tests, notebooks); default: opened here.
    """
    out = Path(out)
    study, eval_set, builder, inputs = prepare(study_path)
    resuming = _check_run_dir(out, inputs)
    started = time.perf_counter()
    own_runtime = runtime is None
    runtime = runtime or open_runtime(study.baseline, base_dir=study.root)  # a bad model fails here
    if not resuming:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / PENDING, {**inputs.key(), "started_at": now_iso()})
    try:
        identity = runtime.identity()
        plan = RunPlan.build(
            model_name=study.baseline.name,
            items=eval_set.items,
            builder=builder,
            runtime=runtime,
            sampling=study.sampling,
            repeats=study.repeats,
        )
        _write_frozen_copies(out, study, eval_set, builder, inputs, plan)
        store = OutputStore(out / "outputs" / study.baseline.name)
        outputs = run_model(
            runtime, plan, store, score_choices=study.baseline.score_choices, progress=progress
        )
    finally:
        if own_runtime:
            runtime.close()
    outcomes = scoring.score_outputs(eval_set, outputs, continuations=plan.continuations)
    scores = scoring.overall(outcomes)
    tables = out / "tables"
    tables.mkdir(exist_ok=True)
    outcomes.to_parquet(tables / "baseline_outcomes.parquet", index=False)
    scores.to_csv(tables / "baseline_scores.csv", index=False)
    wall = time.perf_counter() - started
    manifest = BaselineManifest(
        study=study.name,
        created_at=now_iso(),
        inputs=inputs,
        model=asdict(identity),
        hardware=hardware(),
        libraries=library_versions(),
        kit=kit_info(),
        outputs=OutputsSummary(
            model=study.baseline.name,
            path=str(store.root.relative_to(out)),
            rows=len(outputs),
            items=outputs["item_id"].nunique(),
            repeats=study.repeats,
            errors=int(outputs["error"].notna().sum()),
        ),
        slice_columns=[
            "task",
            "language",
            "length_bucket",
            "label_rarity",
            *eval_set.slice_columns,
        ],
        scores=scores.to_dict("records"),
        timings={"wall_s": round(wall, 3)},
    )
    atomic_write_text(out / MANIFEST, manifest.model_dump_json(indent=2))
    (out / PENDING).unlink(missing_ok=True)
    return manifest


def ensure_frozen(
    study_path: str | Path, out: str | Path, *, progress: bool = True
) -> BaselineManifest:
    """Freeze if ``out`` is not frozen yet; else verify it and return its manifest.

    A frozen folder is accepted only when it was frozen from the same study file and none of
    its inputs changed; otherwise :class:`FrozenInputsChanged` says what changed.
    """
    out = Path(out)
    if not (out / MANIFEST).exists():
        return freeze_baseline(study_path, out, progress=progress)
    manifest = require_unchanged(out)
    if Path(manifest.inputs.study_file).resolve() != Path(study_path).resolve():
        raise CompkitError(
            f"{out} was frozen from {manifest.inputs.study_file}, not {study_path}; "
            "choose another run folder"
        )
    return manifest


def _check_run_dir(out: Path, inputs: FrozenInputs) -> bool:
    """Whether ``out`` holds an interrupted freeze of the same inputs (resume); raises when
    ``out`` is frozen already, was interrupted with other inputs, or is something else."""
    if out.exists() and not out.is_dir():
        raise CompkitError(f"--out {out} is a file; give a run folder (e.g. runs/NAME)")
    if (out / MANIFEST).exists():
        m = BaselineManifest.load(out)
        raise CompkitError(
            f"{out} is already frozen (study {m.study!r}, {m.created_at}); a frozen run is never "
            f"overwritten. Verify it with `compkit check {out}`, or freeze into a new --out folder."
        )
    if (out / PENDING).exists():
        before = json.loads((out / PENDING).read_text(encoding="utf-8"))
        changed = sorted(k for k, v in inputs.key().items() if before.get(k) != v)
        if changed:
            raise CompkitError(
                f"{out} holds an interrupted freeze made with different inputs ({', '.join(changed)}). "
                f"Resume it with the same study, or remove {out} to start over."
            )
        return True
    if out.exists() and any(out.iterdir()):
        raise CompkitError(f"{out} exists and is not a compkit run folder; choose another --out")
    return False


def _write_frozen_copies(
    out: Path,
    study: Study,
    eval_set: EvalSet,
    builder: PromptBuilder,
    inputs: FrozenInputs,
    plan: RunPlan,
) -> None:
    frozen = out / "frozen"
    frozen.mkdir(exist_ok=True)
    shutil.copyfile(study.source, frozen / "study.yaml")
    atomic_write_text(frozen / "prompt.jinja", builder.source)
    if inputs.budget_path:
        shutil.copyfile(inputs.budget_path, frozen / "budget.yaml")
    eval_set.to_jsonl(frozen / "eval_set.jsonl")
    atomic_write_json(frozen / "item_hashes.json", eval_set.item_hashes)
    slices = derive_slices(
        eval_set,
        prompt_tokens=plan.prompt_tokens,
        rare_label_threshold=study.eval_set.rare_label_threshold,
        length_edges=study.eval_set.length_buckets,
    )
    slices.to_parquet(frozen / "slices.parquet", index=False)
    with open(frozen / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for item_id, p in plan.prompts.items():
            fh.write(
                json.dumps(
                    {
                        "id": item_id,
                        "messages": p.messages,
                        "text": p.text,
                        "continuations": plan.continuations.get(item_id),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


# --------------------------------------------------------------------------- check


class DriftReport:
    """Result of re-hashing a frozen run's inputs.

    ``frame`` has one row per input: ``input, status, frozen, current, detail`` where status
    is ``same``, ``changed`` (comparison no longer fair: check fails) or ``warning``
    (recorded difference that does not invalidate outputs, e.g. the budget: verdicts keep
    using the frozen copy).
    """

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]], diffs: dict[str, str]):
        self.run_dir = run_dir
        self.frame = pd.DataFrame(rows, columns=["input", "status", "frozen", "current", "detail"])
        self.diffs = diffs

    @property
    def ok(self) -> bool:
        return not (self.frame["status"] == "changed").any()

    def changed(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] != "same"]

    def render(self) -> str:
        lines = [
            f"compkit check {self.run_dir}: "
            + ("all frozen inputs unchanged" if self.ok else "FROZEN INPUTS CHANGED")
        ]
        for r in self.frame.itertuples():
            mark = {"same": "ok     ", "changed": "CHANGED", "warning": "warning"}[r.status]
            lines.append(
                f"  {mark}  {r.input}"
                + (f": {r.detail}" if r.status != "same" and r.detail else "")
            )
        for name, diff in self.diffs.items():
            lines += ["", f"--- diff of {name} (frozen -> current)", diff.rstrip()]
        return "\n".join(lines)


def check_frozen(run_dir: str | Path) -> DriftReport:
    """Re-hash every frozen input of ``run_dir`` against the files as they are now."""
    run_dir = Path(run_dir)
    m = BaselineManifest.load(run_dir)
    rows: list[dict[str, Any]] = []
    diffs: dict[str, str] = {}

    def add(name: str, frozen: Any, current: Any, detail: str = "", *, warn: bool = False) -> None:
        status = "same" if frozen == current else ("warning" if warn else "changed")
        rows.append(
            {
                "input": name,
                "status": status,
                "frozen": _short(frozen),
                "current": _short(current),
                "detail": detail if status != "same" else "",
            }
        )

    try:
        study = load_study(m.inputs.study_file)
    except CompkitError as exc:
        add("study file", m.inputs.study_file, None, f"cannot be read: {exc}")
        return DriftReport(run_dir, rows, diffs)
    _check_eval_set(run_dir, m, study, add)
    _check_template(run_dir, m, study, add, diffs)
    add(
        "sampling",
        m.inputs.sampling,
        study.sampling.model_dump(mode="json"),
        _dict_change(m.inputs.sampling, study.sampling.model_dump(mode="json")),
    )
    add("repeats", m.inputs.repeats, study.repeats, f"{m.inputs.repeats} -> {study.repeats}")
    add(
        "baseline model spec",
        m.inputs.baseline_fingerprint,
        study.baseline.fingerprint(),
        _dict_change(m.inputs.baseline, study.baseline.model_dump(mode="json")),
    )
    _check_weights(m, study, add)
    now_libs = library_versions(OUTPUT_LIBRARIES)
    for lib in OUTPUT_LIBRARIES:
        add(
            f"library {lib}",
            m.libraries.get(lib),
            now_libs.get(lib),
            f"{m.libraries.get(lib)} -> {now_libs.get(lib)} (runtime version changed)",
        )
    _check_budget(run_dir, m, study, add, diffs)
    hw = hardware()
    add(
        "hardware",
        (m.hardware.cpu, m.hardware.gpu),
        (hw.cpu, hw.gpu),
        f"{m.hardware.cpu} / {m.hardware.gpu} -> {hw.cpu} / {hw.gpu} (latency figures not comparable)",
        warn=True,
    )
    return DriftReport(run_dir, rows, diffs)


def require_unchanged(run_dir: str | Path) -> BaselineManifest:
    """Raise :class:`FrozenInputsChanged` unless every frozen input is unchanged."""
    report = check_frozen(run_dir)
    if not report.ok:
        raise FrozenInputsChanged(report)
    return BaselineManifest.load(Path(run_dir))


class FrozenInputsChanged(CompkitError):
    exit_code = 1

    def __init__(self, report: DriftReport):
        self.report = report
        super().__init__(report.render())


def _check_eval_set(run_dir: Path, m: BaselineManifest, study: Study, add) -> None:
    try:
        current = load_study_eval_set(study)
    except CompkitError as exc:
        add("eval set", m.inputs.eval_set_sha256, None, f"cannot be loaded: {exc}")
        return
    frozen_hashes = json.loads(
        (run_dir / "frozen" / "item_hashes.json").read_text(encoding="utf-8")
    )
    added = sorted(set(current.item_hashes) - set(frozen_hashes))
    removed = sorted(set(frozen_hashes) - set(current.item_hashes))
    edited = sorted(
        i
        for i in set(frozen_hashes) & set(current.item_hashes)
        if frozen_hashes[i] != current.item_hashes[i]
    )
    detail = "; ".join(
        f"{n} {label}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
        for label, ids, n in (
            ("changed", edited, len(edited)),
            ("added", added, len(added)),
            ("removed", removed, len(removed)),
        )
        if ids
    )
    add("eval set", m.inputs.eval_set_sha256, current.sha256, detail)


def _check_template(
    run_dir: Path, m: BaselineManifest, study: Study, add, diffs: dict[str, str]
) -> None:
    path = study.resolve(study.prompt.template)
    text = path.read_text(encoding="utf-8")
    current = template_sha256(text)
    add("prompt template", m.inputs.template_sha256, current, f"{path} edited")
    if current != m.inputs.template_sha256:
        frozen_text = (run_dir / "frozen" / "prompt.jinja").read_text(encoding="utf-8")
        diffs["prompt template"] = _unified(frozen_text, text, "frozen/prompt.jinja", str(path))
    add(
        "prompt settings",
        m.inputs.prompt,
        study.prompt.model_dump(mode="json"),
        _dict_change(m.inputs.prompt, study.prompt.model_dump(mode="json")),
    )


def _check_weights(m: BaselineManifest, study: Study, add) -> None:
    try:
        current = runtime_class(study.baseline.runtime).weights_fingerprint(
            study.baseline, base_dir=study.root
        )
    except CompkitError as exc:
        add("model weights", m.model.get("weights_sha256"), None, f"cannot be read: {exc}")
        return
    if current is None:
        add(
            "model weights",
            m.model.get("weights_sha256"),
            "unverified",
            "this runtime cannot re-hash its weights without loading the model",
            warn=True,
        )
        return
    add(
        "model weights",
        m.model.get("weights_sha256"),
        current,
        "weights file(s) differ from the frozen ones",
    )


def _check_budget(
    run_dir: Path, m: BaselineManifest, study: Study, add, diffs: dict[str, str]
) -> None:
    path = study.resolve(study.budget) if study.budget else None
    current = file_sha256(path) if path and path.exists() else None
    add(
        "budget",
        m.inputs.budget_sha256,
        current,
        "edited after freezing: verdicts use the frozen copy (frozen/budget.yaml)",
        warn=True,
    )
    if (
        current != m.inputs.budget_sha256
        and path
        and path.exists()
        and (run_dir / "frozen" / "budget.yaml").exists()
    ):
        diffs["budget"] = _unified(
            (run_dir / "frozen" / "budget.yaml").read_text(encoding="utf-8"),
            path.read_text(encoding="utf-8"),
            "frozen/budget.yaml",
            str(path),
        )


def _unified(a: str, b: str, name_a: str, name_b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), name_a, name_b))


def _dict_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = sorted(set(before) | set(after))
    return ", ".join(
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)
    )


def _short(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
