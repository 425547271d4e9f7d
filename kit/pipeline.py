"""The whole product in one command: every stage notebook, in order, with papermill.

:func:`run_pipeline` executes the stage notebooks of :data:`STAGES` on a study and a run
folder (``compkit run STUDY --out runs/NAME``):

=====  ===============  ================================  =====================================
  #    stage            notebook                          does
=====  ===============  ================================  =====================================
  1    ``freeze``       ``01_freeze_baseline.ipynb``      freeze the baseline (verify if frozen)
  2    ``candidates``   ``02_run_candidates.ipynb``       run the candidates on the frozen inputs
  3    ``drilldown``    ``03_slice_drilldown.ipynb``      deltas, slices, flips, noise floor
  4    ``calibration``  ``04_calibration.ipynb``          confidence and calibration
  4b   ``robustness``   ``04b_robustness.ipynb``          perturbations, distributions, artifacts
  5    ``serving``      ``05_serving.ipynb``              latency, throughput, memory, cost (served
                                                          models only: those with ``serving:``)
  6    ``routing``      ``06_routing.ipynb``              small model + router + fallback, judged
                                                          on held-out items
  7    ``memo``         ``07_acceptance_memo.ipynb``      verdicts, ``verdict.json``, ``memo.html``
=====  ===============  ================================  =====================================

Each notebook runs with absolute paths as parameters, ``cwd`` = ``notebooks/`` and the
``python3`` kernel; the executed notebook and its HTML export are stored as
``runs/NAME/notebooks/<notebook>.ipynb`` / ``.html`` (also when a cell fails, for
inspection), and every stage's outcome is recorded in ``runs/NAME/pipeline.json``
(:class:`PipelineRecord`: stage, started/finished, the source notebook's sha256, the
parameters, the error).

Resume
------
A rerun skips a stage that is *up to date*: it finished, its source notebook and its
parameters are unchanged, and every earlier stage finished before it started. A stage
reruns when ``force``, when it is named in ``stages`` (those run, always), or when an
earlier stage reran in the same invocation. A skipped freeze stage is still verified
(:func:`kit.stages.freeze.ensure_frozen`: same study, no frozen input changed).

Failure
-------
A failing cell stops the pipeline with :class:`StageFailed` (a
:class:`~kit.errors.CompkitError`) naming the stage, the cell (its index in the executed
notebook and the first line of its source) and the exception; later stages do not run.

Until the freeze has created the run folder nothing may be written into it (a freeze
refuses a non-empty folder), so stage 1 of a new run executes into a sibling staging
folder ``.NAME.pipeline/`` whose files move into ``runs/NAME/notebooks/`` afterwards.

Example
-------
>>> result = run_pipeline("data/demo/study.yaml", "runs/demo")          # doctest: +SKIP
>>> result.ran, result.skipped                                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel

from kit.environment import KitInfo
from kit.errors import CompkitError
from kit.progress import ProgressRelay
from kit.resources import notebooks_dir, templates_dir

PIPELINE_FILE = "pipeline.json"
NOTEBOOKS_DIR = notebooks_dir()
#: nbconvert template (``templates/nbconvert/compkit``): JupyterLab's look without any
#: script loaded from the network; charts are inline SVG outputs.
EXPORT_TEMPLATE = "compkit"
KERNEL = "python3"
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class StageInputs:
    """What a stage's parameters are built from (absolute paths)."""

    study: Path
    run: Path


@dataclass(frozen=True)
class Stage:
    """One stage notebook of the pipeline and how to parameterise it.

    ``reads`` are the run-folder files (glob patterns) the stage's results depend on: when
    their content changes (a candidate rerun with ``--force`` rewrites outputs and outcomes),
    the stage is stale and reruns.
    """

    name: str
    notebook: str
    description: str
    parameters: Callable[[StageInputs], dict[str, Any]]
    needs_candidates: bool = False
    reads: tuple[str, ...] = ()

    @property
    def number(self) -> str:
        return self.notebook[:2]


