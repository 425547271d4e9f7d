"""Predictions runtime: outputs a candidate produced elsewhere, read from a JSONL file.

A user who ran the candidate on other hardware (a phone, a vendor API, a cluster) brings
one JSON object per line::

    {"id": "q1", "output": "Paris", "confidence": 0.93, "latency_s": 0.41}
    {"id": "q2", "output": "B", "choice_probs": [0.1, 0.7, 0.1, 0.1], "repeat": 0}

Fields: ``id`` (string, or an integer taken as its decimal string) and ``output`` (string;
may be absent or null only on rows with an ``error``) are required. Optional:
``confidence`` (0-1), ``choice_probs`` (one probability per option, 0-1), ``latency_s``,
``ttft_s`` (seconds, >= 0), ``prompt_tokens``, ``output_tokens`` (integers >= 0),
``finish_reason`` (string), ``repeat`` (integer >= 0, default 0), ``error`` (string) and
``error_class`` (one of :data:`~kit.runtimes.base.ERROR_CLASSES`, default
``runtime_error`` when ``error`` is set). Other keys are ignored, except near-misses of a
field name (``confidance``), which are reported as typos. The whole file is validated when
the runtime is opened; every problem is reported at once with its line number and field.

Which ids: :meth:`PredictionsRuntime.expect_ids` compares the file with the ids (and number
of repeats) a run will ask for, and reports the missing and the extra ids together;
:meth:`~PredictionsRuntime.generate` reports ids it is asked for that the file lacks.

Repeats: a request carries only its seed, which :func:`kit.runtimes.base.repeat_seed` derives
from the study seed (``sampling.seed``) and the repeat index. :meth:`generate` inverts that
(stateless, so resumed runs work): a request's repeat is the ``r`` whose seed equals the
request's. A seed that matches no repeat (a request made outside :mod:`kit.execute`) is read
as repeat 0 when the file holds a single repeat, and is an error otherwise.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.errors import CompkitError, Problem, ValidationError
from kit.runtimes.base import (
    ERROR_CLASSES,
    ChoiceRequest,
    ChoiceScores,
    Generation,
    GenerationRequest,
    ModelIdentity,
    Progress,
    Runtime,
    repeat_seed,
)
from kit.store import file_sha256
from kit.study import ModelSpec, SamplingConfig

FORMAT_VERSION = "predictions-file v1"
#: Ids shown in a missing/extra message before "... and N more".
SHOW_IDS = 20
#: Repeats searched when mapping a request seed back to its repeat (``Study.repeats`` <= 100).
MAX_REPEATS = 100

_FIELDS = (
    "id",
    "output",
    "confidence",
    "choice_probs",
    "latency_s",
    "ttft_s",
    "prompt_tokens",
    "output_tokens",
    "finish_reason",
    "repeat",
    "error",
    "error_class",
)


@dataclass(frozen=True)
class PredictionRow:
    """One validated line of a predictions file."""

    line: int
    id: str
    repeat: int
    output: str
    confidence: float | None = None
    choice_probs: tuple[float, ...] | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    error_class: str | None = None


@dataclass
class PredictedGeneration(Generation):
    """A :class:`Generation` that also carries the file's ``confidence`` (0-1)."""

    confidence: float | None = None


@dataclass
class _Checked:
    """Values of one row that passed validation, and its problems."""

    values: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


