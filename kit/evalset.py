"""Eval sets: load, validate, hash, and derive slice columns.

An eval set is a table of items, one per row, in JSONL, CSV, Parquet, or a folder saved
with ``datasets.Dataset.save_to_disk``. The schema is documented in ``docs/eval_schema.md``;
in short every row has ``id``, ``task``, an input (``input`` text or chat ``messages``),
the reference fields its task needs, and any number of user slice columns.

Example
-------
>>> es = load_eval_set("data/support/support_eval.jsonl")          # doctest: +SKIP
>>> es.sha256, len(es), es.frame().columns.tolist()[:4]           # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticError

from kit.errors import CompkitError, Problem, ValidationError

Task = Literal[
    "classification", "multiple_choice", "extraction", "refusal", "tool_call", "generation"
]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]

#: Reference fields each task requires (besides id, task and an input).
REQUIRED_REFERENCE: dict[str, tuple[str, ...]] = {
    "classification": ("label",),
    "multiple_choice": ("choices", "answer"),
    "extraction": ("fields",),
    "refusal": ("should_refuse",),
    "tool_call": ("expected_tool", "expected_args"),
    "generation": ("reference",),
}

#: Columns with a meaning of their own; every other scalar column is a user slice column.
RESERVED = (
    "id",
    "task",
    "input",
    "messages",
    "context",
    "language",
    "label",
    "labels",
    "choices",
    "answer",
    "fields",
    "should_refuse",
    "tools",
    "expected_tool",
    "expected_args",
    "reference",
    "admits_uncertainty",
)
#: Reserved columns that may arrive JSON-encoded (CSV cells, string columns).
NESTED = ("messages", "labels", "choices", "fields", "tools", "expected_args")
#: Slice columns kit derives; a user column with one of these names is an error.
DERIVED = ("task", "language", "length_bucket", "label_rarity")

SliceValue = str | int | float | bool | None


class FieldProblem(ValueError):
    """A cross-field validation error that knows which field it is about."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class EvalItem(BaseModel):
    """One validated eval item. Reference fields not used by its task stay ``None``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    task: Task
    input: str | None = None
    messages: list[Message] | None = None
    context: str | None = None
    language: str | None = None
    label: str | None = None
    labels: list[str] | None = None
    choices: list[str] | None = None
    answer: int | None = None
    fields: dict[str, Any] | None = None
    should_refuse: bool | None = None
    tools: list[dict[str, Any]] | None = None
    expected_tool: str | None = None
    expected_args: dict[str, Any] | None = None
    reference: str | None = None
    admits_uncertainty: bool | None = None
    slices: dict[str, SliceValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_task_fields(self) -> EvalItem:
        if (self.input is None) == (self.messages is None):
            raise FieldProblem(
                None, "give exactly one of 'input' (text) or 'messages' (chat turns)"
            )
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise FieldProblem("messages", "'messages' must be non-empty and end with a user turn")
        if self.input is not None and not self.input.strip():
            raise FieldProblem("input", "'input' is empty")
        missing = [f for f in REQUIRED_REFERENCE[self.task] if getattr(self, f) is None]
        if missing:
            raise FieldProblem(missing[0], f"task '{self.task}' needs reference field(s) {missing}")
        if self.task == "multiple_choice":
            assert self.choices is not None and self.answer is not None
            if len(self.choices) < 2:
                raise FieldProblem("choices", "'choices' needs at least 2 options")
            if not 0 <= self.answer < len(self.choices):
                raise FieldProblem(
                    "answer",
                    f"'answer' must index into 'choices' "
                    f"(0..{len(self.choices) - 1}), got {self.answer}",
                )
        if (
            self.task == "classification"
            and self.labels is not None
            and self.label not in self.labels
        ):
            raise FieldProblem(
                "label", f"'label' {self.label!r} is not one of this item's 'labels'"
            )
        if self.task == "extraction" and not self.fields:
            raise FieldProblem(
                "fields", "'fields' must name at least one field (value, or null for 'not found')"
            )
        return self

    @property
    def text(self) -> str:
        """The user's input text: ``input``, or the content of the last user turn."""
        return self.input if self.input is not None else self.messages[-1].content  # type: ignore[index]

    def canonical(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, unicode kept; stable across formats."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()


@dataclass
class EvalSet:
    """A validated eval set: items in file order plus provenance."""

    source: str
    items: list[EvalItem]
    slice_columns: list[str]
    item_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.item_hashes:
            self.item_hashes = {it.id: it.sha256() for it in self.items}

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def sha256(self) -> str:
        """Content hash: independent of file format, column order and row order."""
        h = hashlib.sha256()
        for item_id in sorted(self.item_hashes):
            h.update(f"{item_id}\t{self.item_hashes[item_id]}\n".encode())
        return h.hexdigest()

    @functools.cached_property
    def all_labels(self) -> list[str]:
        """Every label of the classification items, sorted."""
        return sorted({it.label for it in self.items if it.task == "classification"})  # type: ignore[misc]

    def by_id(self) -> dict[str, EvalItem]:
        return {it.id: it for it in self.items}

    def frame(self) -> pd.DataFrame:
        """Tidy item table: ``id, task, language`` and the user slice columns."""
        rows = [
            {
                "id": it.id,
                "task": it.task,
                "language": it.language,
                **{c: it.slices.get(c) for c in self.slice_columns},
            }
            for it in self.items
        ]
        return pd.DataFrame(rows, columns=["id", "task", "language", *self.slice_columns])

    def to_jsonl(self, path: Path) -> None:
        """Write the canonical items (one JSON object per line) - the frozen copy."""
        with open(path, "w", encoding="utf-8") as fh:
            for it in self.items:
                fh.write(it.canonical() + "\n")

    def to_dataset(self):
        """The items as a ``datasets.Dataset`` (nested values JSON-encoded)."""
        import datasets

        return datasets.Dataset.from_list([_flat_row(it) for it in self.items])


def load_frozen_items(path: Path, *, slice_columns: list[str]) -> EvalSet:
    """Read the canonical copy written by :meth:`EvalSet.to_jsonl` (a frozen run's
    ``frozen/eval_set.jsonl``); item hashes are recomputed and must match the file."""
    items = [
        EvalItem.model_validate_json(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return EvalSet(source=str(path), items=items, slice_columns=list(slice_columns))


def stratified_sample(
    eval_set: EvalSet, *, n: int, by: list[str], seed: int = 0, min_per_stratum: int = 1
) -> EvalSet:
    """A deterministic stratified subset (file order kept). See :class:`kit.study.SampleConfig`.

    ``by`` names item fields (``task``, ``label``, ``language`` ...) or user slice columns.
    """
    if n >= len(eval_set):
        return eval_set

    def value(item: EvalItem, col: str):
        if col in item.slices:
            return item.slices[col]
        if col in EvalItem.model_fields:
            return getattr(item, col)
        raise CompkitError(
            f"eval_set.sample.by: unknown column {col!r}; use item fields "
            f"(task, label, language ...) or slice columns {eval_set.slice_columns}"
        )

    strata: dict[tuple, list[EvalItem]] = {}
    for it in eval_set.items:
        strata.setdefault(tuple(value(it, c) for c in by), []).append(it)
    for members in strata.values():
        members.sort(key=lambda it: hashlib.sha256(f"{seed}|{it.id}".encode()).hexdigest())
    quota = {k: len(v) * n / len(eval_set) for k, v in strata.items()}
    take = {k: min(len(strata[k]), max(min_per_stratum, int(q))) for k, q in quota.items()}
    # largest remainder, measured against what a stratum already has (a stratum lifted to its
    # minimum has a negative remainder and is topped up last)
    by_remainder = sorted(strata, key=lambda k: (-(quota[k] - take[k]), str(k)))
    for k in by_remainder:  # largest remainders fill what is left of n
        if sum(take.values()) >= n:
            break
        if take[k] < len(strata[k]):
            take[k] += 1
    keep = {it.id for k, members in strata.items() for it in members[: take[k]]}
    items = [it for it in eval_set.items if it.id in keep]
    return EvalSet(
        source=eval_set.source,
        items=items,
        slice_columns=eval_set.slice_columns,
        item_hashes={i: eval_set.item_hashes[i] for i in keep},
    )


def _flat_row(item: EvalItem) -> dict[str, Any]:
    row = item.model_dump(mode="json", exclude={"slices"})
    for key in NESTED:
        if row.get(key) is not None:
            row[key] = json.dumps(row[key], ensure_ascii=False, sort_keys=True)
    return {**row, **item.slices}


# --------------------------------------------------------------------------- loading


def load_eval_set(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    default_task: str | None = None,
    slice_columns: Iterable[str] | None = None,
    limit: int | None = None,
) -> EvalSet:
    """Load and validate an eval set.

    Parameters
    ----------
    path
        A ``.jsonl``/``.json`` file, ``.csv``, ``.parquet``, or a ``datasets`` folder.
    columns
        Rename map from the file's column names to schema names, e.g. ``{"question": "input"}``.
    default_task
        Task for rows without a ``task`` column (e.g. ``"multiple_choice"`` for ARC).
    slice_columns
        User slice columns to keep; default: every non-reserved scalar column.
    limit
        Keep only the first ``limit`` rows (after validation of those rows).

    Raises
    ------
    ValidationError
        Listing every problem with its file, row and field. Nothing is written.
    """
    path = Path(path)
    source = str(path)
    raw_rows = _read_rows(path)
    if limit is not None:
        raw_rows = raw_rows[:limit]
    if not raw_rows:
        raise ValidationError(f"eval set {source}", [Problem(source, "the eval set has no rows")])
    rename = dict(columns or {})
    if default_task is not None and default_task not in TASKS:
        raise CompkitError(f"default task {default_task!r} is not one of {list(TASKS)}")

    problems: list[Problem] = []
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    wanted = list(slice_columns) if slice_columns is not None else None
    found_slices: list[str] = []
    for row_no, raw in raw_rows:
        row = {rename.get(k, k): v for k, v in raw.items()}
        if default_task is not None and row.get("task") in (None, ""):
            row["task"] = default_task
        item, row_problems, user_cols = _validate_row(row, source, row_no, wanted)
        problems.extend(row_problems)
        for c in user_cols:
            if c not in found_slices:
                found_slices.append(c)
        if item is None:
            continue
        if item.id in seen:
            problems.append(
                Problem(
                    source,
                    f"duplicate id {item.id!r} (first seen at row {seen[item.id]})",
                    row_no,
                    "id",
                )
            )
            continue
        seen[item.id] = row_no
        items.append(item)
    if wanted is not None:
        absent = [c for c in wanted if c not in found_slices]
        if absent:
            problems.append(
                Problem(
                    source,
                    f"slice column(s) {absent} not found; columns present: "
                    f"{sorted({k for _, r in raw_rows for k in r})}",
                )
            )
    if problems:
        raise ValidationError(f"eval set {source}", problems)
    return EvalSet(
        source=source, items=items, slice_columns=wanted if wanted is not None else found_slices
    )


def _validate_row(row: dict[str, Any], source: str, row_no: int, wanted: list[str] | None):
    problems: list[Problem] = []
    row = {k: _clean(v) for k, v in row.items()}
    for key in NESTED:
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError as exc:
                problems.append(Problem(source, f"not valid JSON ({exc.msg})", row_no, key))
    if isinstance(row.get("id"), int) and not isinstance(row["id"], bool):
        row["id"] = str(row["id"])
    if isinstance(row.get("id"), str):
        row["id"] = row["id"].strip()  # " a1" and "a1" are one id; "   " is no id
    task = row.get("task")
    if task is None:
        problems.append(
            Problem(
                source,
                f"missing 'task' (one of {list(TASKS)}); or set eval_set.task in the study",
                row_no,
                "task",
            )
        )
    elif task not in TASKS:
        problems.append(
            Problem(source, f"unknown task {task!r}; expected one of {list(TASKS)}", row_no, "task")
        )
    user_cols = [k for k in row if k not in RESERVED]
    keep = wanted if wanted is not None else user_cols
    slices: dict[str, SliceValue] = {}
    for col in keep:
        if col in DERIVED:
            problems.append(
                Problem(
                    source, f"'{col}' is a slice kit derives itself; rename the column", row_no, col
                )
            )
            continue
        if col not in row:
            continue
        value = row[col]
        if isinstance(value, (dict, list)):
            if wanted is not None:
                problems.append(
                    Problem(
                        source,
                        "a slice column must hold a scalar (text, number, bool) value",
                        row_no,
                        col,
                    )
                )
            continue
        slices[col] = value
    user_cols = [c for c in user_cols if c in slices or (c in keep and c in row)]
    if problems:
        return None, problems, user_cols
    fields = {k: v for k, v in row.items() if k in RESERVED}
    try:
        item = EvalItem(**fields, slices=slices)
    except PydanticError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or None
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, FieldProblem):
                loc = cause.field
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(source, msg, row_no, loc))
        return None, problems, user_cols
    return item, problems, user_cols


def _clean(value: Any) -> Any:
    """Missing cells arrive as NaN/None depending on the reader; make them None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise CompkitError(f"eval set {path}: no such file or folder")
    if path.is_dir():
        return _read_datasets_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".csv", ".parquet"):
        return _read_with_datasets(path, suffix.lstrip("."))
    raise CompkitError(
        f"eval set {path}: unsupported format {suffix!r}; use .jsonl, .csv, .parquet "
        "or a folder saved with datasets.Dataset.save_to_disk"
    )


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """JSONL is parsed line by line so that errors carry line numbers and so that
    per-row dicts keep their own keys (Arrow would merge struct keys across rows and
    turn an absent field into a null, which is a reference value here)."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[Problem] = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(
                    Problem(
                        str(path),
                        f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
                        "the line; save the file as UTF-8",
                        line_no,
                    )
                )
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(
                    Problem(str(path), f"invalid JSON: {exc.msg} (column {exc.colno})", line_no)
                )
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(str(path), "each line must be a JSON object", line_no))
                continue
            rows.append((line_no, obj))
    if problems:
        raise ValidationError(f"eval set {path}", problems)
    return rows


