"""Paired items side by side: the table a drill-down filters when a person clicks a slice.

Pure functions over tidy frames (no run folder, no widgets): :func:`paired_items` lays one
candidate's items next to the baseline's for one metric (input, reference, both outputs,
both outcomes, the flip, both confidences and every slice column), :func:`select_items`
narrows it (a slice or discovered conjunction, flip directions, a text search, a confidence
bin) and :func:`flip_counts` counts what a selection holds per direction.

Example
-------
>>> items = paired_items(outcomes, outputs, eval_set, baseline="base", candidate="q4",
...                      metric="accuracy", slices=slices)                  # doctest: +SKIP
>>> select_items(items, slice="language=de", flips=["right_to_wrong"], search="refund")
...                                                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet

#: Columns of :func:`paired_items` before the slice columns.
ITEM_COLUMNS = [
    "item_id",
    "task",
    "metric",
    "flip",
    "input",
    "reference",
    "baseline_output",
    "candidate_output",
    "baseline_outcome",
    "candidate_outcome",
    "baseline_pred",
    "candidate_pred",
    "baseline_confidence",
    "candidate_confidence",
]
#: Flip kinds of a metric that is not 0/1 (chrF, a human score): the candidate's value
#: against the baseline's, in the metric's direction.
GRADED_FLIPS = ("worse", "better", "unchanged")
SEARCHED = ("item_id", "input", "reference", "baseline_output", "candidate_output")


def reference_text(item: EvalItem) -> str:
    """An item's reference as plain text (the label, the right option, the JSON fields...)."""
    import json

    if item.task == "classification":
        return str(item.label)
    if item.task == "multiple_choice":
        assert item.choices is not None and item.answer is not None
        return f"{chr(ord('A') + item.answer)}) {item.choices[item.answer]}"
    if item.task == "extraction":
        return json.dumps(item.fields, ensure_ascii=False, sort_keys=True)
    if item.task == "refusal":
        return "should refuse" if item.should_refuse else "should answer"
    if item.task == "tool_call":
        call = {"tool": item.expected_tool, "arguments": item.expected_args}
        return json.dumps(call, ensure_ascii=False, sort_keys=True)
    return item.reference or ""


def outcome_column(outcomes: pd.DataFrame, metric: str) -> str:
    """The outcome column holding ``metric`` (a column name or a registered metric name)."""
    from kit.scoring import metric_columns

    if metric in outcomes.columns:
        return metric
    for column, name in metric_columns(outcomes).items():
        if name == metric:
            return column
    raise CompkitError(
        f"metric {metric!r} is not a column of the outcome table; metric columns: "
        f"{sorted(metric_columns(outcomes).values())}"
    )


def _binary(values: pd.Series) -> bool:
    v = values.dropna().to_numpy(dtype=float)
    return bool(np.isin(v, (0.0, 1.0)).all())


def _graded_flips(
    outcomes: pd.DataFrame, column: str, *, baseline: str, candidate: str, higher: bool
) -> pd.DataFrame:
    per_item = (
        outcomes[outcomes["model"].isin([baseline, candidate])]
        .groupby(["model", "item_id"])[column]
        .mean()
        .unstack("model")
        .dropna()
    )
    b, c = per_item[baseline].to_numpy(), per_item[candidate].to_numpy()
    change = (c - b) if higher else (b - c)
    flip = np.select([change < -1e-12, change > 1e-12], ["worse", "better"], "unchanged")
    return pd.DataFrame(
        {
            "item_id": per_item.index,
            "baseline_outcome": b,
            "candidate_outcome": c,
            "baseline_pred": None,
            "candidate_pred": None,
            "flip": flip,
        }
    )