def _run_only(inputs: StageInputs) -> dict[str, Any]:
    return {"run": str(inputs.run)}


def _quiet_run(inputs: StageInputs) -> dict[str, Any]:
    return {"run": str(inputs.run), "progress": False}


def _calibration(inputs: StageInputs) -> dict[str, Any]:
    """The study's ``calibration:`` settings become the notebook's parameters."""
    from kit.study import load_study

    cfg = load_study(inputs.study).calibration
    return {
        "run": str(inputs.run),
        "confidence_source": cfg.confidence,
        "n_bins": cfg.n_bins,
        "coverage": cfg.coverage,
        "target_accuracy": cfg.target_accuracy,
    }


def _serving(inputs: StageInputs) -> dict[str, Any]:
    """The run, and a hash of the study's serving settings (the study-level ``serving:`` and
    every model's ``serving:`` / ``cost:``): editing them makes the stage stale, and the
    stage itself re-measures only the models whose settings changed."""
    import json

    from kit.study import load_study

    study = load_study(inputs.study)
    settings = {
        "serving": study.serving.model_dump(mode="json"),
        "models": {
            m.name: [
                m.serving and m.serving.model_dump(mode="json"),
                m.cost and m.cost.model_dump(),
            ]
            for m in study.models
        },
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"run": str(inputs.run), "settings_sha256": digest}


def _routing(inputs: StageInputs) -> dict[str, Any]:
    """The run, the study (its ``routing:`` block is the router to build) and a hash of that
    block, so that editing it reruns the stage."""
    import json

    from kit.study import load_study

    routing = load_study(inputs.study).routing
    cfg = routing.model_dump(mode="json") if routing is not None else None
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    return {"run": str(inputs.run), "study": str(inputs.study), "settings_sha256": digest}


#: What the comparison stages read: the frozen inputs, every model's outputs and the outcomes.
_OUTPUTS = ("manifest.json", "frozen/*", "outputs/*/_COMPLETE.json", "outcomes.parquet")
#: The robustness stage also reads the teacher-forced token distributions.
_DISTRIBUTIONS = (*_OUTPUTS, "distributions/*/_COMPLETE.json")

