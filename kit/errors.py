"""Errors that name what was wrong and where.

Every error a user can cause (bad eval file, bad study, bad model path, unreachable
server) is a :class:`CompkitError`; the CLI prints its message and exits with code 2
instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class CompkitError(Exception):
    """A problem with the user's input or environment, with a readable message."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One validation problem: where it is and what is wrong."""

    source: str
    message: str
    row: int | None = None  # 1-based line (JSONL) or row (CSV/Parquet/datasets)
    field: str | None = None

    def __str__(self) -> str:
        where = self.source
        if self.row is not None:
            where += f", row {self.row}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class ValidationError(CompkitError):
    """Several problems found in one input; all are reported at once (up to a limit)."""

    max_shown = 25

    def __init__(self, what: str, problems: list[Problem]):
        self.what = what
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[: self.max_shown])
        more = len(problems) - self.max_shown
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{what}: {len(problems)} problem(s)\n{shown}{tail}")


class DependencyMissing(CompkitError):
    """An optional dependency is not installed; the message names the extra."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed. "
            f"Install it with: pip install 'compkit[{extra}]' (or run `make setup`)."
        )
