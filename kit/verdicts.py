"""Stage 7 compute: gather the stages' evidence, judge the frozen budget, write ``verdict.json``.

The budget rules (:mod:`kit.budget.grammar`) are judged on one long evidence frame built from the
tables the earlier stages wrote under ``runs/NAME/tables/``. Each source is registered in
:data:`EVIDENCE_SOURCES` with the stage that writes it; a table that is not there yet is
simply absent from the evidence, so rules on its metrics come out ``not measured``, never
passed.

===================  ==============================  ===================================
source               table                           rows
===================  ==============================  ===================================
``slices``           ``slice_table.parquet`` (3)     overall + per-slice deltas, paired CIs
``flips``            ``flips.parquet`` (3)           ``flip_rate`` with a Wilson CI
``calibration``      ``calibration_comparison`` (4)  ECE / Brier / abstention deltas
===================  ==============================  ===================================

:func:`judge_run` evaluates the run's FROZEN budget copy (:func:`kit.budget.grammar.load_frozen_budget`)
for every candidate with stored outputs and writes ``verdict.json`` (:class:`VerdictReport`:
decisions, verdict rows, budget banner, evidence files, provenance) and
``tables/verdicts.parquet``. The memo (:mod:`kit.report.memo`) and ``compkit gate`` only read them.

Example
-------
>>> verdicts, decisions, status = judge_run("runs/demo")                 # doctest: +SKIP
>>> decisions[["candidate", "decision"]]                                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pandas as pd
from pydantic import BaseModel, ConfigDict

from kit.budget.grammar import (
    DECISION_COLUMNS,
    EVIDENCE_OPTIONAL,
    EVIDENCE_REQUIRED,
    VERDICT_COLUMNS,
    BudgetStatus,
    budget_status,
    decide,
    evaluate_rules,
    flip_rate_evidence,
    load_frozen_budget,
    metric_spec,
)
from kit.environment import KitInfo
from kit.errors import CompkitError

VERDICT_FILE = "verdict.json"
VERDICT_TABLE = "tables/verdicts.parquet"
SCHEMA_VERSION = 1
Decision = Literal["accepted", "rejected", "inconclusive"]
#: ``compkit gate`` exit code per decision (2 is a missing or unfinished run).
GATE_EXIT_CODES: dict[str, int] = {"accepted": 0, "rejected": 1, "inconclusive": 3}
#: Columns of :func:`gather_evidence` (``source`` names the :data:`EVIDENCE_SOURCES` entry).
EVIDENCE_COLUMNS = [*EVIDENCE_REQUIRED, *EVIDENCE_OPTIONAL, "p_value", "source"]
_KEY = ["model", "metric", "slice", "slice_value"]


# --------------------------------------------------------------------------- evidence


def _as_is(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


def _flip_rates(flips: pd.DataFrame) -> pd.DataFrame:
    if flips.empty:
        return flips.iloc[0:0]
    metrics = list(dict.fromkeys(flips["metric"])) if "metric" in flips.columns else []
    if len(metrics) > 1:  # flip_rate is about the headline binary metric
        flips = flips[flips["metric"] == ("accuracy" if "accuracy" in metrics else metrics[0])]
    return flip_rate_evidence(flips)


@dataclass(frozen=True)
class EvidenceSource:
    """A table under ``tables/`` that supplies evidence rows, and the stage writing it."""

    name: str
    stage: str
    table: str
    description: str
    rows: Callable[[pd.DataFrame], pd.DataFrame] = _as_is


#: Evidence tables in priority order: when two give a row for the same model, metric and
#: slice, the earlier one wins. A later stage (serving, routing) adds its entry here.
EVIDENCE_SOURCES: tuple[EvidenceSource, ...] = (
    EvidenceSource(
        "slices",
        "drilldown",
        "slice_table.parquet",
        "overall and per-slice deltas with paired bootstrap CIs (kit.analysis.slices.slice_table)",
    ),
    EvidenceSource(
        "flips",
        "drilldown",
        "flips.parquet",
        "flip rate right->wrong + wrong->right with a Wilson CI (kit.budget.grammar.flip_rate_evidence)",
        _flip_rates,
    ),
    EvidenceSource(
        "calibration",
        "calibration",
        "calibration_comparison.parquet",
        "calibration and abstention deltas with paired bootstrap CIs",
    ),
)


class EvidenceFile(BaseModel):
    """One evidence table as read for a verdict (``present=False``: stage not run yet)."""

    model_config = ConfigDict(frozen=True)
    source: str
    stage: str
    path: str
    present: bool
    rows: int = 0
    sha256: str | None = None


def _read_evidence(run_dir: Path) -> tuple[pd.DataFrame, list[EvidenceFile]]:
    frames, files = [], []
    for src in EVIDENCE_SOURCES:
        path = run_dir / "tables" / src.table
        if not path.is_file():
            files.append(
                EvidenceFile(source=src.name, stage=src.stage, path=str(path), present=False)
            )
            continue
        data = path.read_bytes()
        rows = src.rows(pd.read_parquet(path))
        files.append(
            EvidenceFile(
                source=src.name,
                stage=src.stage,
                path=str(path),
                present=True,
                rows=len(rows),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        if len(rows):
            frames.append(rows.reindex(columns=EVIDENCE_COLUMNS).assign(source=src.name))
    if not frames:
        return pd.DataFrame(columns=EVIDENCE_COLUMNS), files
    evidence = pd.concat(frames, ignore_index=True)
    evidence["slice_value"] = evidence["slice_value"].astype(str)
    return evidence.drop_duplicates(_KEY, keep="first").reset_index(drop=True), files


def gather_evidence(run_dir: str | Path) -> pd.DataFrame:
    """The long evidence frame :func:`kit.budget.grammar.evaluate_rules` judges, from a run's tables.

    Reads every :data:`EVIDENCE_SOURCES` table present under ``run_dir/tables/``: the
    drill-down's slice table (overall + slice rows), its flip table (as ``flip_rate`` rows)
    and the calibration comparison. A stage that has not run leaves its metrics out, so
    rules on them are ``not measured``. Where two tables give the same model, metric and
    slice, the earlier source wins.

    Returns
    -------
    DataFrame
        :data:`EVIDENCE_COLUMNS`: ``model, slice, slice_value, metric, value,
        baseline_value, delta, ci_low, ci_high, n, value_ci_low, value_ci_high, p_value,
        source``; empty (with these columns) when no stage table exists yet.
    """
    return _read_evidence(Path(run_dir))[0]


# --------------------------------------------------------------------------- report


def _clean(value: Any) -> Any:
    """NaN / NA -> None, numpy scalars -> Python (for JSON)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict("records")]


