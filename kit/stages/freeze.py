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
                               budget.yaml, slices.parquet, prompts.jsonl; with a perturbation
                               suite perturbed.jsonl, perturbed_hashes.json,
                               perturbed_slices.parquet, perturbations.json
      outputs/<baseline>/      per-(item, repeat) parquet parts (kit.store)
      tables/                  baseline_outcomes.parquet, baseline_scores.csv
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
    rare_label_set,
    stratified_sample,
)
from kit.execute import RunPlan, prompt_counter, run_model
from kit.perturb import (
    PERTURBATION_COLUMN,
    PerturbedSet,
    build_perturbed,
    check_suite,
    strip_columns,
    translation_columns,
)
from kit.prompts import PromptBuilder, template_sha256
from kit.run import (
    MANIFEST,
    PENDING,
    PERTURBATIONS_RECORD,
    PERTURBED,
    PERTURBED_HASHES,
    PERTURBED_SLICES,
    BaselineManifest,
    FrozenInputs,
    OutputsSummary,
)
from kit.runtimes import check_study_runtimes, open_runtime, runtime_class
from kit.runtimes.base import Prompt, Runtime
from kit.store import OutputStore, atomic_write_json, atomic_write_text, file_sha256, now_iso
from kit.structured import plan_schemas
from kit.study import Study, load_study
from kit.teacher_forcing import baseline_distributions

# --------------------------------------------------------------------------- freeze


def load_study_eval_set(study: Study, *, translations: bool = False) -> EvalSet:
    """The eval set exactly as a study uses it: renamed, validated, limited and sampled.

    The translation columns a perturbation suite reads (:func:`kit.perturb.translation_columns`)
    are not slice columns: they are left out unless ``translations``.
    """
    cfg = study.eval_set
    extra = translation_columns(study.perturbations)
    wanted = cfg.slice_columns
    if wanted is not None and extra:
        wanted = [*wanted, *(c for c in extra if c not in wanted)]
    eval_set = load_eval_set(
        study.resolve(cfg.path),
        columns=cfg.columns,
        default_task=cfg.task,
        slice_columns=wanted,
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
    return eval_set if translations else strip_columns(eval_set, extra)


def study_perturbed(
    study: Study,
    *,
    builder: PromptBuilder,
    count: Callable[[Prompt], int] | None = None,
    padding: dict[str, dict[str, int]] | None = None,
) -> PerturbedSet | None:
    """The study's perturbed items (None without a suite); ``count`` measures a rendered
    prompt in the baseline's tokens (padding at freeze time), ``padding`` reuses recorded
    sizes (``compkit check``)."""
    config = study.perturbations
    if config is None:
        return None
    items = load_study_eval_set(study, translations=True)
    _check_suite_inputs(study, items)
    counter = (lambda item: count(builder.render(item))) if count is not None else None
    return build_perturbed(
        items,
        config,
        count_tokens=counter,
        length_edges=study.eval_set.length_buckets,
        padding=padding,
    )


def _check_suite_inputs(study: Study, items: EvalSet) -> None:
    from kit.errors import Problem, ValidationError
    from kit.evalset import TASKS

    config = study.perturbations
    problems = []
    for i, spec in enumerate(config.suite):
        column = spec.params.get("column")
        if (
            spec.kind == "translation"
            and isinstance(column, str)
            and column not in items.slice_columns
        ):
            problems.append(
                Problem(
                    str(study.source),
                    f"translation column {column!r} is not a column of the eval set "
                    f"(columns: {items.slice_columns})",
                    field=f"perturbations.suite.{i}.params.column",
                )
            )
    for task in config.tasks or ():
        if task not in TASKS:
            problems.append(
                Problem(
                    str(study.source),
                    f"unknown task {task!r}; tasks: {list(TASKS)}",
                    field="perturbations.tasks",
                )
            )
    if problems:
        raise ValidationError(f"study {study.source}: perturbations", problems)


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
    rare_label_set(  # an unknown declared rare label too
        {it.id: it.label for it in eval_set.items if it.task == "classification"},
        threshold=cfg.rare_label_threshold,
        declared=cfg.rare_labels,
    )
    if study.perturbations is not None:  # a bad suite fails now (padding is sized at freeze)
        check_suite(study.perturbations, source=str(study.source))
        _check_suite_inputs(study, load_study_eval_set(study, translations=True))
    budget = study.resolve(study.budget) if study.budget else None
    if budget is not None:  # a rule that cannot be judged must fail now, before any result exists
        vocab = _budget_vocabulary(eval_set, cfg.length_buckets, study.perturbations)
        load_budget(budget, slices=vocab)
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
        perturbations=study.perturbations.model_dump(mode="json") if study.perturbations else None,
    )
    return study, eval_set, builder, inputs