#: The stages in execution order. Notebooks get ``progress=False``: tqdm bars inside an
#: executed notebook are noise, and a parameter that changes with ``--quiet`` would defeat
#: resume. Progress reaches the terminal through :mod:`kit.progress` instead (an
#: environment variable names the events file; see :class:`kit.progress.ProgressRelay`).
STAGES: tuple[Stage, ...] = (
    Stage(
        "freeze",
        "01_freeze_baseline.ipynb",
        "run the baseline and freeze it (verifies the run folder when it is frozen already)",
        lambda i: {"study": str(i.study), "out": str(i.run), "progress": False},
    ),
    Stage(
        "candidates",
        "02_run_candidates.ipynb",
        "run every candidate of the study on the frozen inputs",
        _quiet_run,
    ),
    Stage(
        "drilldown",
        "03_slice_drilldown.ipynb",
        "overall and per-slice deltas, flips, noise floor, worst slices, failing examples",
        _run_only,
        needs_candidates=True,
        reads=_OUTPUTS,
    ),
    Stage(
        "calibration",
        "04_calibration.ipynb",
        "confidence, calibration, selective prediction and abstention",
        _calibration,
        needs_candidates=True,
        reads=_OUTPUTS,
    ),
    Stage(
        "robustness",
        "04b_robustness.ipynb",
        "perturbation gaps, token-level KL and distribution shifts, numerical artifacts",
        _run_only,
        needs_candidates=True,
        reads=_DISTRIBUTIONS,
    ),
    Stage(
        "serving",
        "05_serving.ipynb",
        "deploy, load and measure the served models: latency, throughput, memory, cost",
        _serving,
        reads=("manifest.json", "frozen/*", "outputs/*/_COMPLETE.json"),
    ),
    Stage(
        "routing",
        "06_routing.ipynb",
        "small model + router + fallback: every threshold simulated, the rule chosen on a "
        "calibration split, the routed system's evidence on held-out items",
        _routing,
        needs_candidates=True,
        reads=(*_OUTPUTS, "serving/*/profiles/*.parquet"),
    ),
    Stage(
        "memo",
        "07_acceptance_memo.ipynb",
        "judge the frozen budget; write verdict.json and the HTML decision memo",
        _run_only,
        needs_candidates=True,
        reads=(*_OUTPUTS, "tables/*.parquet"),
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The registered stage called ``name``; an unknown name lists the valid ones."""
    for s in STAGES:
        if s.name == name:
            return s
    raise CompkitError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


# --------------------------------------------------------------------------- defaults


def study_path(study: str | Path = "") -> Path:
    """The study a stage notebook runs on: ``study``, or the built-in demo study when empty."""
    from kit.resources import demo_dir

    path = Path(study).expanduser() if str(study).strip() else demo_dir() / "study.yaml"
    if not path.is_file():
        raise CompkitError(f"study file {path} does not exist")
    return path.resolve()


def default_run_dir(study: str | Path = "") -> Path:
    """``runs/<study name>`` under the working directory, where ``compkit run`` users keep runs.

    When the working directory is the source tree's ``notebooks/`` folder (Jupyter opened a
    stage notebook from a checkout) the runs folder is the checkout's, as for ``compkit demo``.
    """
    import re

    from kit.resources import SOURCE_ROOT, is_source_notebooks
    from kit.study import load_study

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", load_study(study_path(study)).name).strip("-.")
    base = Path.cwd()
    if is_source_notebooks(base):
        base = SOURCE_ROOT
    return base / "runs" / (name or "study")


def stage_run_dir(*, study: str | Path = "", run: str | Path = "") -> Path:
    """The run folder a stage notebook works on: ``run``, else :func:`default_run_dir` of
    ``study`` (the demo study when both are empty)."""
    if str(run).strip():
        return Path(run).expanduser().resolve()
    return default_run_dir(study)


# --------------------------------------------------------------------------- record


class StageRecord(BaseModel):
    """One stage's last execution."""

    stage: str
    notebook: str
    status: Literal["running", "finished", "failed"]
    started_at: str
    finished_at: str | None = None
    wall_s: float | None = None
    notebook_sha256: str
    parameters: dict[str, Any]
    kit_version: str | None = None
    inputs_sha256: str | None = None
    executed_notebook: str | None = None
    html: str | None = None
    error: str | None = None


class PipelineRecord(BaseModel):
    """The typed contents of ``pipeline.json``."""

    schema_version: int = SCHEMA_VERSION
    kind: str = "compkit.pipeline"
    study: str
    run: str
    stages: dict[str, StageRecord] = {}
    kit: KitInfo | None = None
    updated_at: str = ""

    @classmethod
    def load(cls, run_dir: str | Path) -> PipelineRecord | None:
        """``run_dir/pipeline.json``, or None when the run was never piped."""
        path = Path(run_dir) / PIPELINE_FILE
        if not path.is_file():
            return None
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CompkitError(f"{path}: unreadable pipeline record: {exc}") from exc

    def frame(self) -> pd.DataFrame:
        """One row per recorded stage, in pipeline order, with ``up_to_date``."""
        rows = []
        for s in STAGES:
            rec = self.stages.get(s.name)
            if rec is not None:
                rows.append(
                    {
                        **rec.model_dump(exclude={"parameters"}),
                        "up_to_date": _fresh(self, s.name),
                    }
                )
        return pd.DataFrame(rows)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fresh(record: PipelineRecord, name: str) -> bool:
    """Finished, and no earlier stage finished after it started."""
    rec = record.stages.get(name)
    if rec is None or rec.status != "finished":
        return False
    for s in STAGES[: STAGE_NAMES.index(name)]:
        before = record.stages.get(s.name)
        if before is None:
            continue
        if before.status != "finished" or (before.finished_at or "") > rec.started_at:
            return False
    return True


def _inputs_sha256(out: Path, s: Stage) -> str | None:
    """Digest of the files ``s`` reads (None for a stage that reads nothing of the run)."""
    if not s.reads or not _is_run_folder(out):
        return None
    from kit.store import file_sha256

    files = sorted({p for pattern in s.reads for p in out.glob(pattern) if p.is_file()})
    files = [p for p in files if p.relative_to(out).as_posix() != "tables/verdicts.parquet"]
    listing = "\n".join(f"{p.relative_to(out).as_posix()} {file_sha256(p)}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _up_to_date(
    record: PipelineRecord, s: Stage, params: dict[str, Any], sha: str, out: Path
) -> bool:
    """Finished, fresh, same notebook, parameters and kit version, and the files it read
    unchanged."""
    from kit import __version__

    rec = record.stages.get(s.name)
    return (
        rec is not None
        and _fresh(record, s.name)
        and rec.notebook_sha256 == sha
        and rec.parameters == params
        and rec.kit_version == __version__
        and rec.inputs_sha256 == _inputs_sha256(out, s)
    )


def unfinished_reason(run_dir: str | Path) -> str | None:
    """Why a piped run's verdict cannot be trusted yet, or None.

    None when the run has no ``pipeline.json`` (judged outside the pipeline) or its memo
    stage finished after every earlier stage; otherwise the failed, running or stale stage.
    """
    record = PipelineRecord.load(run_dir)
    if record is None:
        return None
    for s in STAGES:
        rec = record.stages.get(s.name)
        if rec is not None and rec.status != "finished":
            return f"stage {s.name!r} {rec.status}" + (f": {rec.error}" if rec.error else "")
    if "memo" not in record.stages:
        return "the memo stage has not run"
    if not _fresh(record, "memo"):
        return "an earlier stage reran after the verdict was written; rerun `compkit run`"
    return None


# --------------------------------------------------------------------------- failure


class StageFailed(CompkitError):
    """A stage notebook raised: names the kit call that failed, where in kit, and the error.

    ``call`` is the kit function the failing cell called (the outermost kit frame of the
    traceback: ``kit.stages.candidates.run_candidates``) and ``origin`` the innermost
    (``kit/runtimes/predictions.py:254 in expect_ids``): where the input at fault was found.
    ``cell_index`` is the cell's 0-based index in the stage's source notebook, ``exec_count``
    its ``In [n]`` in the executed copy (kept for the record, printed last).

    Exit code 1 when the cause is a changed frozen input (as ``compkit check``), else 2.
    """

    def __init__(
        self,
        stage_name: str,
        notebook: str,
        *,
        cell_index: int | None,
        cell_source: str,
        ename: str,
        evalue: str,
        executed: Path | None,
        exec_count: int | None = None,
        traceback: Sequence[str] = (),
    ):
        self.stage = stage_name
        self.notebook = notebook
        self.cell_index = cell_index
        self.cell_source = cell_source
        self.exec_count = exec_count
        self.ename = ename
        self.evalue = evalue
        self.executed = executed
        frames = _kit_frames(traceback)
        self.call = (
            f"{frames[0][0].removesuffix('.py').replace('/', '.')}.{frames[0][2]}"
            if frames
            else _kit_call(cell_source)
        )
        self.origin = f"{frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else None
        where = f"in {self.call}" if self.call else "before any kit call"
        if self.origin:
            where += f" ({self.origin})"
        cell = (
            f"\nnotebook cell {cell_index}"
            + (f" (In [{exec_count}])" if exec_count is not None else "")
            if cell_index is not None
            else ""
        )
        saved = (
            f"; the partially executed notebook is saved at {executed} "
            f"(and {executed.with_suffix('.html')})"
            if executed is not None and executed.exists()
            else ""
        )
        super().__init__(f"stage {stage_name!r} failed {where}: {ename}: {evalue}{cell}{saved}")
        if ename == "FrozenInputsChanged":
            self.exit_code = 1

    @property
    def summary(self) -> str:
        return f"{self.ename}: {self.evalue}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = re.compile(r"File (?:\S*/)?(kit/[\w/]+\.py):(\d+), in (\w+)")
_CALL = re.compile(r"^(?:\w+\s*(?:,\s*\w+)*\s*=\s*)?(\w+)\(", re.MULTILINE)
_IMPORT = re.compile(r"^from (kit[\w.]*) import (.+)$", re.MULTILINE)


def _kit_call(source: str) -> str | None:
    """The kit function a cell calls (``kit.stages.candidates.run_candidates``)."""
    imported = {
        name.strip(): module
        for module, names in _IMPORT.findall(source)
        for name in names.strip("()").split(",")
    }
    for name in _CALL.findall(source):
        if name in imported:
            return f"{imported[name]}.{name}"
    return None


def _kit_frames(traceback: Sequence[str]) -> list[tuple[str, str, str]]:
    """The kit frames of a kernel traceback, outermost first: ``(kit/x.py, line, function)``.

    The outermost is the kit function the cell called, the innermost where it failed."""
    return _FRAME.findall(_ANSI.sub("", "\n".join(traceback)))


# --------------------------------------------------------------------------- execution


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did: stages run and skipped, and the record."""

    run_dir: Path
    record: PipelineRecord
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def memo(self) -> Path:
        return self.run_dir / "memo.html"


def _is_run_folder(out: Path) -> bool:
    return (out / "manifest.json").exists() or (out / "pending.json").exists()


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.pipeline"


def _save(record: PipelineRecord, out: Path) -> None:
    from kit.store import atomic_write_text

    if _is_run_folder(out):
        record.updated_at = _now()
        atomic_write_text(out / PIPELINE_FILE, record.model_dump_json(indent=2) + "\n")


def export_html(notebook: str | Path) -> Path:
    """Write ``notebook``'s HTML export next to it (``.html``) and return its path.

    The export opens offline: compkit's nbconvert template loads no script (no require.js,
    MathJax, mermaid or widget manager from a CDN) and leaves widget views and widget state
    out. Charts are the SVG outputs of :mod:`kit.report.charts.display`; ``text/html``
    outputs are kit's (Jinja2 autoescape) and pandas' (escaped) tables. nbconvert's
    ``sanitize_html`` is off: it escapes ``<style>`` and ``<tbody>`` and would break them.
    """
    import nbformat
    from nbconvert import HTMLExporter

    from kit.store import atomic_write_text

    notebook = Path(notebook)
    node = nbformat.read(notebook, as_version=4)
    node.metadata.pop("widgets", None)
    exporter = HTMLExporter(
        extra_template_basedirs=[str(templates_dir() / "nbconvert")],
        template_name=EXPORT_TEMPLATE,
        exclude_input=False,
    )
    body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": notebook.stem}})
    html = notebook.with_suffix(".html")
    atomic_write_text(html, body)
    return html


def _relocate(files: list[Path], out: Path) -> list[Path]:
    """Move staged files into ``out/notebooks`` once ``out`` is a run folder."""
    if not _is_run_folder(out):
        return files
    target = out / "notebooks"
    target.mkdir(exist_ok=True)
    moved = []
    for f in files:
        if f.exists() and f.parent != target:
            dest = target / f.name
            shutil.move(str(f), dest)
            moved.append(dest)
        else:
            moved.append(f)
    staging = _staging(out)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return moved


#: Kernel arguments that keep the kernel's own log lines (transport warnings, interrupts) off
#: the terminal; ``compkit run --verbose`` leaves them out.
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


def _execute(
    s: Stage, params: dict[str, Any], out: Path, *, progress: bool, verbose: bool = False
) -> tuple[Path, Any]:
    """Run one notebook; returns (executed notebook path, error or None)."""
    import papermill as pm

    folder = out / "notebooks" if _is_run_folder(out) else _staging(out)
    folder.mkdir(parents=True, exist_ok=True)
    executed = folder / s.notebook
    error: Any = None
    relay = ProgressRelay(f"  [{s.name}]") if progress else contextlib.nullcontext()
    with relay:
        try:
            pm.execute_notebook(
                str(NOTEBOOKS_DIR / s.notebook),
                str(executed),
                parameters=params,
                cwd=str(NOTEBOOKS_DIR),
                kernel_name=KERNEL,
                # papermill's cell bar only on a terminal: in a log its carriage returns
                # garble the relayed per-model lines
                progress_bar=progress and isinstance(relay, ProgressRelay) and relay.live,
                extra_arguments=[] if verbose else QUIET_KERNEL,
            )
        except Exception as exc:  # PapermillExecutionError and kernel/engine failures alike
            error = exc
    return executed, error


def _failure(s: Stage, error: Exception, executed: Path | None) -> StageFailed:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        return StageFailed(
            s.name,
            s.notebook,
            cell_index=_source_index(s, error.source or "", error.cell_index),
            cell_source=error.source or "",
            ename=error.ename,
            evalue=error.evalue,
            executed=executed,
            exec_count=error.exec_count,
            traceback=error.traceback or (),
        )
    return StageFailed(
        s.name,
        s.notebook,
        cell_index=None,
        cell_source="",
        ename=type(error).__name__,
        evalue=str(error),
        executed=executed,
    )


def _source_index(s: Stage, source: str, executed_index: int) -> int:
    """The failing cell's index in the source notebook (papermill counts its injected
    parameters cell)."""
    import nbformat

    cells = nbformat.read(NOTEBOOKS_DIR / s.notebook, as_version=4).cells
    matches = [i for i, c in enumerate(cells) if c.source == source]
    if not matches:
        return executed_index
    return min(matches, key=lambda i: abs(i - executed_index))


def _selected(stages: Sequence[str] | None) -> list[str]:
    if stages is None:
        return list(STAGE_NAMES)
    wanted = {stage(n).name for n in stages}
    return [n for n in STAGE_NAMES if n in wanted]


def _check_candidates(out: Path, s: Stage) -> None:
    from kit.run import Run

    if s.needs_candidates and _is_run_folder(out) and not Run.open(out).candidates():
        raise CompkitError(
            f"stage {s.name!r}: {out} has no candidate outputs; the study lists no "
            "candidates (or stage 'candidates' did not run): stages 3-7 compare candidates "
            "with the baseline"
        )


def run_pipeline(
    study: str | Path,
    out: str | Path,
    *,
    stages: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    parameters: Mapping[str, Mapping[str, Any]] | None = None,
    verbose: bool = False,
) -> PipelineResult:
    """Execute the stage notebooks in order with papermill, resuming finished stages.

    Parameters
    ----------
    study
        The study YAML.
    out
        The run folder (created by the freeze stage; verified when frozen already).
    stages
        Run only these stages (names of :data:`STAGES`), always executing them; default
        every stage, skipping those up to date (module docstring: Resume).
    force
        Execute every selected stage even when up to date.
    progress
        Print one line per stage and papermill's progress bar.
    parameters
        Extra notebook parameters per stage name, e.g. ``{"drilldown": {"n_resamples": 200}}``.
    verbose
        Let the kernels' own log lines (transport warnings) reach the terminal.

    Returns
    -------
    PipelineResult
        Stages run and skipped, and the :class:`PipelineRecord` written to
        ``out/pipeline.json``.

    Raises
    ------
    StageFailed
        A cell raised; the message names the stage, the cell and the exception.
    CompkitError
        Missing study, unknown stage, a run folder made from another study.
    """
    from kit.environment import kit_info

    study, out = Path(study).resolve(), Path(out).resolve()
    if not study.is_file():
        raise CompkitError(f"study file {study} does not exist")
    if out.exists() and not out.is_dir():
        raise CompkitError(f"--out {out} is a file; give a run folder (e.g. runs/NAME)")
    _preflight(study, out)
    extra = dict(parameters or {})
    for name in extra:
        stage(name)
    selected = _selected(stages)
    record = PipelineRecord.load(out) or PipelineRecord(study=str(study), run=str(out))
    if record.study != str(study):
        raise CompkitError(f"{out} was piped from study {record.study}, not {study}")
    record.kit = kit_info()
    result = PipelineResult(out, record)
    say = print if progress else (lambda *a, **k: None)
    reran = False
    for number, s in enumerate(STAGES, start=1):
        if s.name not in selected:
            continue
        params = {**s.parameters(StageInputs(study, out)), **extra.get(s.name, {})}
        sha = _sha256(NOTEBOOKS_DIR / s.notebook)
        if not (force or reran or stages is not None) and _up_to_date(record, s, params, sha, out):
            if s.name == "freeze":
                from kit.stages.freeze import ensure_frozen

                ensure_frozen(study, out, progress=False)  # verifies; never re-freezes
            say(f"[{number}/{len(STAGES)}] {s.name}: up to date (finished {_finished(record, s)})")
            result.skipped.append(s.name)
            continue
        _check_candidates(out, s)
        say(f"[{number}/{len(STAGES)}] {s.name}: running {s.notebook}")
        _run_stage(s, params, sha, out, record, progress=progress, verbose=verbose)
        result.ran.append(s.name)
        reran = True
    return result


def _preflight(study: Path, out: Path) -> None:
    """Before any stage writes: every input valid (:func:`kit.validate.validate_study`), and a
    frozen run folder's evidence exactly as kit wrote it (:func:`kit.integrity.verify_run`)."""
    from kit.integrity import verify_run
    from kit.run import MANIFEST, Run
    from kit.validate import validate_study

    validate_study(study)
    if (out / MANIFEST).is_file():
        verify_run(Run.open(out))


