"""Slice drill-down (stage 3): every table the notebook shows, as pure functions.

Reads a run folder (frozen inputs, stored outputs of the baseline and the candidates) and
returns tidy frames; :func:`write_drilldown_tables` stores them under ``tables/`` with a
provenance file. Nothing here draws: charts come from :mod:`kit.report.charts.comparison`, the
interactive explorer from :mod:`kit.report.widgets`.

Only the run folder is read: the frozen inputs (:class:`kit.run.Run` verifies the eval set's
hash) and ``outcomes.parquet``, the scores stage 2 wrote once; nothing is re-scored here.

Tables (``runs/NAME/tables/``)
------------------------------
``overall_deltas``     candidates vs baseline over all items (:data:`kit.analysis.compare.RESULT_COLUMNS`)
``slice_table``        the same per value of every slice column (overall rows first), plus
                       ``recall`` rows on label-defined slices; the evidence of item metrics
``flips``              flip counts and rates per binary metric, overall and per slice
``flip_evidence``      ``flip_rate`` (accuracy right->wrong + wrong->right) with its interval
``label_evidence``     ``macro_f1`` per candidate and slice with BCa intervals
``noise_floor``        the baseline against its own repeats (empty with one repeat)
``worst_slices``       slices ranked by CI-aware drop of ``metric`` (``worst_slices``)
``discovered_slices``  conjunctions of slice values where right->wrong flips concentrate
``label_metrics``      per-label precision / recall / F1 and macro rows
``drilldown.json``     parameters, kit version + git sha, eval-set hash, file hashes, time

Example
-------
>>> tables = write_drilldown_tables("runs/demo", n_resamples=1000, seed=0)   # doctest: +SKIP
>>> failing_examples("runs/demo", candidate="q4", k=5)                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from kit.analysis.compare import RESULT_COLUMNS, flip_table, item_flips, noise_floor
from kit.analysis.items import parse_slice, reference_text
from kit.analysis.labels import macro_f1_evidence
from kit.analysis.slices import (
    DISCOVERY_COLUMNS,
    attach_slices,
    default_slice_columns,
    discover_slices,
    slice_table,
    worst_slices,
)
from kit.budget.grammar import LABEL_SLICES
from kit.errors import CompkitError
from kit.evalset import EvalSet
from kit.run import Run
from kit.scoring import label_metrics, metric_columns
from kit.stats.intervals import proportion_ci
from kit.store import file_sha256

FAILING_COLUMNS = [
    "item_id",
    "task",
    "flip",
    "input",
    "reference",
    "baseline_output",
    "candidate_output",
    "baseline_pred",
    "candidate_pred",
]


# --------------------------------------------------------------------------- loading


def run_models(run: str | Path | Run) -> tuple[str, list[str]]:
    """The baseline's name and the candidates with stored outputs, sorted."""
    run = Run.open(run)
    return run.baseline, run.candidates()


def load_run_outcomes(run: str | Path | Run) -> pd.DataFrame:
    """The run's ``outcomes.parquet`` (scored once by stage 2; never re-scored here)."""
    return Run.open(run).outcomes()


# --------------------------------------------------------------------------- examples