class VerdictRow(BaseModel):
    """One rule judged for one candidate (:data:`kit.budget.grammar.VERDICT_COLUMNS`)."""

    model_config = ConfigDict(frozen=True)
    candidate: str
    rule: str
    metric: str
    slice: str
    observed: float | None = None
    baseline: float | None = None
    threshold: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: float | None = None
    verdict: Literal["pass", "fail", "inconclusive", "not measured"]
    reason: str
    n_needed: float | None = None
    rule_id: str = ""
    why: str | None = None
    quantity: str = "value"
    op: str = "<="
    unit: str = "share"


class DecisionRow(BaseModel):
    """One candidate's decision (:data:`kit.budget.grammar.DECISION_COLUMNS`) and the rules behind it."""

    model_config = ConfigDict(frozen=True)
    candidate: str
    decision: Decision
    n_rules: int
    n_pass: int
    n_fail: int
    n_inconclusive: int
    n_not_measured: int
    reason: str
    failing_rules: list[str] = []
    undecided_rules: list[str] = []


class BudgetBanner(BaseModel):
    """:class:`kit.budget.grammar.BudgetStatus` as stored: did the budget change after freezing?"""

    model_config = ConfigDict(frozen=True)
    frozen_path: str | None
    current_path: str | None
    frozen_sha256: str | None
    current_sha256: str | None
    changed: bool
    frozen_intact: bool = True
    diff: str = ""
    message: str = ""

    @classmethod
    def from_status(cls, status: BudgetStatus) -> BudgetBanner:
        return cls(
            frozen_path=str(status.frozen_path) if status.frozen_path else None,
            current_path=str(status.current_path) if status.current_path else None,
            frozen_sha256=status.frozen_sha256,
            current_sha256=status.current_sha256,
            changed=status.changed,
            frozen_intact=status.frozen_intact,
            diff=status.diff,
            message=status.message,
        )