def _finished(record: PipelineRecord, s: Stage) -> str:
    rec = record.stages[s.name]
    return rec.finished_at or "?"


def _run_stage(
    s: Stage,
    params: dict[str, Any],
    sha: str,
    out: Path,
    record: PipelineRecord,
    *,
    progress: bool,
    verbose: bool = False,
) -> None:
    started, t0 = _now(), time.perf_counter()
    rec = StageRecord(
        stage=s.name,
        notebook=s.notebook,
        status="running",
        started_at=started,
        notebook_sha256=sha,
        parameters=params,
    )
    record.stages[s.name] = rec
    _save(record, out)
    executed, error = _execute(s, params, out, progress=progress, verbose=verbose)
    files = [executed]
    if executed.exists():
        try:
            files.append(export_html(executed))
        except Exception as exc:  # the export must not hide the stage's own outcome
            if error is None:
                error = exc
    executed, *_ = _relocate(files, out)
    rec.finished_at = _now()
    rec.wall_s = round(time.perf_counter() - t0, 3)
    if executed.exists():
        base = out if executed.is_relative_to(out) else executed.parent
        rec.executed_notebook = str(executed.relative_to(base))
        rec.html = str(executed.with_suffix(".html").relative_to(base))
    if error is None:
        from kit import __version__

        rec.status, rec.kit_version = "finished", __version__
        rec.inputs_sha256 = _inputs_sha256(out, s)
        _save(record, out)
        return
    failure = _failure(s, error, executed if executed.exists() else None)
    rec.status, rec.error = "failed", failure.summary
    _save(record, out)
    raise failure from error