class PredictionsRuntime(Runtime):
    """Serve a predictions JSONL file through the :class:`~kit.runtimes.base.Runtime` interface.

    Parameters
    ----------
    spec
        ``spec.model`` is the JSONL path (relative paths are resolved against ``base_dir``).
    base_dir
        Folder that a relative path is resolved against (usually the study's folder).

    Raises
    ------
    CompkitError
        When the file does not exist.
    ValidationError
        With one problem (line, field) per bad value, duplicate (id, repeat) or typo'd key.

    Examples
    --------
    >>> spec = ModelSpec(name="phone", runtime="predictions", model="phone.jsonl")  # doctest: +SKIP
    >>> rt = PredictionsRuntime(spec, base_dir=Path("studies/support"))  # doctest: +SKIP
    >>> rt.expect_ids(["q1", "q2"], repeats=1)  # doctest: +SKIP
    """

    name = "predictions"

    def __init__(self, spec: ModelSpec, *, base_dir: Path | None = None):
        super().__init__(spec, base_dir=base_dir)
        self.path = _resolve(spec, self.base_dir)
        self.source = str(self.path)
        self.rows = read_predictions(self.path)
        self._by_key = {(r.id, r.repeat): r for r in self.rows}
        self.repeats = sorted({r.repeat for r in self.rows})
        self._expected: set[str] | None = None

    @classmethod
    def check_source(cls, spec: ModelSpec, *, base_dir: Path, ids, repeats: int) -> str:
        """The whole file validated and its ids matched against the run's (no model runs)."""
        runtime = cls(spec, base_dir=base_dir)
        runtime.expect_ids(ids, repeats=repeats)
        return f"predictions file {runtime.path}: {len(runtime.rows)} rows, ids match"

    # ------------------------------------------------------------------ which ids

    def expect_ids(self, ids: Iterable[str], *, repeats: int | None = None) -> None:
        """Check the file against every id (and repeat) the run will ask for.

        Call once before generating. Reports ids with no row (for some repeat) and rows whose
        id (or repeat) the run never asks for, each list with its count.

        Raises
        ------
        ValidationError
            Naming the file, field ``id`` (or ``repeat``) and up to 20 ids of each kind.
        """
        wanted = list(dict.fromkeys(ids))
        self._expected = set(wanted)
        wanted_repeats = range(repeats) if repeats is not None else range(1)
        problems: list[Problem] = []
        for r in wanted_repeats:
            missing = [i for i in wanted if (i, r) not in self._by_key]
            if missing:
                problems.append(self._missing_problem(missing, r))
        extra_rows = [row for row in self.rows if row.id not in self._expected]
        if extra_rows:
            problems.append(self._extra_problem(extra_rows))
        if repeats is not None:
            beyond = [
                row for row in self.rows if row.id in self._expected and row.repeat >= repeats
            ]
            if beyond:
                shown = ", ".join(
                    f"{r.id!r} repeat {r.repeat} (row {r.line})" for r in beyond[:SHOW_IDS]
                )
                problems.append(
                    Problem(
                        self.source,
                        f"{len(beyond)} row(s) have a repeat the run does "
                        f"not ask for (it runs repeats 0..{repeats - 1}): {shown}"
                        f"{_more(beyond)}",
                        field="repeat",
                    )
                )
        if problems:
            raise ValidationError(
                f"predictions file {self.source} does not match the eval set", problems
            )

    def _missing_problem(self, missing: list[str], repeat: int) -> Problem:
        which = f" for repeat {repeat}" if repeat or len(self.repeats) > 1 else ""
        shown = ", ".join(repr(i) for i in missing[:SHOW_IDS])
        return Problem(
            self.source,
            f"{len(missing)} id(s) the run asks for have no prediction{which}: "
            f"{shown}{_more(missing)}; add a row for each",
            field="id",
        )

    def _extra_problem(self, rows: list[PredictionRow]) -> Problem:
        ids = list(dict.fromkeys(r.id for r in rows))
        first_line = {}
        for r in rows:
            first_line.setdefault(r.id, r.line)
        shown = ", ".join(f"{i!r} (row {first_line[i]})" for i in ids[:SHOW_IDS])
        return Problem(
            self.source,
            f"{len(ids)} id(s) are not in the eval set the run uses: {shown}"
            f"{_more(ids)}; remove them or check the eval set (limit?)",
            field="id",
        )

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """The file's row for each request (its id, at the repeat its seed belongs to).

        Raises
        ------
        ValidationError
            Listing the requested ids that have no row, or requested ids outside the set
            given to :meth:`expect_ids`.
        """
        seeds = self._seed_repeats(sampling.seed)
        keys = [(r.item_id, self._repeat_of(r.seed, seeds)) for r in requests]
        if self._expected is not None:
            unexpected = [i for i, _ in keys if i not in self._expected]
            if unexpected:
                raise CompkitError(
                    f"predictions file {self.source}: generate asked for id(s) "
                    f"{unexpected[:SHOW_IDS]} that were not given to expect_ids"
                )
        missing_by_repeat: dict[int, list[str]] = {}
        for item_id, repeat in keys:
            if (item_id, repeat) not in self._by_key:
                missing_by_repeat.setdefault(repeat, []).append(item_id)
        if missing_by_repeat:
            problems = [
                self._missing_problem(ids, r) for r, ids in sorted(missing_by_repeat.items())
            ]
            raise ValidationError(f"predictions file {self.source} lacks requested ids", problems)
        results = [self._generation(self._by_key[k]) for k in keys]
        if progress is not None and results:
            progress(len(results))
        return results

    def _seed_repeats(self, study_seed: int) -> dict[int, int]:

        top = max(MAX_REPEATS, max(self.repeats, default=0) + 1)
        return {repeat_seed(study_seed, r): r for r in range(top)}

    def _repeat_of(self, seed: int, seeds: dict[int, int]) -> int:
        if seed in seeds:
            return seeds[seed]
        if len(self.repeats) == 1:
            return self.repeats[0]
        raise CompkitError(
            f"predictions file {self.source} holds repeats {self.repeats}, and request "
            f"seed {seed} is not the seed of any repeat of this study's seed; run it "
            "through kit.execute (which derives seeds from the study seed)"
        )

    @staticmethod
    def _generation(row: PredictionRow) -> PredictedGeneration:
        return PredictedGeneration(
            item_id=row.id,
            text=row.output,
            prompt_tokens=row.prompt_tokens,
            output_tokens=row.output_tokens,
            ttft_s=row.ttft_s,
            latency_s=row.latency_s,
            finish_reason=row.finish_reason,
            error=row.error,
            error_class=row.error_class,
            confidence=row.confidence,
        )

    # ------------------------------------------------------------------ choices

    @property
    def supports_choice_scoring(self) -> bool:
        """Only when the file's rows carry ``choice_probs``."""
        return any(r.choice_probs is not None for r in self.rows)

    def score_choices(
        self, requests: Sequence[ChoiceRequest], *, progress: Progress | None = None
    ) -> list[ChoiceScores]:
        """The file's ``choice_probs`` as log-probabilities (lowest repeat's row of each id).

        Raises
        ------
        CompkitError
            When the file has no ``choice_probs`` at all.
        ValidationError
            For a requested id without a row, without ``choice_probs``, or with a number of
            probabilities different from the item's number of options.
        """
        if not self.supports_choice_scoring:
            raise CompkitError(
                f"predictions file {self.source} has no 'choice_probs', so it cannot "
                "score choices; set score_choices: false for this model"
            )
        first = {}
        for row in sorted(self.rows, key=lambda r: r.repeat):
            first.setdefault(row.id, row)
        problems = []
        results = []
        for req in requests:
            row = first.get(req.item_id)
            if row is None:
                problems.append(Problem(self.source, f"no row for id {req.item_id!r}", field="id"))
            elif row.choice_probs is None:
                problems.append(
                    Problem(
                        self.source,
                        f"id {row.id!r} is a choice item with "
                        f"{len(req.continuations)} options but has no choice_probs",
                        row.line,
                        "choice_probs",
                    )
                )
            elif len(row.choice_probs) != len(req.continuations):
                problems.append(
                    Problem(
                        self.source,
                        f"id {row.id!r} has {len(row.choice_probs)} "
                        f"choice_probs but the item has {len(req.continuations)} "
                        "options",
                        row.line,
                        "choice_probs",
                    )
                )
            else:
                results.append(
                    ChoiceScores(
                        item_id=req.item_id,
                        logprobs=[
                            math.log(p) if p > 0 else float("-inf") for p in row.choice_probs
                        ],
                        n_tokens=[0] * len(row.choice_probs),
                    )
                )
        if problems:
            raise ValidationError(
                f"predictions file {self.source} cannot score these choices", problems
            )
        if progress is not None and results:
            progress(len(results))
        return results

    # ------------------------------------------------------------------ identity

    def identity(self) -> ModelIdentity:
        digest = file_sha256(self.path)
        return ModelIdentity(
            runtime=self.name,
            runtime_version=FORMAT_VERSION,
            model=self.spec.model,
            weights_sha256=digest,
            files={self.path.name: digest},
            size_bytes=self.path.stat().st_size,
            extra={
                "path": self.source,
                "rows": len(self.rows),
                "ids": len({r.id for r in self.rows}),
                "repeats": self.repeats,
            },
        )

    @classmethod
    def weights_fingerprint(cls, spec: ModelSpec, *, base_dir: Path) -> str | None:
        """sha256 of the predictions file (equals ``identity().weights_sha256``)."""
        return file_sha256(_resolve(spec, base_dir))