class RuleRow(BaseModel):
    """A rule as written in the frozen budget and what it parsed to."""

    model_config = ConfigDict(frozen=True)
    rule_id: str
    rule: str
    why: str | None = None
    metric: str
    slice: str
    limit: str


class VerdictReport(BaseModel):
    """The typed contents of ``verdict.json``."""

    model_config = ConfigDict(frozen=True)
    schema_version: int = SCHEMA_VERSION
    kind: str = "compkit.verdict"
    run: str
    study: str
    baseline: str
    candidates: list[str]
    created_at: str
    confidence: float = 0.95
    decisions: list[DecisionRow]
    verdicts: list[VerdictRow]
    rules: list[RuleRow] = []
    budget: BudgetBanner
    evidence: list[EvidenceFile] = []
    hashes: dict[str, str | None] = {}
    kit: KitInfo | None = None

    @classmethod
    def load(cls, run_dir: str | Path) -> VerdictReport:
        """Read ``run_dir/verdict.json``; a missing or unreadable file is a CompkitError."""
        path = Path(run_dir) / VERDICT_FILE
        if not path.is_file():
            raise CompkitError(
                f"{run_dir}: no {VERDICT_FILE}; the run has not been judged yet "
                f"(run `compkit run STUDY --out {run_dir}` or notebook 07)"
            )
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CompkitError(f"{path}: unreadable verdict file: {exc}") from exc

    def verdicts_frame(self) -> pd.DataFrame:
        """The verdict rows as :func:`kit.budget.grammar.evaluate_rules` returned them."""
        frame = pd.DataFrame([r.model_dump() for r in self.verdicts], columns=VERDICT_COLUMNS)
        numeric = ["observed", "baseline", "threshold", "ci_low", "ci_high", "n", "n_needed"]
        frame[numeric] = frame[numeric].astype(float)
        return frame

    def decisions_frame(self) -> pd.DataFrame:
        """One row per candidate: :data:`kit.budget.grammar.DECISION_COLUMNS`."""
        return pd.DataFrame([d.model_dump() for d in self.decisions]).reindex(
            columns=DECISION_COLUMNS
        )

    def decision(self, candidate: str | None = None) -> Decision:
        """The gate's decision: one candidate's, or over all candidates (:func:`gate_decision`)."""
        return gate_decision(self.decisions_frame(), candidate=candidate)


def gate_decision(decisions: pd.DataFrame, *, candidate: str | None = None) -> Decision:
    """The decision ``compkit gate`` reports.

    With ``candidate``: that candidate's decision. Without: ``accepted`` only when every
    candidate is accepted; otherwise ``rejected`` when any candidate is rejected, else
    ``inconclusive``.

    Raises
    ------
    CompkitError
        Unknown candidate (listing the judged ones) or no candidate at all.
    """
    names = list(decisions["candidate"])
    if not names:
        raise CompkitError("the verdict has no candidates")
    if candidate is not None:
        if candidate not in names:
            raise CompkitError(f"candidate {candidate!r} was not judged; candidates: {names}")
        return decisions.set_index("candidate").loc[candidate, "decision"]
    values = set(decisions["decision"])
    if values == {"accepted"}:
        return "accepted"
    return "rejected" if "rejected" in values else "inconclusive"


def _decision_rows(verdicts: pd.DataFrame, decisions: pd.DataFrame) -> list[DecisionRow]:
    rows = []
    for rec in _records(decisions):
        mine = verdicts[verdicts["candidate"] == rec["candidate"]]
        rows.append(
            DecisionRow(
                **rec,
                failing_rules=mine.loc[mine["verdict"] == "fail", "rule"].tolist(),
                undecided_rules=mine.loc[
                    mine["verdict"].isin(["inconclusive", "not measured"]), "rule"
                ].tolist(),
            )
        )
    return rows


