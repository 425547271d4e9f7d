"""One handle on a run folder: its manifest, frozen inputs, stored outputs and tables.

Every stage after the freeze takes a :class:`Run` (or a path, opened with :meth:`Run.open`)
instead of a ``run_dir`` that each function re-reads: the manifest, the frozen items and
prompts and the slices are read once and kept.

Clean and perturbed items
-------------------------
A study with a perturbation suite freezes derived items next to the eval set
(``frozen/perturbed.jsonl``). Every model runs them and stage 2 scores them with the rest, but
every stage except the robustness stage is about the eval set the user gave: :meth:`Run.outputs`
and :meth:`Run.outcomes` return the clean items unless asked for ``items="perturbed"`` or
``"all"``; :attr:`Run.eval_set` is the clean eval set and :attr:`Run.scoring_set` the two together.

Run folder::

    runs/NAME/
      manifest.json            BaselineManifest (written last by the freeze: "frozen")
      pending.json             while a freeze runs or after it was interrupted
      frozen/                  study.yaml, prompt.jinja, eval_set.jsonl, item_hashes.json,
                               budget.yaml, slices.parquet, prompts.jsonl; with a perturbation
                               suite also perturbed.jsonl, perturbed_hashes.json,
                               perturbed_slices.parquet, perturbations.json (kit.perturb)
      outputs/<model>/         crash-safe parquet parts per model (kit.store), _COMPLETE.json
      distributions/<model>/   teacher-forced token distributions (kit.teacher_forcing)
      candidates/<name>.json   CandidateManifest
      outcomes.parquet         every model's scored outcomes, written once by stage 2
      tables/                  stage tables (slice_table, flips, calibration_..., verdicts)
      notebooks/               executed stage notebooks (.ipynb and .html)
      pipeline.json, verdict.json, memo.html

Example
-------
>>> run = Run.open("runs/demo")                     # doctest: +SKIP
>>> run.baseline, run.candidates()                  # doctest: +SKIP
>>> run.outcomes().groupby("model")["correct"].mean()   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from kit.environment import Hardware, KitInfo
from kit.errors import CompkitError
from kit.evalset import EvalSet, load_frozen_items
from kit.runtimes.base import Prompt
from kit.store import OutputStore, atomic_write_bytes
from kit.study import SamplingConfig, Study

MANIFEST = "manifest.json"
PENDING = "pending.json"
OUTCOMES = "outcomes.parquet"
#: sha256 of every derived artifact kit wrote (outcomes, tables): what reads are checked against.
ARTIFACTS = "artifacts.json"
SCHEMA_VERSION = 1
#: Slice columns every frozen run derives (the others are the eval set's own).
DERIVED_SLICES = ("task", "language", "length_bucket", "label_rarity")
#: Frozen files of a perturbation suite (kit.perturb).
PERTURBED = "perturbed.jsonl"
PERTURBED_HASHES = "perturbed_hashes.json"
PERTURBED_SLICES = "perturbed_slices.parquet"
PERTURBATIONS_RECORD = "perturbations.json"
#: Which items :meth:`Run.outputs` / :meth:`Run.outcomes` return.
ITEM_SETS = ("clean", "perturbed", "all")


class FrozenInputs(BaseModel):
    """Everything that, if changed, makes a comparison with this baseline unfair."""

    model_config = ConfigDict(frozen=True)
    study_file: str
    study_sha256: str
    eval_set_path: str
    eval_set_sha256: str
    eval_set_rows: int
    eval_set_config: dict[str, Any]
    template_path: str
    template_sha256: str
    prompt: dict[str, Any]
    sampling: dict[str, Any]
    repeats: int
    baseline: dict[str, Any]
    baseline_fingerprint: str
    budget_path: str | None
    budget_sha256: str | None
    perturbations: dict[str, Any] | None = None
    perturbed_sha256: str | None = None
    perturbed_rows: int = 0

    def key(self) -> dict[str, Any]:
        """The parts a resumed freeze must share with the interrupted one."""
        return self.model_dump(
            exclude={
                "study_file",
                "study_sha256",
                "budget_path",
                "budget_sha256",
                "perturbed_sha256",
                "perturbed_rows",
            }
        )


class OutputsSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    model: str
    path: str
    rows: int
    items: int
    repeats: int
    errors: int


class BaselineManifest(BaseModel):
    """The typed contents of ``manifest.json``."""

    model_config = ConfigDict(frozen=True)
    schema_version: int = SCHEMA_VERSION
    kind: str = "compkit.baseline"
    study: str
    created_at: str
    inputs: FrozenInputs
    model: dict[str, Any]  # kit.runtimes.base.ModelIdentity as a dict
    hardware: Hardware
    libraries: dict[str, str | None]
    kit: KitInfo
    outputs: OutputsSummary
    slice_columns: list[str]
    scores: list[dict[str, Any]] = Field(description="tidy model/task/metric/value/n records")
    timings: dict[str, float]

    @classmethod
    def load(cls, run_dir: str | Path) -> BaselineManifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise CompkitError(
                f"{run_dir}: not a frozen run (no {MANIFEST}); run `compkit freeze` first"
            )
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CompkitError(f"{path}: unreadable manifest: {exc}") from exc

    def scores_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.scores)


class CandidateManifest(BaseModel):
    """The typed contents of ``candidates/<name>.json``."""

    model_config = ConfigDict(frozen=True)
    kind: str = "compkit.candidate"
    name: str
    spec: dict[str, Any]
    spec_fingerprint: str
    recipe: dict[str, Any] | None
    identity: dict[str, Any]
    footprint: dict[str, int | None]
    baseline: str
    rows: int
    items: int
    repeats: int
    errors: int
    started_at: str
    finished_at: str
    wall_s: float
    #: where it ran: ``{"engine": "local"}``, or the Ray settings, replicas and their nodes
    execution: dict[str, Any] | None = None
    distributions: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CandidateManifest:
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CompkitError(f"{path}: unreadable candidate manifest: {exc}") from exc


class Run:
    """A frozen run folder, opened once (see the module docstring for its layout).

    Use :meth:`open`; the manifest, frozen items, prompts and slices are read on first use
    and kept. The frozen eval set is checked against the manifest's hash when first read.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def open(cls, run: str | Path | Run) -> Run:
        """A :class:`Run` for a frozen folder (a Run is returned as is).

        Raises
        ------
        CompkitError
            When the folder is not frozen (no manifest) or the manifest is unreadable.
        """
        if isinstance(run, Run):
            return run
        out = cls(run)
        out.manifest  # noqa: B018  (fail now on a folder that is not frozen)
        return out

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # ------------------------------------------------------------------ frozen inputs

    @property
    def run_dir(self) -> Path:
        return self.root

    @functools.cached_property
    def manifest(self) -> BaselineManifest:
        return BaselineManifest.load(self.root)

    @property
    def baseline(self) -> str:
        """The baseline model's name."""
        return self.manifest.outputs.model

    @property
    def frozen_dir(self) -> Path:
        return self.root / "frozen"

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(**self.manifest.inputs.sampling)

    @functools.cached_property
    def eval_set(self) -> EvalSet:
        user = [c for c in self.manifest.slice_columns if c not in DERIVED_SLICES]
        items = load_frozen_items(self.frozen_dir / "eval_set.jsonl", slice_columns=user)
        if items.sha256 != self.manifest.inputs.eval_set_sha256:
            raise CompkitError(
                f"{self.frozen_dir / 'eval_set.jsonl'} does not match the manifest's eval-set "
                "hash; the run folder was edited by hand"
            )
        return items

    @functools.cached_property
    def perturbed(self) -> EvalSet | None:
        """The frozen derived items of the perturbation suite (None without a suite), checked
        against the manifest's hash."""
        sha = self.manifest.inputs.perturbed_sha256
        if sha is None:
            return None
        user = [c for c in self.manifest.slice_columns if c not in DERIVED_SLICES]
        path = self.frozen_dir / PERTURBED
        items = load_frozen_items(path, slice_columns=user)
        if items.sha256 != sha:
            raise CompkitError(
                f"{path} does not match the manifest's hash of the perturbed items; the run "
                "folder was edited by hand"
            )
        return items

    @functools.cached_property
    def scoring_set(self) -> EvalSet:
        """Every item the models ran: the eval set, then the perturbed items."""
        if self.perturbed is None:
            return self.eval_set
        return EvalSet(
            source=str(self.frozen_dir),
            items=[*self.eval_set.items, *self.perturbed.items],
            slice_columns=self.eval_set.slice_columns,
        )

    @functools.cache  # noqa: B019  (one Run per folder)
    def perturbations(self) -> pd.DataFrame:
        """One row per perturbed item: ``id, source_id, perturbation, kind, detail`` and its
        ``prompt_tokens``, ``length_bucket`` and the source's ``source_length_bucket``
        (empty without a suite)."""
        columns = ["id", "source_id", "perturbation", "kind", "detail"]
        path = self.frozen_dir / PERTURBATIONS_RECORD
        if self.perturbed is None or not path.is_file():
            return pd.DataFrame(columns=[*columns, "prompt_tokens", "length_bucket"])
        record = json.loads(path.read_text(encoding="utf-8"))
        frame = pd.DataFrame(record["items"], columns=columns)
        tokens = pd.read_parquet(self.frozen_dir / PERTURBED_SLICES)
        frame = frame.merge(tokens[["id", "prompt_tokens", "length_bucket"]], on="id", how="left")
        source = self.slices().set_index("id")["length_bucket"].rename("source_length_bucket")
        return frame.join(source, on="source_id")

    @functools.cache  # noqa: B019
    def perturbation_record(self) -> dict[str, Any]:
        """``frozen/perturbations.json``: the suite's config, items, skips and padding sizes."""
        path = self.frozen_dir / PERTURBATIONS_RECORD
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def item_ids(self, items: str = "clean") -> set[str]:
        """Ids of the clean items, the perturbed items, or all of them (:data:`ITEM_SETS`)."""
        if items not in ITEM_SETS:
            raise CompkitError(f"items={items!r} is not one of {list(ITEM_SETS)}")
        clean = set(self.eval_set.item_hashes)
        derived = set(self.perturbed.item_hashes) if self.perturbed is not None else set()
        return {"clean": clean, "perturbed": derived, "all": clean | derived}[items]

    def _select(self, frame: pd.DataFrame, items: str) -> pd.DataFrame:
        if items == "all" or (items == "clean" and self.perturbed is None) or frame.empty:
            self.item_ids(items)  # validates the name
            return frame
        keep = frame["item_id"].isin(self.item_ids(items))
        return frame[keep].reset_index(drop=True)

    @functools.cached_property
    def _prompts(
        self,
    ) -> tuple[dict[str, Prompt], dict[str, tuple[str, ...]], dict[str, dict[str, Any]]]:
        prompts: dict[str, Prompt] = {}
        conts: dict[str, tuple[str, ...]] = {}
        schemas: dict[str, dict[str, Any]] = {}
        with open(self.frozen_dir / "prompts.jsonl", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                msgs = tuple(rec["messages"]) if rec["messages"] is not None else None
                prompts[rec["id"]] = Prompt(messages=msgs, text=rec["text"])
                if rec.get("continuations"):
                    conts[rec["id"]] = tuple(rec["continuations"])
                if rec.get("json_schema"):
                    schemas[rec["id"]] = rec["json_schema"]
        return prompts, conts, schemas

    @property
    def prompts(self) -> dict[str, Prompt]:
        """Item id -> the rendered prompt every model must see."""
        return self._prompts[0]

    @property
    def continuations(self) -> dict[str, tuple[str, ...]]:
        """Item id -> the option texts scored by logprob (choice items)."""
        return self._prompts[1]

    @property
    def schemas(self) -> dict[str, dict[str, Any]]:
        """Item id -> the JSON schema decoding is constrained to (``structured_output:
        json_schema`` tasks; empty when the study asks for none)."""
        return self._prompts[2]

    @functools.cache  # noqa: B019  (one Run per folder; the frame is the folder's own)
    def slices(self) -> pd.DataFrame:
        """``frozen/slices.parquet``: ``id`` + derived and user slice columns."""
        return pd.read_parquet(self.frozen_dir / "slices.parquet")

    @functools.cached_property
    def study(self) -> Study:
        """The study as frozen (``frozen/study.yaml``); its paths are not resolved."""
        from kit.safeyaml import read_yaml

        path = self.frozen_dir / "study.yaml"
        try:
            return Study.model_validate(read_yaml(path, what="frozen study"))
        except ValueError as exc:
            raise CompkitError(f"{path}: unreadable frozen study: {exc}") from exc

    @property
    def confidence(self) -> float:
        """The level of every interval of this run (the study's ``confidence``)."""
        return self.study.confidence

    @property
    def frozen_budget(self) -> Path | None:
        """``frozen/budget.yaml`` when the run was frozen with a budget."""
        path = self.frozen_dir / "budget.yaml"
        return path if self.manifest.inputs.budget_sha256 is not None else None

    # ------------------------------------------------------------------ models and outputs

    def candidates(self) -> list[str]:
        """Candidates with stored outputs (``outputs/<name>/`` other than the baseline), sorted."""
        folder = self.root / "outputs"
        names = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
        return [n for n in names if n != self.baseline]

    def candidate_manifest(self, name: str) -> CandidateManifest | None:
        path = self.root / "candidates" / f"{name}.json"
        return CandidateManifest.load(path) if path.is_file() else None

    def store(self, model: str) -> OutputStore:
        return OutputStore(self.root / "outputs" / model)

    def outputs(self, models: list[str] | None = None, *, items: str = "clean") -> pd.DataFrame:
        """Stored output rows of ``models`` (default every model), in one frame: the clean
        items by default, or ``items="perturbed"`` / ``"all"`` (see the module docstring)."""
        folder = self.root / "outputs"
        names = (
            models
            if models is not None
            else sorted(d.name for d in folder.iterdir() if d.is_dir())
            if folder.is_dir()
            else []
        )
        frames = [self.store(m).read() for m in names]
        frames = [f for f in frames if not f.empty]
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return self._select(out, items)

    def distribution_models(self) -> list[str]:
        """Models with a finished token-distribution store (``distributions/<model>/``)."""
        folder = self.root / "distributions"
        if not folder.is_dir():
            return []
        return sorted(
            d.name for d in folder.iterdir() if d.is_dir() and (d / "_COMPLETE.json").is_file()
        )

    def distribution_meta(self, model: str) -> dict[str, Any]:
        """The completion record of a model's distribution store ({} when there is none)."""
        path = self.root / "distributions" / model / "_COMPLETE.json"
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def distributions(self, model: str) -> pd.DataFrame:
        """A model's teacher-forced token distributions (:mod:`kit.teacher_forcing`), verified
        against the store's completion record."""
        return OutputStore(self.root / "distributions" / model).read()

    def outcomes(self, *, items: str = "clean") -> pd.DataFrame:
        """``outcomes.parquet``: every model's scored outcomes, as stage 2 wrote them once; the
        clean items by default, or ``items="perturbed"`` / ``"all"``.

        Raises
        ------
        CompkitError
            When stage 2 has not written it yet, or it changed since (:meth:`read_artifact`).
        """
        if not (self.root / OUTCOMES).is_file():
            raise CompkitError(
                f"{self.root / OUTCOMES}: missing; stage 2 writes it "
                f"(`compkit candidates ... --out {self.root}`)"
            )
        return self._select(self.read_artifact(OUTCOMES), items)

    def write_outcomes(self, frame: pd.DataFrame) -> Path:
        """Write ``outcomes.parquet`` (stage 2 only; every other stage reads it)."""
        return self.write_artifact(OUTCOMES, frame)

    # ------------------------------------------------------------------ artifacts

    def artifacts(self) -> dict[str, dict[str, Any]]:
        """``artifacts.json``: relative path -> ``{sha256, rows, written_at}`` of each artifact."""
        path = self.root / ARTIFACTS
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CompkitError(f"{path}: unreadable artifact record: {exc}") from exc

    def write_artifact(self, relpath: str, frame: pd.DataFrame) -> Path:
        """Write a parquet artifact atomically and record its sha256 in ``artifacts.json``."""
        import hashlib

        from filelock import FileLock

        from kit.store import atomic_write_json, now_iso

        path = self.root / relpath
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = frame.to_parquet(index=False)
        with FileLock(str(self.root / f".{ARTIFACTS}.lock")):
            atomic_write_bytes(path, data)
            record = self.artifacts()
            record[relpath] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "rows": len(frame),
                "written_at": now_iso(),
            }
            atomic_write_json(self.root / ARTIFACTS, record)
        return path

    def read_artifact(self, relpath: str) -> pd.DataFrame:
        """Read a parquet artifact after checking it is the one kit wrote.

        Raises
        ------
        CompkitError
            When the file is not recorded in ``artifacts.json`` (not written by kit) or its
            sha256 differs (edited by hand): never read silently.
        """
        from kit.store import file_sha256

        path = self.root / relpath
        entry = self.artifacts().get(relpath)
        if entry is None:
            raise CompkitError(
                f"{path}: not recorded in {self.root / ARTIFACTS}, so not written by this run's "
                "stages; rerun the stage that writes it (`compkit run ... --force`)"
            )
        if file_sha256(path) != entry["sha256"]:
            raise CompkitError(
                f"{path}: changed since kit wrote it ({entry['written_at']}); refusing to read "
                "edited evidence. Rerun the stage that writes it (`compkit run ... --force`)"
            )
        return pd.read_parquet(path)

    # ------------------------------------------------------------------ tables

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def table_path(self, name: str) -> Path:
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def table(self, name: str) -> pd.DataFrame:
        """``tables/<name>.parquet``, checked against its recorded sha256 (:meth:`read_artifact`);
        a missing table names the stage to run."""
        path = self.table_path(name)
        if not path.is_file():
            raise CompkitError(f"{path}: missing; run the stage that writes it first")
        return self.read_artifact(f"tables/{name}.parquet")

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write ``tables/<name>.parquet`` atomically and record it; returns its path."""
        return self.write_artifact(f"tables/{name}.parquet", frame)
