"""Stage 7 compute: gather the stages' evidence, judge the frozen budget, write ``verdict.json``.

Every stage writes its evidence as a table of :data:`kit.analysis.compare.RESULT_COLUMNS`
rows under ``tables/``; which table holds which metric is declared once, in
:data:`kit.metrics.METRICS` (``table``). :func:`gather_evidence` reads the tables present;
a stage that has not run leaves its metrics out, so rules on them are ``not measured``,
never passed. Two tables giving the same model, metric and slice is an error: every number
has one source.

:func:`judge_run` evaluates the run's FROZEN budget copy for every candidate with stored
outputs, at the study's ``confidence``, and writes ``verdict.json`` (:class:`VerdictReport`:
decisions, verdict rows, the budget banner, the evidence files and their hashes, provenance)
and ``tables/verdicts.parquet``. The memo (:mod:`kit.report.memo`) and ``compkit gate`` only
read them. A run frozen without a budget is judged as an evidence report: no rules, no
decisions, and a report that says so.

Example
-------
>>> verdicts, decisions, status = judge_run("runs/demo")                 # doctest: +SKIP
>>> decisions[["candidate", "decision"]]                                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pandas as pd
from pydantic import BaseModel, ConfigDict

from kit.analysis.compare import RESULT_COLUMNS
from kit.budget.frozen import BudgetStatus, budget_status, load_frozen_budget
from kit.budget.judge import DECISION_COLUMNS, VERDICT_COLUMNS, decide, evaluate_rules
from kit.environment import KitInfo
from kit.errors import CompkitError
from kit.metrics import METRICS
from kit.run import Run

VERDICT_FILE = "verdict.json"
VERDICT_TABLE = "verdicts"
SCHEMA_VERSION = 2
Decision = Literal["accepted", "rejected", "inconclusive", "accepted with routing rule"]
#: The decision of a candidate that is not accepted alone but whose routed system (candidate
#: + router + fallback, stage 6) passes every rule: deploy it only with its routing rule.
ROUTED = "accepted with routing rule"
#: ``compkit gate`` exit code per decision (2 is a missing, unfinished or unjudgeable run).
GATE_EXIT_CODES: dict[str, int] = {
    "accepted": 0,
    "rejected": 1,
    "inconclusive": 3,
    ROUTED: 4,
}
#: Decision columns stage 6 adds (the routed system's name, decision and rule).
ROUTING_DECISION_COLUMNS = [
    "routed_system",
    "routed_decision",
    "routing_rule",
    "fallback_rate",
    "cost_saving",
    "routing_selection",
]
ROUTING_TABLE = "routing_evidence"
#: Columns of :func:`gather_evidence` (``source`` names the table).
EVIDENCE_COLUMNS = [*RESULT_COLUMNS, "source"]
_KEY = ["model", "metric", "slice", "slice_value"]
#: How rules combine, in the words the memo prints.
COMBINATION = (
    "A candidate is accepted only when every rule passes: an intersection-union test, so the "
    "chance of accepting a candidate that truly breaks any rule stays at most {tail}% "
    "without a correction for the number of rules. It is rejected when any rule fails; each "
    "rule's chance of failing a candidate that truly meets it is at most {tail}%."
)


# --------------------------------------------------------------------------- evidence


def evidence_tables() -> list[str]:
    """The evidence tables of every registered metric, in registry (pipeline) order."""
    return list(dict.fromkeys(spec.table for spec in METRICS.values()))


class EvidenceFile(BaseModel):
    """One evidence table as read for a verdict (``present=False``: its stage has not run)."""

    model_config = ConfigDict(frozen=True)
    table: str
    path: str
    present: bool
    rows: int = 0
    sha256: str | None = None


def _belongs(metric: str, table: str) -> bool:
    """Whether ``table`` is the source of ``metric``: its registered table, or, for the routed
    systems of stage 6 (their own model names), any metric of the registry."""
    return metric in METRICS and (METRICS[metric].table == table or table == ROUTING_TABLE)


def _read_evidence(run: Run) -> tuple[pd.DataFrame, list[EvidenceFile]]:
    frames, files = [], []
    for name in evidence_tables():
        path = run.table_path(name)
        if not path.is_file():
            files.append(EvidenceFile(table=name, path=str(path), present=False))
            continue
        frame = run.table(name)  # refuses a table changed since its stage wrote it
        frame = frame[frame["metric"].map(lambda m, t=name: _belongs(m, t))]
        files.append(
            EvidenceFile(
                table=name,
                path=str(path),
                present=True,
                rows=len(frame),
                sha256=run.artifacts()[f"tables/{name}.parquet"]["sha256"],
            )
        )
        if len(frame):
            frames.append(frame.reindex(columns=RESULT_COLUMNS).assign(source=name))
    if not frames:
        return pd.DataFrame(columns=EVIDENCE_COLUMNS), files
    evidence = pd.concat(frames, ignore_index=True)
    evidence["slice_value"] = evidence["slice_value"].astype(str)
    dup = evidence.duplicated(_KEY, keep=False)
    if dup.any():
        first = evidence[dup].iloc[0]
        raise CompkitError(
            f"{run.root}: {first['metric']} on {first['slice']}={first['slice_value']} for "
            f"{first['model']} comes from more than one table "
            f"({sorted(set(evidence.loc[dup, 'source']))}); every number needs one source"
        )
    return evidence, files


def gather_evidence(run: str | Path | Run) -> pd.DataFrame:
    """The long evidence frame the budget is judged on, from a run's stage tables.

    Returns
    -------
    DataFrame
        :data:`EVIDENCE_COLUMNS`; empty (with these columns) when no stage table exists yet.
    """
    return _read_evidence(Run.open(run))[0]


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
    """One rule judged for one candidate (:data:`kit.budget.judge.VERDICT_COLUMNS`)."""

    model_config = ConfigDict(frozen=True)
    candidate: str
    rule_id: str = ""
    rule: str
    why: str | None = None
    metric: str
    slice: str
    quantity: str = "value"
    op: str = "<="
    threshold: float | None = None
    unit: str = "share"
    observed: float | None = None
    baseline: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: float | None = None
    method: str | None = None
    confidence: float = 0.95
    verdict: Literal["pass", "fail", "inconclusive", "not measured"]
    reason: str
    n_needed: float | None = None


class DecisionRow(BaseModel):
    """One candidate's decision (:data:`kit.budget.judge.DECISION_COLUMNS`) and its rules."""

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
    routed_system: str | None = None
    routed_decision: str | None = None
    routing_rule: str | None = None
    fallback_rate: float | None = None
    cost_saving: float | None = None
    routing_selection: str | None = None