def _read_with_datasets(path: Path, builder: str) -> list[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise CompkitError(f"eval set {path}: could not be read as {builder}: {exc}") from exc
    header = 1 if builder == "csv" else 0
    return [(i + 1 + header, dict(r)) for i, r in enumerate(ds)]


def _read_datasets_folder(path: Path) -> list[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CompkitError(f"eval set {path}: not a folder saved by datasets ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise CompkitError(f"eval set {path}: holds splits {list(ds)}; save a single split")
        ds = next(iter(ds.values()))
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- derived slices


def length_bucket_labels(edges: list[int]) -> list[str]:
    """Bucket labels for token-count edges, e.g. [64, 256] -> ['<64', '64-255', '>=256']."""
    labels = [f"<{edges[0]}"]
    labels += [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)]
    labels.append(f">={edges[-1]}")
    return labels


def derive_slices(
    eval_set: EvalSet,
    *,
    prompt_tokens: Mapping[str, int],
    rare_label_threshold: float = 0.03,
    rare_labels: Sequence[str] | None = None,
    length_edges: list[int] | None = None,
) -> pd.DataFrame:
    """Item table with user slices plus kit's derived slice columns.

    ``length_bucket`` buckets the rendered prompt's length in tokens (``prompt_tokens``,
    counted with the baseline's tokenizer). ``label_rarity`` is ``rare`` for
    classification items whose label's share among classification items is below
    ``rare_label_threshold`` (or, when ``rare_labels`` declares the labels rare in
    production, whose label is one of them), ``common`` otherwise, and ``None`` for other
    tasks.

    Raises
    ------
    CompkitError
        When a declared rare label is not a label of any classification item.
    """
    edges = sorted(length_edges or [64, 256, 1024])
    labels = length_bucket_labels(edges)
    frame = eval_set.frame()
    missing = [i for i in frame["id"] if i not in prompt_tokens]
    if missing:
        raise CompkitError(
            f"prompt token counts missing for {len(missing)} item(s), e.g. {missing[:3]}"
        )
    frame["prompt_tokens"] = frame["id"].map(prompt_tokens).astype(int)
    frame["length_bucket"] = pd.cut(
        frame["prompt_tokens"], bins=[-1, *[e - 1 for e in edges], math.inf], labels=labels
    ).astype(str)
    label_of = {it.id: it.label for it in eval_set.items if it.task == "classification"}
    frame["label"] = frame["id"].map(label_of)
    rare = rare_label_set(label_of, threshold=rare_label_threshold, declared=rare_labels)
    frame["label_rarity"] = [
        None
        if lab is None or (isinstance(lab, float) and math.isnan(lab))
        else ("rare" if lab in rare else "common")
        for lab in frame["label"]
    ]
    return frame


def rare_label_set(
    label_of: Mapping[str, str], *, threshold: float, declared: Sequence[str] | None
) -> set[str]:
    """The rare labels: ``declared`` (checked against the labels of ``label_of``, item id ->
    label), else those whose share is below ``threshold``."""
    counts = Counter(label_of.values())
    if declared is None:
        total = sum(counts.values())
        return {lab for lab, n in counts.items() if n / total < threshold}
    unknown = sorted(set(declared) - set(counts))
    if unknown:
        raise CompkitError(
            f"eval_set.rare_labels: {unknown} is not the label of any classification item; "
            f"the labels are {sorted(counts)}"
        )
    return set(declared)


def label_shares(eval_set: EvalSet) -> pd.DataFrame:
    """Share of each classification label: ``label, n, share``, rarest first."""
    counts = Counter(it.label for it in eval_set.items if it.task == "classification")
    total = sum(counts.values()) or 1
    out = pd.DataFrame(
        [{"label": k, "n": v, "share": v / total} for k, v in counts.items()],
        columns=["label", "n", "share"],
    )
    return out.sort_values(["share", "label"]).reset_index(drop=True)


def summary(eval_set: EvalSet) -> pd.DataFrame:
    """Items per task and language, for a quick look."""
    frame = eval_set.frame().fillna({"language": "-"})
    return frame.groupby(["task", "language"]).size().rename("n").reset_index()


def label_set(eval_set: EvalSet, item: EvalItem) -> list[str]:
    """Candidate labels for a classification item: its own ``labels`` or every label
    seen in the set's classification items (sorted)."""
    if item.labels:
        return list(item.labels)
    return eval_set.all_labels
