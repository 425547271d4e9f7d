"""Human review of generations: export a sheet, fill it in, import it as a scorer.

Reference similarity (chrF) misses what a reader sees at once: a fluent answer that says
the wrong thing, a terse one that is right. The review sheet puts the baseline's and a
candidate's outputs side by side for people to score.

Sheet (CSV, UTF-8, one row per item, in eval-set order)::

    item_id, input, reference, baseline_output, candidate_output,
    score_baseline, score_candidate, notes

The score columns are exported blank. A sidecar ``<sheet>.json`` next to the CSV records
the run, the baseline and candidate names, the reviewed repeat, the scale and provenance
(kit version, git sha, eval-set hash, time), so the filled sheet maps back to outcome rows.

Scales
------
``"0-5"`` (default)
    any number from 0 to 5 (a 6-point quality scale: 0 unusable ... 5 perfect; halves
    allowed); imported as ``human_score = score / 5``.
``"0-1"``
    any number from 0 to 1 (1/0 for acceptable/unacceptable, or a share); imported as is.

A blank cell means "not reviewed" and gives no score. Anything else that is not a number
on the scale is an error naming the CSV row (the header is row 1) and column.

Example
-------
>>> export_review_sheet("runs/demo", candidate="q4", path="review.csv")  # doctest: +SKIP
>>> sheet = import_review_sheet("review.csv")                            # doctest: +SKIP
>>> score_outputs(eval_set, outputs, sources=[review_scores(sheet)])    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kit.errors import CompkitError, Problem, ValidationError
from kit.evalset import EvalSet
from kit.metrics import METRICS, MetricSpec

REVIEW_COLUMNS = [
    "item_id",
    "input",
    "reference",
    "baseline_output",
    "candidate_output",
    "score_baseline",
    "score_candidate",
    "notes",
]
#: scale name -> (lowest, highest) score; human_score = score / highest.
SCALES: dict[str, tuple[float, float]] = {"0-5": (0.0, 5.0), "0-1": (0.0, 1.0)}
SHEET_COLUMNS = ["model", "item_id", "repeat", "role", "raw_score", "human_score", "notes"]
_ROLES = {"score_baseline": "baseline", "score_candidate": "candidate"}


def meta_path(path: str | Path) -> Path:
    """The sidecar of a review sheet: ``review.csv`` -> ``review.json``."""
    return Path(path).with_suffix(".json")


def export_review_sheet(
    run_dir: str | Path,
    *,
    candidate: str,
    path: str | Path,
    tasks: Sequence[str] = ("generation",),
    repeat: int = 0,
    scale: str = "0-5",
) -> Path:
    """Write a review sheet (CSV + ``.json`` sidecar) for the baseline vs ``candidate``.

    Parameters
    ----------
    run_dir
        A run folder with the baseline's and the candidate's stored outputs.
    candidate
        The candidate to review against the baseline.
    path
        Where to write the CSV; the sidecar goes to :func:`meta_path`.
    tasks
        Tasks whose items go on the sheet (default: generation).
    repeat
        Which repeat's outputs to show (the scores attach to that repeat's outcome rows).
    scale
        ``"0-5"`` or ``"0-1"`` (module docstring); recorded in the sidecar.

    Returns
    -------
    Path
        The CSV written. Outputs are written as plain text (no escaping); a failed request
        shows an empty output and its error in ``notes``.
    """
    from kit.environment import kit_info
    from kit.run import Run
    from kit.scoring.custom import default_reference
    from kit.store import OutputStore, atomic_write_json, atomic_write_text, now_iso

    _check_scale(scale)
    frozen = Run.open(run_dir)
    baseline = frozen.manifest.outputs.model
    outputs = {}
    for role, model in (("baseline", baseline), ("candidate", candidate)):
        folder = frozen.run_dir / "outputs" / model
        rows = OutputStore(folder).read() if folder.is_dir() else pd.DataFrame()
        if rows.empty:
            raise CompkitError(f"{folder}: no stored outputs for {role} {model!r}")
        outputs[role] = rows[rows["repeat"] == repeat].set_index("item_id")
    records = []
    for item in frozen.eval_set.items:
        if item.task not in tasks:
            continue
        row = {"item_id": item.id, "input": item.text, "reference": default_reference(item) or ""}
        notes = []
        for role in ("baseline", "candidate"):
            out = outputs[role].loc[item.id] if item.id in outputs[role].index else None
            row[f"{role}_output"] = "" if out is None else (out["output"] or "")
            if out is not None and isinstance(out["error"], str):
                notes.append(f"{role} request failed: {out['error']}")
        records.append(
            {**row, "score_baseline": "", "score_candidate": "", "notes": "; ".join(notes)}
        )
    if not records:
        raise CompkitError(f"{run_dir}: no items of task(s) {list(tasks)} to review")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, pd.DataFrame(records, columns=REVIEW_COLUMNS).to_csv(index=False))
    atomic_write_json(
        meta_path(path),
        {
            "kind": "compkit.review_sheet",
            "run": str(frozen.run_dir),
            "baseline": baseline,
            "candidate": candidate,
            "repeat": repeat,
            "scale": scale,
            "tasks": list(tasks),
            "items": len(records),
            "eval_set_sha256": frozen.eval_set.sha256,
            "kit": kit_info().model_dump(),
            "created_at": now_iso(),
        },
    )
    return path


def import_review_sheet(
    path: str | Path,
    *,
    scale: str | None = None,
    baseline: str | None = None,
    candidate: str | None = None,
) -> pd.DataFrame:
    """Read and validate a filled review sheet.

    Parameters
    ----------
    path
        The CSV (columns as exported; extra columns are ignored).
    scale, baseline, candidate
        Override the sidecar's values. Without a sidecar the scale defaults to ``"0-5"`` and
        the model names to the roles ``"baseline"`` / ``"candidate"``.

    Returns
    -------
    DataFrame
        ``model, item_id, repeat, role, raw_score, human_score, notes``: one row per scored
        cell (blank cells are left out), ``human_score`` on 0-1. ``attrs`` holds the
        sidecar's metadata and the scale used.

    Raises
    ------
    ValidationError
        Listing every bad cell with its row (header = row 1) and column, missing columns,
        blank or repeated item ids.
    """
    path = Path(path)
    if not path.is_file():
        raise CompkitError(f"review sheet {path}: no such file")
    meta = _read_meta(path)
    scale = scale or meta.get("scale", "0-5")
    low, high = _check_scale(scale)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompkitError(f"review sheet {path}: not a readable UTF-8 CSV ({exc})") from exc
    source = str(path)
    needed = ["item_id", "score_baseline", "score_candidate"]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        problems = [Problem(source, "column missing from the header", 1, c) for c in missing]
        raise ValidationError(f"review sheet {source}", problems)
    names = {
        "baseline": baseline or meta.get("baseline", "baseline"),
        "candidate": candidate or meta.get("candidate", "candidate"),
    }
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    rows = []
    notes = raw["notes"] if "notes" in raw.columns else pd.Series("", index=raw.index)
    for i, rec in raw.iterrows():
        row_no = int(i) + 2  # type: ignore[call-overload]
        item_id = rec["item_id"].strip()
        if not item_id:
            problems.append(Problem(source, "item_id is blank", row_no, "item_id"))
            continue
        if item_id in seen:
            problems.append(
                Problem(source, f"item {item_id!r} repeats row {seen[item_id]}", row_no, "item_id")
            )
            continue
        seen[item_id] = row_no
        for column, role in _ROLES.items():
            cell = rec[column].strip()
            if not cell:
                continue
            value = _number(cell)
            if value is None or not low <= value <= high:
                problems.append(
                    Problem(
                        source,
                        f"{cell!r} is not a score on the {scale} scale "
                        f"(a number from {low:g} to {high:g}, or blank)",
                        row_no,
                        column,
                    )
                )
                continue
            rows.append(
                (
                    names[role],
                    item_id,
                    int(meta.get("repeat", 0)),
                    role,
                    value,
                    value / high,
                    notes[i],
                )
            )
    if problems:
        raise ValidationError(f"review sheet {source}", problems)
    out = pd.DataFrame(rows, columns=SHEET_COLUMNS)
    out.attrs.update({**meta, "scale": scale, "source": source})
    return out


def _check_scale(scale: str) -> tuple[float, float]:
    if scale not in SCALES:
        raise CompkitError(f"review scale {scale!r} is not one of {list(SCALES)}")
    return SCALES[scale]


def _read_meta(path: Path) -> dict[str, Any]:
    meta = meta_path(path)
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CompkitError(f"review sheet sidecar {meta}: invalid JSON ({exc.msg})") from exc


def _number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True, eq=False)
class ReviewScores:
    """A :class:`kit.scoring.ScoreSource` of imported review scores (``human_score``)."""

    sheet: pd.DataFrame
    info: MetricSpec = METRICS["human_score"]

    def score(self, eval_set: EvalSet, outputs: pd.DataFrame) -> pd.DataFrame:
        """``model, item_id, repeat, human_score`` for the sheet's items.

        Raises
        ------
        CompkitError
            When the sheet names items that are not in the eval set.
        """
        known = {it.id for it in eval_set.items}
        unknown = sorted(set(self.sheet["item_id"]) - known)
        if unknown:
            raise CompkitError(
                f"review sheet {self.sheet.attrs.get('source', '')} names {len(unknown)} item(s) "
                f"not in the eval set, e.g. {unknown[:3]}"
            )
        return self.sheet[["model", "item_id", "repeat", "human_score"]]


def review_scores(sheet: pd.DataFrame) -> ReviewScores:
    """Wrap an imported sheet (:func:`import_review_sheet`) as a score source."""
    missing = [c for c in SHEET_COLUMNS if c not in sheet.columns]
    if missing:
        raise CompkitError(f"not an imported review sheet: lacks column(s) {missing}")
    return ReviewScores(sheet)