def _flips(outcomes: pd.DataFrame, column: str, *, baseline: str, candidate: str) -> pd.DataFrame:
    from kit.analysis.compare import item_flips, metric_info

    if _binary(outcomes[column]):
        rows = item_flips(outcomes, baseline=baseline, candidates=candidate, metric=column)
        return rows[
            [
                "item_id",
                "baseline_outcome",
                "candidate_outcome",
                "baseline_pred",
                "candidate_pred",
                "flip",
            ]
        ]
    higher = metric_info(column).higher_is_better
    return _graded_flips(outcomes, column, baseline=baseline, candidate=candidate, higher=higher)


def _texts(
    outcomes: pd.DataFrame, outputs: pd.DataFrame, column: str, model: str, wanted: pd.Series
) -> pd.Series:
    """Per item: the stored output of the lowest repeat whose outcome is the reported one
    (the lowest repeat when none matches, e.g. a graded metric averaged over repeats)."""
    keys = ["model", "item_id", "repeat"]
    rows = outcomes.loc[outcomes["model"] == model, [*keys, column]].merge(
        outputs[[*keys, "output"]], on=keys, how="left"
    )
    rows = rows[rows["item_id"].isin(wanted.index)].sort_values(["item_id", "repeat"])
    match = rows[column].to_numpy() == rows["item_id"].map(wanted).to_numpy()
    chosen = pd.concat([rows[match], rows]).drop_duplicates("item_id")
    text = chosen.set_index("item_id")["output"]
    return text.where(text.map(lambda t: isinstance(t, str)), "")


def _confidences(confidence: pd.DataFrame | None, model: str, ids: pd.Index) -> np.ndarray:
    if confidence is None or confidence.empty:
        return np.full(len(ids), np.nan)
    rows = confidence[confidence["model"] == model]
    per_item = rows.groupby("item_id")["confidence"].mean()
    return per_item.reindex(ids).to_numpy(dtype=float)