def side_by_side(
    outcomes: pd.DataFrame,
    outputs: pd.DataFrame,
    eval_set: EvalSet,
    *,
    baseline: str,
    candidate: str,
    slices: pd.DataFrame | None = None,
    flip: str = "right_to_wrong",
    metric: str = "correct",
    k: int = 10,
    slice: str | Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Items of one flip kind with input, reference and both outputs side by side.

    Parameters
    ----------
    outcomes, outputs, eval_set
        Outcome table, stored output rows (``model, item_id, repeat, output``) and items.
    baseline, candidate
        The two models.
    slices
        Slices frame (``id`` + slice columns); needed only with ``slice``.
    flip, metric
        Which :func:`kit.analysis.compare.item_flips` kind to list, on which binary metric.
    k
        At most this many items (by item id).
    slice
        Keep only items in this slice (:func:`parse_slice`).

    Returns
    -------
    DataFrame
        :data:`FAILING_COLUMNS` plus the slice's columns. Outputs are the plain stored
        text of the lowest repeat whose outcome is the one the flip reports.
    """
    flips = item_flips(outcomes, baseline=baseline, candidates=candidate, metric=metric)
    rows = flips[flips["flip"] == flip]
    wanted = parse_slice(slice)
    if wanted:
        if slices is None:
            raise CompkitError("filtering by slice needs the slices frame")
        missing = [c for c in wanted if c not in slices.columns]
        if missing:
            raise CompkitError(f"slice column(s) {missing} are not in the slices frame")
        table = slices.set_index("id")[list(wanted)].astype(str)
        keep = (table[list(wanted)] == pd.Series(wanted)).all(axis=1)
        rows = rows[rows["item_id"].isin(table.index[keep])]
    rows = rows.sort_values("item_id").head(k)
    column = flips["metric"].iloc[0] if len(flips) else metric
    texts = _outputs_with_outcome(
        outcomes, outputs, rows, metric=metric, baseline=baseline, candidate=candidate
    )
    items = eval_set.by_id()
    out = pd.DataFrame(
        {
            "item_id": rows["item_id"].to_numpy(),
            "task": [items[i].task for i in rows["item_id"]],
            "flip": rows["flip"].to_numpy(),
            "input": [items[i].text for i in rows["item_id"]],
            "reference": [reference_text(items[i]) for i in rows["item_id"]],
            "baseline_output": [texts.get((baseline, i), "") for i in rows["item_id"]],
            "candidate_output": [texts.get((candidate, i), "") for i in rows["item_id"]],
            "baseline_pred": rows["baseline_pred"].to_numpy(),
            "candidate_pred": rows["candidate_pred"].to_numpy(),
        },
        columns=FAILING_COLUMNS,
    )
    extra = [c for c in wanted if c not in out.columns]
    if extra:
        out = out.join(slices.set_index("id")[extra], on="item_id")
    out.attrs["metric"] = column
    return out.reset_index(drop=True)


def _outputs_with_outcome(
    outcomes: pd.DataFrame,
    outputs: pd.DataFrame,
    rows: pd.DataFrame,
    *,
    metric: str,
    baseline: str,
    candidate: str,
) -> dict[tuple[str, str], str]:
    column = metric if metric in outcomes.columns else _column_of(outcomes, metric)
    keys = ["model", "item_id", "repeat"]
    merged = outcomes[[*keys, column]].merge(outputs[[*keys, "output"]], on=keys, how="left")
    merged = merged[merged["item_id"].isin(rows["item_id"])].sort_values(keys)
    texts: dict[tuple[str, str], str] = {}
    for model, outcome_col in ((baseline, "baseline_outcome"), (candidate, "candidate_outcome")):
        wanted = rows.set_index("item_id")[outcome_col]
        part = merged[merged["model"] == model]
        part = part[part[column].to_numpy() == part["item_id"].map(wanted).to_numpy()]
        for item_id, text in part.drop_duplicates("item_id")[["item_id", "output"]].itertuples(
            index=False
        ):
            texts[(model, item_id)] = text if isinstance(text, str) else ""
    return texts


def _column_of(outcomes: pd.DataFrame, metric: str) -> str:
    for column, name in metric_columns(outcomes).items():
        if name == metric:
            return column
    raise CompkitError(f"metric {metric!r} is not a column of the outcome table")


def failing_examples(
    run: str | Path | Run,
    *,
    candidate: str,
    k: int = 10,
    slice: str | Mapping[str, str] | None = None,
    metric: str = "correct",
    flip: str = "right_to_wrong",
    outcomes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Items of one flip kind (default: right with the baseline, wrong with ``candidate``).

    Parameters
    ----------
    run
        The run folder (or :class:`~kit.run.Run`).
    candidate
        A candidate with stored outputs.
    k
        At most this many items (by item id).
    slice
        Only items in this slice: ``"language=de"``, ``"channel=email & language=de"``
        (the form :func:`kit.analysis.slices.discover_slices` reports) or a mapping.
    metric, flip
        The binary metric and the flip kind (:data:`kit.analysis.compare.FLIP_KINDS`).
    outcomes
        An already loaded ``outcomes.parquet`` (saves reading it again).

    Returns
    -------
    DataFrame
        :data:`FAILING_COLUMNS` (+ the slice's columns): input, reference, baseline output
        and candidate output as plain text.
    """
    run = Run.open(run)
    return side_by_side(
        run.outcomes() if outcomes is None else outcomes,
        run.outputs([run.baseline, candidate]),
        run.eval_set,
        baseline=run.baseline,
        candidate=candidate,
        slices=run.slices(),
        k=k,
        slice=slice,
        metric=metric,
        flip=flip,
    )


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class DrilldownTables:
    """The drill-down's tidy frames (see the module docstring for each)."""

    overall_deltas: pd.DataFrame
    slice_table: pd.DataFrame
    flips: pd.DataFrame
    flip_evidence: pd.DataFrame
    label_evidence: pd.DataFrame
    noise_floor: pd.DataFrame
    worst_slices: pd.DataFrame
    discovered_slices: pd.DataFrame
    label_metrics: pd.DataFrame

    def frames(self) -> dict[str, pd.DataFrame]:
        """Table name -> frame, in display order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_drilldown_tables(run: str | Path | Run) -> DrilldownTables:
    """Load the tables :func:`write_drilldown_tables` stored under ``tables/``.

    Raises
    ------
    CompkitError
        When a table file is missing (run the drill-down first).
    """
    run = Run.open(run)
    for f in fields(DrilldownTables):
        if not run.has_table(f.name):
            raise CompkitError(
                f"{run.table_path(f.name)}: missing; run write_drilldown_tables (notebook 03) first"
            )
    return DrilldownTables(**{f.name: run.table(f.name) for f in fields(DrilldownTables)})


def binary_metrics(outcomes: pd.DataFrame) -> list[str]:
    """Registered 0/1 item metrics with values in ``outcomes`` (flips exist for these)."""
    out = []
    for column, name in metric_columns(outcomes).items():
        values = outcomes[column].to_numpy(dtype=float)
        finite = values[~np.isnan(values)]
        if finite.size and np.isin(finite, (0.0, 1.0)).all():
            out.append(name)
    return out


def recall_rows(table: pd.DataFrame) -> pd.DataFrame:
    """``recall`` evidence: the accuracy rows of label-defined slices (``label_rarity``).

    Recall of a set of gold labels is the accuracy on the items carrying them, so "rare-label
    recall" is judged on these rows (recall pooled over the slice's items).
    """
    rows = table[(table["metric"] == "accuracy") & table["slice"].isin(LABEL_SLICES)]
    return rows.assign(metric="recall")


def drilldown_frames(
    outcomes: pd.DataFrame,
    slices: pd.DataFrame,
    *,
    baseline: str,
    confidence: float = 0.95,
    metric: str = "accuracy",
    n_resamples: int = 2000,
    seed: int = 0,
    min_n: int = 5,
    k: int = 10,
    eval_set: EvalSet | None = None,
) -> DrilldownTables:
    """Every drill-down table from an outcome table and a slices frame.

    Parameters
    ----------
    outcomes
        Outcome table with the baseline and at least one candidate.
    slices
        Slices frame (``id`` + slice columns), e.g. ``Run.slices()``.
    baseline
        The baseline's model name.
    confidence
        Level of every interval (the study's ``confidence``).
    metric
        Metric ranked by ``worst_slices``.
    n_resamples, seed
        Bootstrap settings (metrics that are not 0/1 per item, macro F1).
    min_n, k
        Smallest slice ranked by ``worst_slices`` and how many per model; ``k`` is also the
        number of discovered slices per candidate and metric.
    eval_set
        Needed for ``label_metrics`` and ``label_evidence`` (empty without it).
    """
    columns = default_slice_columns(slices)
    table = slice_table(
        outcomes,
        slices,
        baseline=baseline,
        slice_columns=columns,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    table = pd.concat([table, recall_rows(table)], ignore_index=True)
    merged = attach_slices(outcomes, slices, columns)
    floor = noise_floor(
        merged,
        baseline=baseline,
        by=columns,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    candidates = [m for m in dict.fromkeys(outcomes["model"]) if m != baseline]
    flip_metrics = binary_metrics(outcomes)
    flips = pd.concat(
        [flip_table(merged, baseline=baseline, by=columns, metric=m) for m in flip_metrics],
        ignore_index=True,
    )
    return DrilldownTables(
        overall_deltas=table[table["slice"] == "overall"].reset_index(drop=True),
        slice_table=table,
        flips=flips,
        flip_evidence=flip_rate_evidence(flips, confidence=confidence),
        label_evidence=_label_evidence(
            outcomes, eval_set, slices, baseline, candidates, columns, confidence, n_resamples, seed
        ),
        noise_floor=floor,
        worst_slices=worst_slices(table, metric=metric, k=k, min_n=min_n),
        discovered_slices=_discovered(
            outcomes, slices, baseline, candidates, flip_metrics, columns, k
        ),
        label_metrics=(
            label_metrics(outcomes, eval_set)
            if eval_set is not None
            else pd.DataFrame(columns=["model", "label", "precision", "recall", "f1", "support"])
        ),
    )


def _label_evidence(
    outcomes, eval_set, slices, baseline, candidates, columns, confidence, n_resamples, seed
):
    if eval_set is None or not any(it.task == "classification" for it in eval_set.items):
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return macro_f1_evidence(
        outcomes,
        eval_set,
        baseline=baseline,
        candidates=candidates,
        slices=slices,
        slice_columns=[c for c in columns if c != "label_rarity"],
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )


def _discovered(outcomes, slices, baseline, candidates, metrics, columns, k) -> pd.DataFrame:
    """Slices where right->wrong flips concentrate, per candidate and primary metric."""
    frames = []
    for name in [m for m in ("accuracy", "choice_accuracy") if m in metrics]:
        for model in candidates:
            flags = item_flips(outcomes, baseline=baseline, candidates=model, metric=name)
            found = discover_slices(flags, slices, columns=columns, k=k)
            frames.append(found.assign(model=model, metric=name))
    if not frames:
        return pd.DataFrame(columns=["model", "metric", *DISCOVERY_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    return out[["model", "metric", *[c for c in out.columns if c not in ("model", "metric")]]]


def flip_rate_evidence(flips: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """``flip_rate`` evidence from :func:`kit.analysis.compare.flip_table` rows (accuracy).

    The share of paired items whose accuracy flipped (right->wrong + wrong->right), with its
    Clopper–Pearson interval, per model and slice.
    """
    part = flips[flips["metric"] == "accuracy"]
    if part.empty:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    keys = ["model", "slice", "slice_value"]
    n = part.groupby(keys, sort=False)["n"].first()
    moved = part[part["flip"].isin(["right_to_wrong", "wrong_to_right"])]
    count = moved.groupby(keys, sort=False)["count"].sum().reindex(n.index, fill_value=0)
    low, high = proportion_ci(count.to_numpy(), n.to_numpy(), confidence=confidence)
    out = n.reset_index()[keys].assign(
        metric="flip_rate",
        n=n.to_numpy(),
        value=count.to_numpy() / n.to_numpy(),
        value_ci_low=low,
        value_ci_high=high,
        value_method="clopper_pearson",
        confidence=confidence,
        note="",
    )
    return out.reindex(columns=RESULT_COLUMNS)


def write_drilldown_tables(
    run: str | Path | Run,
    *,
    metric: str = "accuracy",
    n_resamples: int = 2000,
    seed: int = 0,
    min_n: int = 5,
    k: int = 10,
) -> DrilldownTables:
    """Compute every drill-down table of a run and write them to ``tables/``.

    Reads ``outcomes.parquet`` (stage 2) and the frozen slices; every interval has the
    study's ``confidence``. Writes ``<name>.parquet`` per table and ``drilldown.json``
    (parameters, baseline, candidates, kit version and git sha, eval-set hash, sha256 of each
    file, time), atomically; returns the tables.
    """
    from kit.environment import kit_info
    from kit.store import atomic_write_json, now_iso

    run = Run.open(run)
    tables = drilldown_frames(
        run.outcomes(),
        run.slices(),
        baseline=run.baseline,
        confidence=run.confidence,
        metric=metric,
        n_resamples=n_resamples,
        seed=seed,
        min_n=min_n,
        k=k,
        eval_set=run.eval_set,
    )
    files = {}
    for name, frame in tables.frames().items():
        path = run.write_table(name, frame)
        files[path.name] = {"rows": len(frame), "sha256": file_sha256(path)}
    atomic_write_json(
        run.tables_dir / "drilldown.json",
        {
            "kind": "compkit.drilldown",
            "parameters": {
                "metric": metric,
                "n_resamples": n_resamples,
                "seed": seed,
                "min_n": min_n,
                "k": k,
                "confidence": run.confidence,
            },
            "baseline": run.baseline,
            "candidates": run.candidates(),
            "eval_set_sha256": run.eval_set.sha256,
            "kit": kit_info().model_dump(),
            "files": files,
            "created_at": now_iso(),
        },
    )
    return tables


# --------------------------------------------------------------------------- exploration


@dataclass(frozen=True, eq=False)
class ExplorerInputs:
    """Everything the interactive drill-down reads, loaded once from a run folder.

    ``slice_table`` and ``discovered_slices`` are the stage tables (a ``metric`` column
    names each row's metric; discovered rows without one are accuracy flips); ``confidence``
    is :func:`kit.analysis.calibration.confidence_frame` with the calibration stage's source
    and ``reliability`` its uniform bins per model (:func:`kit.analysis.calibration.reliability_bins`).
    """

    baseline: str
    candidates: list[str]
    outcomes: pd.DataFrame
    outputs: pd.DataFrame
    eval_set: EvalSet
    slices: pd.DataFrame
    slice_table: pd.DataFrame
    discovered_slices: pd.DataFrame
    confidence: pd.DataFrame
    confidence_source: str
    reliability: pd.DataFrame

    @property
    def metrics(self) -> list[str]:
        """Metrics of the slice table in its order (each task's primary metric first)."""
        return list(dict.fromkeys(self.slice_table["metric"]))

    @property
    def slice_columns(self) -> list[str]:
        """Slice columns of the slice table, in its order."""
        return [c for c in dict.fromkeys(self.slice_table["slice"]) if c != "overall"]

    def items(self, *, candidate: str, metric: str) -> pd.DataFrame:
        """:func:`kit.analysis.items.paired_items` of ``candidate`` on ``metric``."""
        from kit.analysis.items import paired_items

        return paired_items(
            self.outcomes,
            self.outputs,
            self.eval_set,
            baseline=self.baseline,
            candidate=candidate,
            metric=metric,
            slices=self.slices,
            confidence=self.confidence,
        )

    def discovered(self, *, candidate: str, metric: str) -> pd.DataFrame:
        """Discovered slices of ``candidate`` for ``metric`` (empty when none were searched)."""
        rows = self.discovered_slices
        rows = rows[rows["model"] == candidate] if "model" in rows.columns else rows.iloc[:0]
        if "metric" in rows.columns:
            return rows[rows["metric"] == metric].reset_index(drop=True)
        return rows.reset_index(drop=True) if metric == "accuracy" else rows.iloc[:0]


def _confidence_source(run_dir: Path) -> str:
    """The calibration stage's confidence source (``tables/calibration.json``), else auto."""
    import json

    path = run_dir / "tables" / "calibration.json"
    if path.is_file():
        params = json.loads(path.read_text(encoding="utf-8")).get("parameters", {})
        return str(params.get("confidence_source", "auto"))
    return "auto"


def explorer_inputs(
    run_dir: str | Path | Run,
    *,
    tables: DrilldownTables | None = None,
    outcomes: pd.DataFrame | None = None,
    n_bins: int = 10,
) -> ExplorerInputs:
    """Load what :func:`kit.report.widgets.slice_explorer` shows, from a run folder.

    Parameters
    ----------
    tables
        The drill-down tables (default: read from ``tables/``; run notebook 03 first).
    outcomes
        An already scored outcome table (default: :func:`load_run_outcomes`).
    n_bins
        Uniform reliability bins of the calibration view.
    """
    from kit.analysis.calibration import confidence_frame, reliability_bins

    frozen = Run.open(run_dir)
    baseline, candidates = frozen.baseline, frozen.candidates()
    if not candidates:
        raise CompkitError(f"{run_dir}: no candidate outputs to explore (run stage 2 first)")
    outcomes = frozen.outcomes() if outcomes is None else outcomes
    tables = read_drilldown_tables(frozen) if tables is None else tables
    outputs = frozen.outputs()
    source = _confidence_source(frozen.run_dir)
    conf = confidence_frame(outputs, outcomes, source=source)
    return ExplorerInputs(
        baseline=baseline,
        candidates=candidates,
        outcomes=outcomes,
        outputs=outputs,
        eval_set=frozen.eval_set,
        slices=frozen.slices(),
        slice_table=tables.slice_table,
        discovered_slices=tables.discovered_slices,
        confidence=conf,
        confidence_source=source,
        reliability=reliability_bins(conf, n_bins=n_bins, strategies=("uniform",)),
    )