class BudgetBanner(BaseModel):
    """:class:`kit.budget.frozen.BudgetStatus` as stored: did the budget change after freezing?"""

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
    """The typed contents of ``verdict.json``.

    ``judged`` is False for a run frozen without a budget: an evidence report with no rules
    and no decisions, which ``compkit gate`` refuses to gate.
    """

    model_config = ConfigDict(frozen=True)
    schema_version: int = SCHEMA_VERSION
    kind: str = "compkit.verdict"
    run: str
    study: str
    baseline: str
    candidates: list[str]
    created_at: str
    confidence: float = 0.95
    judged: bool = True
    combination: str = ""
    decisions: list[DecisionRow]
    verdicts: list[VerdictRow]
    rules: list[RuleRow] = []
    budget: BudgetBanner
    evidence: list[EvidenceFile] = []
    hashes: dict[str, str | None] = {}
    kit: KitInfo | None = None
    evidence_sha256: dict[str, str] = {}
    seal: str = ""

    @classmethod
    def load(cls, run_dir: str | Path, *, verify: bool = True) -> VerdictReport:
        """Read ``run_dir/verdict.json``.

        With ``verify`` (default) the seal and every evidence file's sha256 are checked
        (:func:`kit.integrity.verify_verdict`): a verdict edited by hand, or evidence deleted,
        added or changed since, raises :class:`~kit.integrity.IntegrityError`.

        Raises
        ------
        CompkitError
            Missing or unreadable file; IntegrityError as above.
        """
        import json

        from kit.integrity import verify_verdict

        path = Path(run_dir) / VERDICT_FILE
        if not path.is_file():
            raise CompkitError(
                f"{run_dir}: no {VERDICT_FILE}; the run has not been judged yet "
                f"(run `compkit run STUDY --out {run_dir}` or notebook 07)"
            )
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            report = cls.model_validate(content)
        except ValueError as exc:
            raise CompkitError(f"{path}: unreadable verdict file: {exc}") from exc
        if verify:
            verify_verdict(Run(run_dir), content)
        return report

    def verdicts_frame(self) -> pd.DataFrame:
        """The verdict rows as :func:`kit.budget.judge.evaluate_rules` returned them."""
        frame = pd.DataFrame([r.model_dump() for r in self.verdicts], columns=VERDICT_COLUMNS)
        numeric = ["observed", "baseline", "threshold", "ci_low", "ci_high", "n", "n_needed"]
        frame[numeric] = frame[numeric].astype(float)
        return frame

    def decisions_frame(self) -> pd.DataFrame:
        """One row per candidate: :data:`kit.budget.judge.DECISION_COLUMNS`."""
        return pd.DataFrame([d.model_dump() for d in self.decisions]).reindex(
            columns=[*DECISION_COLUMNS, *ROUTING_DECISION_COLUMNS]
        )

    def decision(self, candidate: str | None = None) -> Decision:
        """The gate's decision: one candidate's, or over all candidates (:func:`gate_decision`)."""
        if not self.judged:
            raise CompkitError(
                f"{self.run} was frozen without a budget: the memo is an evidence report and "
                "there is no decision to gate; add `budget:` to the study and freeze a new run"
            )
        return gate_decision(self.decisions_frame(), candidate=candidate)


