"""The frozen budget: the copy verdicts use, and whether the budget file changed since.

A budget is frozen with the baseline (``frozen/budget.yaml``, its sha256 in the manifest);
verdicts always use that copy. :func:`budget_status` says whether the study's budget file was
edited afterwards (the memo and the CLI show the banner and the diff) and whether the frozen
copy itself still matches the manifest's hash.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from kit.budget.grammar import Budget, SliceVocabulary, load_budget
from kit.errors import CompkitError
from kit.run import Run


@dataclass(frozen=True)
class BudgetStatus:
    """Whether the budget file changed since it was frozen.

    ``changed`` is True when the current file differs from the frozen copy (or is gone);
    ``diff`` is a unified diff frozen -> current; ``message`` is the banner line.
    ``frozen_intact`` is False when the frozen copy no longer matches the hash recorded at
    freeze time (the run folder was edited by hand).
    """

    frozen_path: Path | None
    current_path: Path | None
    frozen_sha256: str | None
    current_sha256: str | None
    changed: bool
    diff: str
    message: str
    frozen_intact: bool = True


def _sha(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_budgets(frozen: str | Path, current: str | Path | None) -> BudgetStatus:
    """Compare a frozen budget copy with the budget file as it is now.

    Examples
    --------
    >>> compare_budgets("runs/x/frozen/budget.yaml", "data/demo/budget.yaml")   # doctest: +SKIP
    """
    frozen = Path(frozen)
    current = Path(current) if current is not None else None
    if not frozen.is_file():
        raise CompkitError(f"no frozen budget at {frozen}")
    f_sha, c_sha = _sha(frozen), _sha(current)
    if c_sha is None:
        message = (
            f"the budget file {current} no longer exists; verdicts use the frozen copy ({frozen})"
        )
        return BudgetStatus(frozen, current, f_sha, None, True, "", message)
    if f_sha == c_sha:
        message = f"budget unchanged since freezing (sha256 {f_sha[:12]})"  # type: ignore[index]
        return BudgetStatus(frozen, current, f_sha, c_sha, False, "", message)
    diff = "".join(
        difflib.unified_diff(
            frozen.read_text(encoding="utf-8").splitlines(True),
            current.read_text(encoding="utf-8").splitlines(True),  # type: ignore[union-attr]
            str(frozen),
            str(current),
        )
    )
    message = (
        f"the budget {current} was edited after freezing: verdicts use the frozen copy "
        f"({frozen}); re-freeze the baseline to judge with the edited rules"
    )
    return BudgetStatus(frozen, current, f_sha, c_sha, True, diff, message)


def budget_status(run: str | Path | Run) -> BudgetStatus:
    """:func:`compare_budgets` for a frozen run: ``frozen/budget.yaml`` vs the study's budget.

    The path and hash of the budget at freeze time come from the run's manifest.
    """
    run = Run.open(run)
    inputs = run.manifest.inputs
    frozen = run.frozen_dir / "budget.yaml"
    if inputs.budget_sha256 is None or not frozen.is_file():
        message = f"{run.root} was frozen without a budget; there are no rules to judge by"
        return BudgetStatus(None, None, None, None, False, "", message)
    current = Path(inputs.budget_path) if inputs.budget_path else None
    status = compare_budgets(frozen, current)
    if status.frozen_sha256 != inputs.budget_sha256:
        message = (
            f"{frozen} does not match the budget hash recorded at freeze time; the run folder "
            f"was edited by hand. {status.message}"
        )
        return replace(status, message=message, frozen_intact=False)
    return status


def load_frozen_budget(
    run: str | Path | Run, *, slices: SliceVocabulary | pd.DataFrame | None = None
) -> Budget:
    """The budget verdicts use: the run's frozen copy, checked against the manifest hash.

    ``slices`` defaults to the run's frozen slices (``frozen/slices.parquet``).

    Raises
    ------
    CompkitError
        When the run was frozen without a budget or its frozen copy was edited.
    """
    run = Run.open(run)
    status = budget_status(run)
    if status.frozen_path is None or not status.frozen_intact:
        raise CompkitError(status.message)
    return load_budget(
        status.frozen_path, slices=slices if slices is not None else run_vocabulary(run)
    )


def run_vocabulary(run: Run) -> dict[str, tuple[str, ...] | None]:
    """Slice values a frozen run's rules may name: its slices, and its perturbation names."""
    from kit.budget.grammar import PERTURBATION_SLICE, slice_vocabulary

    vocab: dict[str, tuple[str, ...] | None] = dict(slice_vocabulary(run.slices()))
    config = run.manifest.inputs.perturbations
    if config:
        vocab[PERTURBATION_SLICE] = tuple(s.get("name") or s["kind"] for s in config["suite"])
    return vocab