def _budget_vocabulary(
    eval_set: EvalSet, length_edges: list[int], perturbations: Any = None
) -> dict[str, tuple[str, ...]]:
    """Slice values a budget rule may name, known before the baseline has run."""
    vocab = dict(slice_vocabulary(eval_set.frame().drop(columns=["id"])))
    vocab["label_rarity"] = ("rare", "common")
    vocab["length_bucket"] = tuple(length_bucket_labels(length_edges))
    if perturbations is not None:
        vocab[PERTURBATION_COLUMN] = tuple(s.label for s in perturbations.suite)
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
        done = _run_baseline(study, eval_set, builder, inputs, runtime, out, progress=progress)
    finally:
        if own_runtime:
            runtime.close()
    scores = _score_baseline(out, eval_set, done, choice_answer=study.choice_answer_tasks)
    outputs = done.outputs
    wall = time.perf_counter() - started
    manifest = BaselineManifest(
        study=study.name,
        created_at=now_iso(),
        inputs=done.inputs,
        model=asdict(done.identity),
        hardware=hardware(),
        libraries=library_versions(),
        kit=kit_info(),
        outputs=OutputsSummary(
            model=study.baseline.name,
            path=str(done.store.root.relative_to(out)),
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
        timings={"wall_s": round(wall, 3), **done.forced},
    )
    atomic_write_text(out / MANIFEST, manifest.model_dump_json(indent=2))
    (out / PENDING).unlink(missing_ok=True)
    return manifest


@dataclass(frozen=True)
class _BaselineRun:
    """What running the baseline produced (clean and perturbed items)."""

    inputs: FrozenInputs
    identity: Any
    items: list
    plan: RunPlan
    perturbed: PerturbedSet | None
    store: OutputStore
    outputs: pd.DataFrame
    forced: dict[str, Any]


def _run_baseline(
    study: Study,
    eval_set: EvalSet,
    builder: PromptBuilder,
    inputs: FrozenInputs,
    runtime: Runtime,
    out: Path,
    *,
    progress: bool,
) -> _BaselineRun:
    """Build the perturbed items, write the frozen copies, run the baseline on every item
    and teacher-force its answers (token distributions)."""
    identity = runtime.identity()
    perturbed = study_perturbed(study, builder=builder, count=prompt_counter(runtime))
    if perturbed is not None:
        inputs = inputs.model_copy(
            update={"perturbed_sha256": perturbed.sha256, "perturbed_rows": len(perturbed)}
        )
    items = [*eval_set.items, *(perturbed.items.items if perturbed is not None else [])]
    everything = EvalSet(source=eval_set.source, items=items, slice_columns=[])
    plan = RunPlan.build(
        model_name=study.baseline.name,
        items=items,
        builder=builder,
        runtime=runtime,
        sampling=study.sampling,
        repeats=study.repeats,
        schemas=plan_schemas(everything, study.structured_tasks, string_limits=study.string_limits),
    )
    plan.structured_output = study.baseline.structured_output
    plan.max_new_tokens = study.task_token_limits
    _write_frozen_copies(out, study, eval_set, builder, inputs, plan)
    if perturbed is not None:
        _write_perturbed(out, study, eval_set, perturbed, plan)
    store = OutputStore(out / "outputs" / study.baseline.name)
    outputs = run_model(
        runtime, plan, store, score_choices=study.baseline.score_choices, progress=progress
    )
    forced = baseline_distributions(
        runtime,
        prompts=plan.prompts,
        outputs=outputs,
        ids=set(eval_set.item_hashes),
        run_dir=out,
        model=study.baseline.name,
        top_k=study.distributions.top_k,
        enabled=study.distributions.enabled,
        progress=progress,
    )
    return _BaselineRun(inputs, identity, items, plan, perturbed, store, outputs, forced)


def _score_baseline(
    out: Path, eval_set: EvalSet, done: _BaselineRun, *, choice_answer: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Score the baseline's outputs (perturbed items too, so that their references are
    checked), write the clean items' outcomes and scores, return the scores."""
    scored_set = (
        eval_set
        if done.perturbed is None
        else EvalSet(str(out), done.items, slice_columns=eval_set.slice_columns)
    )
    outcomes = scoring.score_outputs(
        scored_set,
        done.outputs,
        continuations=done.plan.continuations,
        choice_answer=choice_answer,
    )
    outcomes = outcomes[outcomes["item_id"].isin(eval_set.item_hashes)]
    scores = scoring.overall(outcomes)
    tables = out / "tables"
    tables.mkdir(exist_ok=True)
    outcomes.to_parquet(tables / "baseline_outcomes.parquet", index=False)
    scores.to_csv(tables / "baseline_scores.csv", index=False)
    return scores


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
        rare_labels=study.eval_set.rare_labels,
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
                        "json_schema": plan.schemas.get(item_id),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def _write_perturbed(
    out: Path, study: Study, eval_set: EvalSet, perturbed: PerturbedSet, plan: RunPlan
) -> None:
    """``frozen/perturbed.jsonl`` (canonical derived items), their hashes, their slices (the
    source's label rarity; their own prompt length) and ``perturbations.json``."""
    frozen = out / "frozen"
    perturbed.items.to_jsonl(frozen / PERTURBED)
    atomic_write_json(frozen / PERTURBED_HASHES, perturbed.items.item_hashes)
    slices = derive_slices(
        perturbed.items,
        prompt_tokens=plan.prompt_tokens,
        rare_label_threshold=study.eval_set.rare_label_threshold,
        rare_labels=study.eval_set.rare_labels,
        length_edges=study.eval_set.length_buckets,
    )
    clean = derive_slices(
        eval_set,
        prompt_tokens=plan.prompt_tokens,
        rare_label_threshold=study.eval_set.rare_label_threshold,
        rare_labels=study.eval_set.rare_labels,
        length_edges=study.eval_set.length_buckets,
    ).set_index("id")["label_rarity"]
    source = perturbed.frame.set_index("id")["source_id"]
    slices["label_rarity"] = slices["id"].map(source).map(clean)
    slices.to_parquet(frozen / PERTURBED_SLICES, index=False)
    atomic_write_json(
        frozen / PERTURBATIONS_RECORD,
        perturbed.record(study.perturbations.model_dump(mode="json")),
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
    _check_perturbed(run_dir, m, study, add)
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


def _check_perturbed(run_dir: Path, m: BaselineManifest, study: Study, add) -> None:
    """The perturbation suite and its derived items, rebuilt from the study as it is now
    (padding with the sizes chosen at freeze time)."""
    current_config = study.perturbations.model_dump(mode="json") if study.perturbations else None
    if m.inputs.perturbations is None and current_config is None:
        return
    add(
        "perturbation suite",
        m.inputs.perturbations,
        current_config,
        "the study's perturbations: block changed since freezing",
    )
    if current_config is None or m.inputs.perturbed_sha256 is None:
        return
    record_path = run_dir / "frozen" / PERTURBATIONS_RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    try:
        builder = PromptBuilder(
            study.resolve(study.prompt.template),
            load_study_eval_set(study),
            chat=study.prompt.chat,
            system=study.prompt.system,
            choice_labels=study.prompt.choice_labels,
        )
        current = study_perturbed(study, builder=builder, padding=record.get("padding", {}))
    except CompkitError as exc:
        add("perturbed items", m.inputs.perturbed_sha256, None, f"cannot be rebuilt: {exc}")
        return
    frozen_hashes = json.loads((run_dir / "frozen" / PERTURBED_HASHES).read_text("utf-8"))
    detail = _id_changes(frozen_hashes, current.items.item_hashes if current else {})
    add("perturbed items", m.inputs.perturbed_sha256, current.sha256 if current else None, detail)


def _id_changes(frozen: dict[str, str], current: dict[str, str]) -> str:
    added = sorted(set(current) - set(frozen))
    removed = sorted(set(frozen) - set(current))
    edited = sorted(i for i in set(frozen) & set(current) if frozen[i] != current[i])
    return "; ".join(
        f"{len(ids)} {label}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
        for label, ids in (("changed", edited), ("added", added), ("removed", removed))
        if ids
    )


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