def gate_decision(decisions: pd.DataFrame, *, candidate: str | None = None) -> Decision:
    """The decision ``compkit gate`` reports.

    With ``candidate``: that candidate's decision. Without: ``accepted`` only when every
    candidate is accepted; ``accepted with routing rule`` when every candidate is accepted,
    alone or with its routing rule (stage 6); otherwise ``rejected`` when any candidate is
    rejected, else ``inconclusive``.

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
    if values <= {"accepted", ROUTED}:
        return ROUTED
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


def _hashes(run: Run) -> dict[str, str | None]:
    inputs = run.manifest.inputs
    return {
        "manifest.json": hashlib.sha256((run.root / "manifest.json").read_bytes()).hexdigest(),
        "eval_set": inputs.eval_set_sha256,
        "prompt_template": inputs.template_sha256,
        "study": inputs.study_sha256,
        "budget": inputs.budget_sha256,
        "baseline_weights": run.manifest.model.get("weights_sha256"),
    }


def build_report(
    run: str | Path | Run,
    *,
    verdicts: pd.DataFrame,
    decisions: pd.DataFrame,
    status: BudgetStatus,
    rules: pd.DataFrame | None = None,
    evidence: Sequence[EvidenceFile] = (),
    candidates: Sequence[str] | None = None,
) -> VerdictReport:
    """A :class:`VerdictReport` for a frozen run from verdict and decision frames.

    Provenance (kit version + git sha, manifest hashes, time) is filled in here.
    """
    from kit.environment import kit_info
    from kit.store import now_iso

    run = Run.open(run)
    tail = round((1 - run.confidence) / 2 * 100, 2)
    judged = status.frozen_path is not None
    return VerdictReport(
        run=str(run.root.resolve()),
        study=run.manifest.study,
        baseline=run.baseline,
        candidates=list(candidates or dict.fromkeys(decisions["candidate"])),
        created_at=now_iso(),
        confidence=run.confidence,
        judged=judged,
        combination=COMBINATION.format(tail=f"{tail:g}") if judged else "",
        decisions=_decision_rows(verdicts, decisions),
        verdicts=[VerdictRow(**r) for r in _records(verdicts[VERDICT_COLUMNS])],
        rules=[RuleRow(**r) for r in _records(rules)] if rules is not None else [],
        budget=BudgetBanner.from_status(status),
        evidence=list(evidence),
        hashes=_hashes(run),
        kit=kit_info(),
    )


class Judgement(NamedTuple):
    """What :func:`judge_run` returns (unpacks as ``verdicts, decisions, status``)."""

    verdicts: pd.DataFrame
    decisions: pd.DataFrame
    status: BudgetStatus


def judge_run(
    run: str | Path | Run,
    *,
    candidates: Sequence[str] | None = None,
    write: bool = True,
) -> Judgement:
    """Judge every candidate of a run against its frozen budget; write the verdict.

    Every interval (the stages' and the judge's) has the study's ``confidence``.

    Parameters
    ----------
    run
        A frozen run folder (or :class:`~kit.run.Run`) with candidate outputs (stage 2) and
        the stage tables of the measured rules.
    candidates
        Default: every candidate with stored outputs.
    write
        Write ``verdict.json`` (:class:`VerdictReport`) and ``tables/verdicts.parquet``
        (atomically).

    Returns
    -------
    Judgement
        ``(verdicts, decisions, status)``. A run frozen without a budget gives empty verdicts
        and decisions, and a report with ``judged=False``.

    Raises
    ------
    CompkitError
        Not a frozen run, frozen copy edited by hand, no candidate outputs, or evidence
        computed at another confidence level.
    """
    run = Run.open(run)
    status = budget_status(run)
    evidence, files = _read_evidence(run)
    names = list(candidates) if candidates is not None else _measured_candidates(run, evidence)
    if not names:
        raise CompkitError(
            f"{run.root}: no candidate to judge: no candidate outputs (stage 2) and no "
            "candidate in any stage's evidence"
        )
    if status.frozen_path is None:
        verdicts = pd.DataFrame(columns=VERDICT_COLUMNS)
        decisions, rules = pd.DataFrame(columns=DECISION_COLUMNS), None
    else:
        budget = load_frozen_budget(run)
        verdicts = evaluate_rules(
            budget, evidence=evidence, candidates=names, confidence=run.confidence
        )
        decisions, rules = fold_routed(decide(verdicts), _routing_rules(run)), budget.frame()
    if write:
        report = build_report(
            run,
            verdicts=verdicts,
            decisions=decisions,
            status=status,
            rules=rules,
            evidence=files,
            candidates=names,
        )
        run.write_table(VERDICT_TABLE, verdicts)
        write_report(run.root, report)
    return Judgement(verdicts, decisions, status)


def _routing_rules(run: Run) -> pd.DataFrame | None:
    """Stage 6's ``routing_rules`` table when it ran (candidate -> routed system and rule)."""
    return run.table("routing_rules") if run.has_table("routing_rules") else None