def paired_items(
    outcomes: pd.DataFrame,
    outputs: pd.DataFrame,
    eval_set: EvalSet,
    *,
    baseline: str,
    candidate: str,
    metric: str = "accuracy",
    slices: pd.DataFrame | None = None,
    confidence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per item judged on ``metric``: the baseline and ``candidate`` side by side.

    Parameters
    ----------
    outcomes
        Outcome table (``model, item_id, repeat`` + metric columns), every model scored.
    outputs
        Stored output rows (``model, item_id, repeat, output``).
    eval_set
        The frozen items (input and reference text).
    baseline, candidate
        Model names.
    metric
        A metric name (``accuracy``, ``choice_accuracy``, ``json_parse_failure``) or its
        outcome column. A 0/1 metric gets :data:`kit.analysis.compare.FLIP_KINDS`
        (``right_to_wrong`` ...), any other metric :data:`GRADED_FLIPS`.
    slices
        Slices frame (``id`` + slice columns) whose columns are joined on.
    confidence
        :func:`kit.analysis.calibration.confidence_frame` rows; each model's confidence is
        averaged over repeats. NaN where missing.

    Returns
    -------
    DataFrame
        :data:`ITEM_COLUMNS` + the slice columns, sorted by item id. Outputs are plain
        text of the lowest repeat whose outcome is the reported one.
    """
    for name in (baseline, candidate):
        if not (outcomes["model"] == name).any():
            raise CompkitError(
                f"model {name!r} has no outcomes; models: {sorted(outcomes['model'].unique())}"
            )
    column = outcome_column(outcomes, metric)
    flips = _flips(outcomes, column, baseline=baseline, candidate=candidate)
    flips = flips.sort_values("item_id").set_index("item_id")
    items = eval_set.by_id()
    ids = flips.index
    frame = pd.DataFrame(
        {
            "item_id": ids,
            "task": [items[i].task for i in ids],
            "metric": metric,
            "flip": flips["flip"].to_numpy(),
            "input": [items[i].text for i in ids],
            "reference": [reference_text(items[i]) for i in ids],
            "baseline_output": _texts(
                outcomes, outputs, column, baseline, flips["baseline_outcome"]
            )
            .reindex(ids)
            .fillna("")
            .to_numpy(),
            "candidate_output": _texts(
                outcomes, outputs, column, candidate, flips["candidate_outcome"]
            )
            .reindex(ids)
            .fillna("")
            .to_numpy(),
            "baseline_outcome": flips["baseline_outcome"].to_numpy(dtype=float),
            "candidate_outcome": flips["candidate_outcome"].to_numpy(dtype=float),
            "baseline_pred": flips["baseline_pred"].to_numpy(),
            "candidate_pred": flips["candidate_pred"].to_numpy(),
            "baseline_confidence": _confidences(confidence, baseline, ids),
            "candidate_confidence": _confidences(confidence, candidate, ids),
        },
        columns=ITEM_COLUMNS,
    )
    if slices is not None:
        from kit.analysis.slices import default_slice_columns

        extra = [c for c in default_slice_columns(slices) if c not in frame.columns]
        frame = frame.join(slices.set_index("id")[extra], on="item_id")
    return frame.reset_index(drop=True)


def parse_slice(slice: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"channel=email & language=de"`` (how discovered slices are written) or a mapping
    -> ``{column: value}``; ``None`` or ``""`` -> ``{}``."""
    if not slice:
        return {}
    if isinstance(slice, Mapping):
        return {str(k): str(v) for k, v in slice.items()}
    out = {}
    for part in str(slice).split(" & "):
        column, sep, value = part.strip().partition("=")
        if not sep or not column.strip():
            raise CompkitError(
                f"slice {slice!r}: write it as 'column=value' or 'a=x & b=y' (as discovered)"
            )
        out[column.strip()] = value.strip()
    return out


def select_items(
    items: pd.DataFrame,
    *,
    slice: str | Mapping[str, str] | None = None,
    flips: Sequence[str] | None = None,
    search: str = "",
    confidence_of: str | None = None,
    confidence_range: tuple[float, float] | None = None,
    first_bin: bool = False,
) -> pd.DataFrame:
    """The rows of :func:`paired_items` that match every given filter.

    Parameters
    ----------
    slice
        ``"language=de"``, ``"channel=email & language=de"`` or a mapping: items whose
        slice columns equal those values (compared as text).
    flips
        Keep these flip kinds (``None``: all).
    search
        Case-insensitive text every kept item contains in its id, input, reference or
        either output.
    confidence_of, confidence_range, first_bin
        ``"baseline"`` or ``"candidate"`` and a reliability bin ``(lower, upper)``: items
        whose confidence falls in that bin, by the rule of
        :func:`kit.analysis.calibration.reliability_table` (``lower < p <= upper``; the
        first bin, ``first_bin=True``, holds every ``p <= upper``).
    """
    keep = pd.Series(True, index=items.index)
    for column, value in parse_slice(slice).items():
        if column not in items.columns:
            raise CompkitError(
                f"slice column {column!r} is not in the item table; columns: "
                f"{[c for c in items.columns if c not in ITEM_COLUMNS]}"
            )
        keep &= items[column].astype(str) == value
    if flips is not None:
        keep &= items["flip"].isin(list(flips))
    if search.strip():
        needle = search.strip().casefold()
        found = pd.Series(False, index=items.index)
        for column in SEARCHED:
            found |= items[column].astype(str).str.casefold().str.contains(needle, regex=False)
        keep &= found
    if confidence_range is not None:
        if confidence_of not in ("baseline", "candidate"):
            raise CompkitError(
                f"confidence_of must be 'baseline' or 'candidate', not {confidence_of!r}"
            )
        lower, upper = confidence_range
        p = items[f"{confidence_of}_confidence"]
        keep &= ((p > lower) | first_bin) & (p <= upper)
    return items[keep]


def flip_counts(items: pd.DataFrame) -> pd.DataFrame:
    """``flip, n`` for a selection of :func:`paired_items`, largest first."""
    counts = items["flip"].value_counts()
    return pd.DataFrame({"flip": counts.index.astype(str), "n": counts.to_numpy()})