def _hashes(run_dir: Path, manifest: Any) -> dict[str, str | None]:
    return {
        "manifest.json": hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest(),
        "eval_set": manifest.inputs.eval_set_sha256,
        "prompt_template": manifest.inputs.template_sha256,
        "study": manifest.inputs.study_sha256,
        "budget": manifest.inputs.budget_sha256,
        "baseline_weights": manifest.model.get("weights_sha256"),
    }


def build_report(
    run_dir: str | Path,
    *,
    verdicts: pd.DataFrame,
    decisions: pd.DataFrame,
    status: BudgetStatus,
    rules: pd.DataFrame | None = None,
    evidence: Sequence[EvidenceFile] = (),
    confidence: float = 0.95,
) -> VerdictReport:
    """A :class:`VerdictReport` for a frozen run from verdict and decision frames.

    Provenance (kit version + git sha, manifest hashes, time) is filled in here.
    """
    from kit.environment import kit_info
    from kit.stages.freeze import BaselineManifest
    from kit.store import now_iso

    run_dir = Path(run_dir)
    manifest = BaselineManifest.load(run_dir)
    return VerdictReport(
        run=str(run_dir.resolve()),
        study=manifest.study,
        baseline=manifest.outputs.model,
        candidates=list(dict.fromkeys(decisions["candidate"])),
        created_at=now_iso(),
        confidence=confidence,
        decisions=_decision_rows(verdicts, decisions),
        verdicts=[VerdictRow(**r) for r in _records(verdicts[VERDICT_COLUMNS])],
        rules=[RuleRow(**r) for r in _records(rules)] if rules is not None else [],
        budget=BudgetBanner.from_status(status),
        evidence=list(evidence),
        hashes=_hashes(run_dir, manifest),
        kit=kit_info(),
    )


class Judgement(NamedTuple):
    """What :func:`judge_run` returns (unpacks as ``verdicts, decisions, status``)."""

    verdicts: pd.DataFrame
    decisions: pd.DataFrame
    status: BudgetStatus


def judged_candidates(run_dir: str | Path) -> list[str]:
    """Candidates with stored outputs (``outputs/<name>/`` other than the baseline)."""
    from kit.stages.drilldown import run_models

    return run_models(run_dir)[1]


def judge_run(
    run_dir: str | Path,
    *,
    candidates: Sequence[str] | None = None,
    confidence: float = 0.95,
    write: bool = True,
) -> Judgement:
    """Judge every candidate of a run against its frozen budget; write the verdict.

    Parameters
    ----------
    run_dir
        A frozen run folder with candidate outputs (stage 2) and, for measured rules, the
        drill-down (stage 3) and calibration (stage 4) tables.
    candidates
        Default: every candidate with stored outputs.
    confidence
        CI level of the intervals computed while judging (Wilson); the stage tables' CIs
        are 95% by default.
    write
        Write ``verdict.json`` (:class:`VerdictReport`) and ``tables/verdicts.parquet``
        (atomically).

    Returns
    -------
    Judgement
        ``(verdicts, decisions, status)``: the :func:`kit.budget.grammar.evaluate_rules` frame,
        the :func:`kit.budget.grammar.decide` frame and the :class:`kit.budget.grammar.BudgetStatus`
        (the budget always comes from the frozen copy; ``status.changed`` says whether
        the file was edited since).

    Raises
    ------
    CompkitError
        Not a frozen run, frozen without a budget, frozen copy edited by hand, or no
        candidate outputs.
    """
    from kit.store import atomic_write_bytes, atomic_write_text

    run_dir = Path(run_dir)
    status = budget_status(run_dir)
    if status.frozen_path is None:
        raise CompkitError(
            f"{status.message}; add `budget:` to the study and freeze into a new run folder"
        )
    budget = load_frozen_budget(run_dir)
    names = list(candidates) if candidates is not None else judged_candidates(run_dir)
    if not names:
        raise CompkitError(f"{run_dir}: no candidate outputs to judge (run stage 2 first)")
    evidence, files = _read_evidence(run_dir)
    verdicts = evaluate_rules(budget, evidence=evidence, candidates=names, confidence=confidence)
    decisions = decide(verdicts)
    if write:
        report = build_report(
            run_dir,
            verdicts=verdicts,
            decisions=decisions,
            status=status,
            rules=budget.frame(),
            evidence=files,
            confidence=confidence,
        )
        atomic_write_bytes(run_dir / VERDICT_TABLE, verdicts.to_parquet(index=False))
        atomic_write_text(run_dir / VERDICT_FILE, report.model_dump_json(indent=2) + "\n")
    return Judgement(verdicts, decisions, status)