# ---------------------------------------------------------------------- reading


def _resolve(spec: ModelSpec, base_dir: Path) -> Path:
    path = Path(spec.model).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise CompkitError(
            f"model {spec.name!r}: predictions file {path} does not exist "
            "(runtime 'predictions' reads a JSONL file of id/output rows)"
        )
    return path


def read_predictions(path: Path) -> list[PredictionRow]:
    """Read and validate a predictions JSONL file.

    Raises
    ------
    ValidationError
        With every problem found: invalid JSON, missing or mistyped fields, out-of-range
        values, duplicate (id, repeat) pairs; each names the file, line and field.
    """
    source = str(path)
    rows: list[PredictionRow] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, int], int] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(
                    Problem(source, f"invalid JSON: {exc.msg} (column {exc.colno})", line_no)
                )
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(source, "each line must be a JSON object", line_no))
                continue
            checked = _check_row(obj, source, line_no)
            problems.extend(checked.problems)
            if checked.problems:
                continue
            row = PredictionRow(line=line_no, **checked.values)
            key = (row.id, row.repeat)
            if key in seen:
                what = f"id {row.id!r}" + (f" with repeat {row.repeat}" if row.repeat else "")
                problems.append(
                    Problem(source, f"duplicate {what} (first at row {seen[key]})", line_no, "id")
                )
                continue
            seen[key] = line_no
            rows.append(row)
    if not rows and not problems:
        problems.append(Problem(source, "the file has no rows"))
    if problems:
        raise ValidationError(f"predictions file {source}", problems)
    return rows