def fold_routed(decisions: pd.DataFrame, routing: pd.DataFrame | None) -> pd.DataFrame:
    """Fold each routed system's decision into its candidate's row.

    A candidate that is not accepted alone but whose routed system (``routing_rules``:
    ``candidate, system, rule, fallback_rate, cost_saving, selection_note``) is accepted is
    ``accepted with routing rule``; a candidate accepted alone stays ``accepted`` (it needs no
    router). The routed systems' own rows leave the decision list (their verdict rows stay);
    every candidate row gets :data:`ROUTING_DECISION_COLUMNS` (empty without stage 6).
    """
    out = decisions.copy()
    for column in ROUTING_DECISION_COLUMNS:
        out[column] = None
    if routing is None or routing.empty:
        return out
    by_system = out.set_index("candidate")["decision"].to_dict()
    rows = []
    for rec in out.to_dict("records"):
        if rec["candidate"] in set(routing["system"]):
            continue
        match = routing[routing["candidate"] == rec["candidate"]]
        if len(match):
            r = match.iloc[0]
            routed = by_system.get(r["system"])
            rec.update(
                routed_system=r["system"],
                routed_decision=routed,
                routing_rule=r["rule"],
                fallback_rate=float(r["fallback_rate"]),
                cost_saving=float(r["cost_saving"]),
                routing_selection=r["selection_note"],
            )
            if rec["decision"] != "accepted" and routed == "accepted":
                rec["reason"] = (
                    f"alone: {rec['decision']} ({rec['reason']}); with its router "
                    f"({r['system']}: {r['rule']}) every rule passes"
                )
                rec["decision"] = ROUTED
        rows.append(rec)
    return pd.DataFrame(rows, columns=out.columns)


def _measured_candidates(run: Run, evidence: pd.DataFrame) -> list[str]:
    """Candidates with stage-2 outputs, then any other candidate a stage measured (a model
    benchmarked only by the serving stage); a rule with no evidence for it is inconclusive."""
    names = list(run.candidates())
    if not evidence.empty:
        names += [m for m in evidence["model"].dropna().unique() if m != run.baseline]
    return list(dict.fromkeys(names))


def write_report(run_dir: str | Path, report: VerdictReport) -> Path:
    """Write ``verdict.json`` sealed: the digests of the evidence as it is now, and the seal.

    Call it last: every file written afterwards that the verdict rests on makes it stale.
    """
    import json

    from kit.integrity import evidence_digests, seal
    from kit.store import atomic_write_text

    run = Run(run_dir)
    content = report.model_copy(update={"evidence_sha256": evidence_digests(run), "seal": ""})
    payload = content.model_dump(mode="json")
    payload["seal"] = seal(payload)
    path = run.root / VERDICT_FILE
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return path