# --------------------------------------------------------------------------- caveats

MDE_COLUMNS = [
    "candidate",
    "rule",
    "metric",
    "slice",
    "n",
    "tolerance",
    "discordant_rate",
    "mde",
    "underpowered",
    "message",
]


def _tolerance(row: Mapping[str, Any]) -> float:
    """The drop a change rule tolerates on the metric's 0-1 scale (NaN: not applicable)."""
    threshold = row["threshold"]
    if row["quantity"] == "change" and threshold is not None and abs(threshold) > 0:
        return abs(float(threshold))
    base = row.get("baseline")
    if row["quantity"] == "relative change" and base is not None and math.isfinite(base):
        return abs(float(threshold)) * abs(float(base)) or math.nan
    return math.nan


def sample_size_caveats(
    verdicts: pd.DataFrame,
    slice_rows: pd.DataFrame,
    *,
    flips: pd.DataFrame | None = None,
    discordant_rate: float = 0.1,
) -> pd.DataFrame:
    """Minimum detectable effect of every change rule on a share metric.

    For each verdict row whose rule bounds the change (points or relative) of a scoring
    metric, :func:`kit.analysis.compare.mde_warnings` on the evidence row of the rule's slice: the
    smallest drop the paired items can detect (alpha 0.05, power 0.8) against the drop the
    rule tolerates. ``underpowered`` rows are the memo's sample-size warnings.

    Parameters
    ----------
    verdicts
        :func:`kit.budget.grammar.evaluate_rules` rows.
    slice_rows
        :func:`kit.analysis.slices.slice_table` rows (``tables/slice_table.parquet``).
    flips
        :func:`kit.analysis.compare.flip_table` rows; their discordant rate replaces
        ``discordant_rate`` where available.

    Returns
    -------
    DataFrame
        :data:`MDE_COLUMNS`: ``candidate, rule, metric, slice, n, tolerance,
        discordant_rate, mde, underpowered, message`` (``mde`` is ``inf`` when no drop is
        detectable with ``n`` items).
    """
    from kit.analysis.compare import mde_warnings

    out = []
    for row in _records(verdicts):
        if row["quantity"] not in ("change", "relative change"):
            continue
        if metric_spec(row["metric"]).unit != "share" or row["metric"] == "flip_rate":
            continue
        tolerance = _tolerance(row)
        if not math.isfinite(tolerance):
            continue
        column, value = ("overall", "all")
        if row["slice"] != "overall":
            column, _, value = row["slice"].partition("=")
        metrics = [row["metric"], "accuracy"] if row["metric"] == "recall" else [row["metric"]]
        for metric in metrics:
            part = slice_rows[
                (slice_rows["model"] == row["candidate"])
                & (slice_rows["metric"] == metric)
                & (slice_rows["slice"] == column)
                & (slice_rows["slice_value"].astype(str) == value)
            ]
            if len(part):
                break
        if not len(part) or not (part["n"] >= 2).all():
            continue
        warn = mde_warnings(
            part,
            budgets={metric: tolerance},
            flips=flips,
            discordant_rate=discordant_rate,
        ).iloc[0]
        mde, n = float(warn["mde"]), int(warn["n"])
        detects = f"drops of {mde * 100:.1f} points or more" if math.isfinite(mde) else "no drop"
        out.append(
            {
                "candidate": row["candidate"],
                "rule": row["rule"],
                "metric": row["metric"],
                "slice": row["slice"],
                "n": n,
                "tolerance": tolerance,
                "discordant_rate": float(warn["discordant_rate"]),
                "mde": mde,
                "underpowered": bool(warn["underpowered"]),
                "message": (
                    f"{row['slice']}: n={n} detects {detects} (80% power); "
                    f"the rule tolerates {tolerance * 100:.1f} points"
                ),
            }
        )
    return pd.DataFrame(out, columns=MDE_COLUMNS)