def _check_row(obj: dict[str, Any], source: str, line: int) -> _Checked:
    out = _Checked()

    def bad(name: str, message: str) -> None:
        out.problems.append(Problem(source, message, line, name))

    for key in obj:
        if key not in _FIELDS and (
            near := difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.8)
        ):
            bad(key, f"unknown field (did you mean '{near[0]}'?)")

    raw_id = obj.get("id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if raw_id is None:
        bad("id", "missing 'id'")
    elif not isinstance(raw_id, str) or not raw_id:
        bad("id", f"must be a non-empty string, got {_show(raw_id)}")
    out.values["id"] = raw_id

    error = obj.get("error")
    if error is not None and not isinstance(error, str):
        bad("error", f"must be a string or null, got {_show(error)}")
    output = obj.get("output")
    if output is None:
        if not error:
            bad("output", "missing 'output' (the model's answer as a string)")
        output = ""
    elif not isinstance(output, str):
        bad("output", f"must be a string, got {_show(output)}")
    out.values.update(output=output, error=error or None)

    error_class = obj.get("error_class")
    if error_class is not None and error_class not in ERROR_CLASSES:
        bad("error_class", f"must be one of {list(ERROR_CLASSES)}, got {_show(error_class)}")
    out.values["error_class"] = (
        error_class if error_class is not None else ("runtime_error" if error else None)
    )

    repeat = obj.get("repeat", 0)
    if not _is_int(repeat) or repeat < 0:
        bad("repeat", f"must be an integer >= 0, got {_show(repeat)}")
    out.values["repeat"] = repeat

    confidence = obj.get("confidence")
    if confidence is not None and not (_is_number(confidence) and 0.0 <= confidence <= 1.0):
        bad("confidence", f"must be a number from 0 to 1, got {_show(confidence)}")
    out.values["confidence"] = float(confidence) if _is_number(confidence) else None
    for name in ("latency_s", "ttft_s"):
        value = obj.get(name)
        if value is not None and not (_is_number(value) and value >= 0):
            bad(name, f"must be a number of seconds >= 0, got {_show(value)}")
        out.values[name] = float(value) if value is not None and _is_number(value) else None
    for name in ("prompt_tokens", "output_tokens"):
        value = obj.get(name)
        if value is not None and not (_is_int(value) and value >= 0):
            bad(name, f"must be an integer >= 0, got {_show(value)}")
        out.values[name] = value
    finish = obj.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        bad("finish_reason", f"must be a string, got {_show(finish)}")
    out.values["finish_reason"] = finish

    probs = obj.get("choice_probs")
    if probs is not None:
        if (
            not isinstance(probs, list)
            or len(probs) < 2
            or not all(_is_number(p) and 0.0 <= p <= 1.0 for p in probs)
        ):
            bad(
                "choice_probs",
                f"must be a list of at least 2 numbers from 0 to 1, got {_show(probs)}",
            )
        elif sum(probs) <= 0:
            bad("choice_probs", "all probabilities are 0")
        else:
            probs = tuple(float(p) for p in probs)
    out.values["choice_probs"] = probs
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _more(items: Sequence[Any]) -> str:
    return f" ... and {len(items) - SHOW_IDS} more" if len(items) > SHOW_IDS else ""
