"""Classification aggregates: per-label precision / recall / F1 and macro F1.

These metrics are not means of per-item values, so they are computed from the whole
outcome table (the ``pred`` column of classification rows against the items' labels).

Conventions (those of scikit-learn's ``precision_recall_fscore_support`` with
``zero_division=0``, restricted to the labels that have items):

* the labels of a group are those with at least one item in it (``support > 0``); a
  prediction of any other label, or no recognisable label (``pred`` missing), only costs
  the recall of the item's true label;
* precision is 0 for a label that is never predicted, F1 is 0 when precision + recall is 0;
* repeats are pooled: each (item, repeat) row is one prediction. Every item has the same
  number of repeats, so every item weighs the same; ``support`` counts items, not rows;
* macro = unweighted mean over the group's labels; its ``support`` is the group's items.

Example
-------
>>> label_metrics(outcomes, eval_set)                        # doctest: +SKIP
   model        label  precision  recall   f1  support
0   base  fraud_report       1.00    0.50 0.67        2
...
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.errors import CompkitError
from kit.evalset import EvalSet

#: Label name of the macro-average rows of :func:`label_metrics`.
MACRO = "macro"
AGGREGATE_COLUMNS = ["metric", "value", "n"]


def _classification_rows(
    outcomes: pd.DataFrame, eval_set: EvalSet, by: Sequence[str]
) -> pd.DataFrame:
    by = list(by)
    missing = [c for c in ["item_id", "pred", *by] if c not in outcomes.columns]
    if missing:
        raise CompkitError(
            f"outcome table lacks column(s) {missing}; expected kit.scoring.score_outputs rows"
        )
    truth = {it.id: it.label for it in eval_set.items if it.task == "classification"}
    rows = outcomes[outcomes["item_id"].isin(list(truth))]
    pred = rows["pred"].map(lambda p: p if isinstance(p, str) else None)
    return pd.DataFrame(
        {
            **{c: rows[c].to_numpy() for c in by},
            "item_id": rows["item_id"].to_numpy(),
            "true": rows["item_id"].map(truth).to_numpy(),
            "pred": pred.to_numpy(),
        }
    )


def _per_label(group: pd.DataFrame) -> pd.DataFrame:
    labels = sorted(group["true"].unique())
    true = group["true"].to_numpy()
    pred = group["pred"].to_numpy()
    out = []
    for label in labels:
        is_true, is_pred = true == label, pred == label
        tp = float(np.sum(is_true & is_pred))
        precision = tp / is_pred.sum() if is_pred.any() else 0.0
        recall = tp / is_true.sum()
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        support = group.loc[is_true, "item_id"].nunique()
        out.append((label, precision, recall, f1, support))
    frame = pd.DataFrame(out, columns=["label", "precision", "recall", "f1", "support"])
    macro = pd.DataFrame(
        [
            (
                MACRO,
                frame["precision"].mean(),
                frame["recall"].mean(),
                frame["f1"].mean(),
                int(group["item_id"].nunique()),
            )
        ],
        columns=frame.columns,
    )
    return pd.concat([frame, macro], ignore_index=True)


def label_metrics(
    outcomes: pd.DataFrame, eval_set: EvalSet, *, by: Sequence[str] = ("model",)
) -> pd.DataFrame:
    """Per-label precision, recall and F1 of classification items, plus macro rows.

    Parameters
    ----------
    outcomes
        Outcome table (:func:`kit.scoring.score_outputs`); its ``pred`` column holds the
        label each output names (``None`` when it names none).
    eval_set
        The items; classification items give the true labels.
    by
        Outcome columns to group by (item-level slice columns may be added).

    Returns
    -------
    DataFrame
        ``*by, label, precision, recall, f1, support``: one row per label with items in the
        group (sorted), then a row with ``label="macro"`` (conventions in the module
        docstring). Empty when there are no classification items.

    Examples
    --------
    Two items labelled ``a`` and one ``b``; a model predicts ``a, b, b``: ``a`` has
    precision 1, recall 0.5; ``b`` precision 0.5, recall 1; both F1 2/3, macro F1 2/3.
    """
    by = list(by)
    rows = _classification_rows(outcomes, eval_set, by)
    columns = [*by, "label", "precision", "recall", "f1", "support"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    frames = []
    for keys, group in rows.groupby(by, sort=True, dropna=False) if by else [((), rows)]:
        part = _per_label(group)
        for column, value in zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True):
            part[column] = value
        frames.append(part)
    out = pd.concat(frames, ignore_index=True)
    out["support"] = out["support"].astype(int)
    return out[columns]


def _aggregate(frame: pd.DataFrame, by: Sequence[str], metric: str) -> pd.DataFrame:
    return frame.assign(metric=metric)[[*by, *AGGREGATE_COLUMNS]].reset_index(drop=True)


def macro_f1(
    outcomes: pd.DataFrame,
    eval_set: EvalSet,
    *,
    slices: pd.DataFrame | None = None,
    by: Sequence[str] = ("model",),
) -> pd.DataFrame:
    """Macro F1 per group: ``*by, metric, value, n`` (``metric="macro_f1"``, n = items).

    ``slices`` is accepted for a uniform signature and not used.
    """
    by = list(by)
    table = label_metrics(outcomes, eval_set, by=by)
    macro = table[table["label"] == MACRO].rename(columns={"f1": "value", "support": "n"})
    return _aggregate(macro, by, "macro_f1")
