"""Evidence you cannot silently change: what a verdict rests on, hashed and sealed.

A verdict rests on the frozen inputs (``manifest.json``, ``frozen/``), every model's stored
outputs (``outputs/<model>/`` parts and their completion markers) and token distributions
(``distributions/<model>/``), the candidate manifests,
the derived artifacts (``outcomes.parquet`` and the stage tables, recorded in
``artifacts.json``). :func:`evidence_digests` hashes all of them; ``verdict.json`` stores the
digests and a seal, the sha256 of the verdict's own content including those digests.

:func:`verify_verdict` (``compkit gate``, ``compkit check``) recomputes both: a file deleted,
added or edited after the verdict, or a verdict edited by hand, is refused naming the file.
:func:`verify_run` checks what can be checked without a verdict: every complete store against
its marker, and every recorded artifact against its sha256 (``compkit run``, ``compkit
check``). The seal detects edits; it is not a signature (anyone who can write the folder can
recompute a hash), which is why the digests are checked against the files themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kit.errors import CompkitError
from kit.run import ARTIFACTS, MANIFEST, Run
from kit.store import OutputStore, file_sha256

#: Folders and files of a run that a verdict rests on (relative patterns, globbed).
EVIDENCE_PATTERNS = (
    MANIFEST,
    ARTIFACTS,
    "frozen/*",
    "outputs/*/part-*.parquet",
    "outputs/*/_COMPLETE.json",
    "distributions/*/part-*.parquet",
    "distributions/*/_COMPLETE.json",
    "candidates/*.json",
    "outcomes.parquet",
    "tables/*.parquet",
)
#: Written with or after the verdict: never part of its evidence.
NOT_EVIDENCE = ("tables/verdicts.parquet",)


class IntegrityError(CompkitError):
    """Evidence changed (or a verdict was edited) after it was written; exit code 2."""

    def __init__(self, run: Path, problems: list[str], *, advice: str):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        super().__init__(f"{run}: evidence does not match its record\n{shown}{more}\n{advice}")


def evidence_digests(run: Run) -> dict[str, str]:
    """Relative path -> sha256 of every file a verdict of ``run`` rests on."""
    out: dict[str, str] = {}
    for pattern in EVIDENCE_PATTERNS:
        for path in sorted(run.root.glob(pattern)):
            rel = path.relative_to(run.root).as_posix()
            if path.is_file() and rel not in NOT_EVIDENCE:
                out[rel] = file_sha256(path)
    return out


def compare_digests(recorded: dict[str, str], current: dict[str, str], root: Path) -> list[str]:
    """What differs: files missing, files that appeared, files whose content changed."""
    problems = [f"{root / p}: deleted" for p in sorted(set(recorded) - set(current))]
    problems += [f"{root / p}: added" for p in sorted(set(current) - set(recorded))]
    problems += [
        f"{root / p}: changed"
        for p in sorted(set(recorded) & set(current))
        if recorded[p] != current[p]
    ]
    return problems


def seal(content: dict[str, Any]) -> str:
    """sha256 of a verdict's content (canonical JSON, the ``seal`` field left out)."""
    payload = {k: v for k, v in content.items() if k != "seal"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_run(run: Run) -> None:
    """Every complete store matches its marker and every recorded artifact its sha256.

    Raises
    ------
    IntegrityError
        Naming each store part or artifact that was deleted, added or changed.
    """
    problems: list[str] = []
    stores = [run.root / "outputs", run.root / "distributions"]
    folders = [f for s in stores if s.is_dir() for f in sorted(s.iterdir())]
    for folder in folders:
        if folder.is_dir():
            try:
                OutputStore(folder).verify()
            except CompkitError as exc:
                problems.append(str(exc).splitlines()[0])
                problems += [line.strip(" -") for line in str(exc).splitlines()[1:-1]]
    for rel, entry in run.artifacts().items():
        path = run.root / rel
        if not path.is_file():
            problems.append(f"{path}: deleted")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: changed since kit wrote it ({entry['written_at']})")
    if problems:
        raise IntegrityError(
            run.root,
            problems,
            advice="Rerun the affected model (`compkit candidates --force --only NAME`) or "
            "stage (`compkit run ... --force`); kit will not judge on changed evidence.",
        )


def verify_verdict(run: Run, content: dict[str, Any]) -> None:
    """The verdict is sealed and nothing it rests on changed since.

    ``content`` is ``verdict.json`` as parsed JSON.

    Raises
    ------
    IntegrityError
        A verdict without a seal or with a wrong one (edited by hand), or evidence deleted,
        added or changed since the verdict was written.
    """
    recorded = content.get("evidence_sha256")
    if not content.get("seal") or not isinstance(recorded, dict):
        raise IntegrityError(
            run.root,
            [f"{run.root / 'verdict.json'}: not sealed (written by an older kit or by hand)"],
            advice="Rerun stage 7 (`compkit run ... --stage memo`) to judge again.",
        )
    if seal(content) != content["seal"]:
        raise IntegrityError(
            run.root,
            [f"{run.root / 'verdict.json'}: its content does not match its seal (edited by hand)"],
            advice="Rerun stage 7 (`compkit run ... --stage memo`) to judge again.",
        )
    problems = compare_digests(recorded, evidence_digests(run), run.root)
    if problems:
        raise IntegrityError(
            run.root,
            problems,
            advice="The verdict no longer describes this run folder: rerun `compkit run` (a "
            "changed input re-judges; an edited one is refused).",
        )
