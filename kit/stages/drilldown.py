"""Slice drill-down (stage 3): every table the notebook shows, as pure functions.

Reads a run folder (frozen inputs, stored outputs of the baseline and the candidates) and
returns tidy frames; :func:`write_drilldown_tables` stores them under ``tables/`` with a
provenance file. Nothing here draws: charts come from :mod:`kit.report.charts.comparison`, the
interactive explorer from :mod:`kit.report.widgets`.

Only the run folder is read (its frozen copies are the truth; ``load_frozen`` verifies the
eval set's hash). The inputs' drift check (``compkit check``) guards running models, not
re-reading their stored outputs, so it is not repeated here.

Tables (``runs/NAME/tables/``)
------------------------------
``overall_deltas``     candidates vs baseline over all items (:data:`kit.analysis.compare.RESULT_COLUMNS`)
``slice_table``        the same per value of every slice column (overall rows first)
``flips``              flip counts and rates, overall and per slice (``flip_table``)
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

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from kit.analysis.compare import flip_table, item_flips, noise_floor
from kit.analysis.items import parse_slice, reference_text
from kit.analysis.slices import default_slice_columns, discover_slices, slice_table, worst_slices
from kit.errors import CompkitError
from kit.evalset import EvalSet
from kit.scoring import ScoreSource, label_metrics, metric_columns

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


def run_models(run_dir: str | Path) -> tuple[str, list[str]]:
    """The baseline's name and the candidates with stored outputs, sorted."""
    from kit.stages.freeze import BaselineManifest

    run_dir = Path(run_dir)
    baseline = BaselineManifest.load(run_dir).outputs.model
    folder = run_dir / "outputs"
    names = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    return baseline, [n for n in names if n != baseline]


def load_run_outcomes(run_dir: str | Path, *, sources: Sequence[ScoreSource] = ()) -> pd.DataFrame:
    """Score every stored output of a run with the frozen continuations.

    The outcome table of :func:`kit.scoring.score_outputs` for the baseline and every
    candidate, including ``choice_correct_norm`` (``acc_norm``, which needs the frozen
    continuations) and any extra ``sources`` (review scores, ``evaluate`` scorers).
    """
    from kit.stages.candidates import score_run
    from kit.stages.freeze import load_frozen

    return score_run(load_frozen(run_dir), sources=sources)


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
    run_dir: str | Path,
    *,
    candidate: str,
    k: int = 10,
    slice: str | Mapping[str, str] | None = None,
    outcomes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Items the baseline got right and ``candidate`` got wrong, side by side.

    Parameters
    ----------
    run_dir
        The run folder.
    candidate
        A candidate with stored outputs.
    k
        At most this many items (by item id).
    slice
        Only items in this slice: ``"language=de"``, ``"channel=email & language=de"``
        (the form :func:`kit.analysis.slices.discover_slices` reports) or a mapping.
    outcomes
        An already loaded :func:`load_run_outcomes` table (saves re-scoring).

    Returns
    -------
    DataFrame
        :data:`FAILING_COLUMNS` (+ the slice's columns): input, reference, baseline output
        and candidate output as plain text.
    """
    from kit.stages.candidates import stored_outputs
    from kit.stages.freeze import load_frozen

    frozen = load_frozen(run_dir)
    outcomes = load_run_outcomes(run_dir) if outcomes is None else outcomes
    return side_by_side(
        outcomes,
        stored_outputs(frozen.run_dir),
        frozen.eval_set,
        baseline=frozen.manifest.outputs.model,
        candidate=candidate,
        slices=frozen.slices(),
        k=k,
        slice=slice,
    )


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class DrilldownTables:
    """The drill-down's tidy frames (see the module docstring for each)."""

    overall_deltas: pd.DataFrame
    slice_table: pd.DataFrame
    flips: pd.DataFrame
    noise_floor: pd.DataFrame
    worst_slices: pd.DataFrame
    discovered_slices: pd.DataFrame
    label_metrics: pd.DataFrame

    def frames(self) -> dict[str, pd.DataFrame]:
        """Table name -> frame, in display order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_drilldown_tables(run_dir: str | Path) -> DrilldownTables:
    """Load the tables :func:`write_drilldown_tables` stored under ``run_dir/tables/``.

    Raises
    ------
    CompkitError
        When a table file is missing (run the drill-down first).
    """
    folder = Path(run_dir) / "tables"
    frames = {}
    for f in fields(DrilldownTables):
        path = folder / f"{f.name}.parquet"
        if not path.is_file():
            raise CompkitError(f"{path}: missing; run write_drilldown_tables (notebook 03) first")
        frames[f.name] = pd.read_parquet(path)
    return DrilldownTables(**frames)


def drilldown_frames(
    outcomes: pd.DataFrame,
    slices: pd.DataFrame,
    *,
    baseline: str,
    metric: str = "accuracy",
    n_resamples: int = 1000,
    seed: int = 0,
    min_n: int = 30,
    k: int = 10,
    eval_set: EvalSet | None = None,
) -> DrilldownTables:
    """Every drill-down table from an outcome table and a slices frame.

    Parameters
    ----------
    outcomes
        Outcome table with the baseline and at least one candidate.
    slices
        Slices frame (``id`` + slice columns), e.g. ``FrozenRun.slices()``.
    baseline
        The baseline's model name.
    metric
        Metric ranked by ``worst_slices`` (flips and discovery always use ``correct``).
    n_resamples, seed
        Bootstrap settings shared by every table.
    min_n, k
        Smallest slice ranked by ``worst_slices`` and how many per model; ``k`` is also the
        number of discovered slices per candidate.
    eval_set
        Needed for ``label_metrics`` (empty without it).
    """
    columns = default_slice_columns(slices)
    table = slice_table(
        outcomes,
        slices,
        baseline=baseline,
        slice_columns=columns,
        n_resamples=n_resamples,
        seed=seed,
    )
    merged = outcomes.drop(columns=[c for c in columns if c in outcomes.columns]).join(
        slices.set_index("id")[columns], on="item_id"
    )
    floor = noise_floor(merged, baseline=baseline, by=columns, n_resamples=n_resamples, seed=seed)
    discovered = []
    candidates = [m for m in dict.fromkeys(outcomes["model"]) if m != baseline]
    for model in candidates:
        flags = item_flips(outcomes, baseline=baseline, candidates=model)
        found = discover_slices(flags, slices, columns=columns, k=k)
        discovered.append(found.assign(model=model)[["model", *found.columns]])
    labels = (
        label_metrics(outcomes, eval_set)
        if eval_set is not None
        else pd.DataFrame(columns=["model", "label", "precision", "recall", "f1", "support"])
    )
    return DrilldownTables(
        overall_deltas=table[table["slice"] == "overall"].reset_index(drop=True),
        slice_table=table,
        flips=flip_table(merged, baseline=baseline, by=columns),
        noise_floor=floor,
        worst_slices=worst_slices(table, metric=metric, k=k, min_n=min_n),
        discovered_slices=pd.concat(discovered, ignore_index=True),
        label_metrics=labels,
    )


def drilldown_tables(
    run_dir: str | Path,
    *,
    metric: str = "accuracy",
    n_resamples: int = 1000,
    seed: int = 0,
    min_n: int = 30,
    k: int = 10,
    outcomes: pd.DataFrame | None = None,
) -> DrilldownTables:
    """:func:`drilldown_frames` for a run folder (outcomes from :func:`load_run_outcomes`)."""
    from kit.stages.freeze import load_frozen

    frozen = load_frozen(run_dir)
    outcomes = load_run_outcomes(run_dir) if outcomes is None else outcomes
    return drilldown_frames(
        outcomes,
        frozen.slices(),
        baseline=frozen.manifest.outputs.model,
        metric=metric,
        n_resamples=n_resamples,
        seed=seed,
        min_n=min_n,
        k=k,
        eval_set=frozen.eval_set,
    )


def write_drilldown_tables(
    run_dir: str | Path,
    *,
    metric: str = "accuracy",
    n_resamples: int = 1000,
    seed: int = 0,
    min_n: int = 30,
    k: int = 10,
    outcomes: pd.DataFrame | None = None,
) -> DrilldownTables:
    """Compute :func:`drilldown_tables` and write them to ``run_dir/tables/``.

    Writes ``<name>.parquet`` per table and ``drilldown.json`` (parameters, baseline,
    candidates, kit version and git sha, eval-set hash, sha256 of each file, time).
    Files are replaced atomically; returns the tables.
    """
    from kit.environment import kit_info
    from kit.stages.freeze import load_frozen
    from kit.store import atomic_write_bytes, atomic_write_json, now_iso

    frozen = load_frozen(run_dir)
    tables = drilldown_tables(
        run_dir,
        metric=metric,
        n_resamples=n_resamples,
        seed=seed,
        min_n=min_n,
        k=k,
        outcomes=outcomes,
    )
    folder = frozen.run_dir / "tables"
    files = {}
    for name, frame in tables.frames().items():
        data = frame.to_parquet(index=False)
        atomic_write_bytes(folder / f"{name}.parquet", data)
        files[f"{name}.parquet"] = {"rows": len(frame), "sha256": hashlib.sha256(data).hexdigest()}
    baseline, candidates = run_models(frozen.run_dir)
    atomic_write_json(
        folder / "drilldown.json",
        {
            "kind": "compkit.drilldown",
            "parameters": {
                "metric": metric,
                "n_resamples": n_resamples,
                "seed": seed,
                "min_n": min_n,
                "k": k,
            },
            "baseline": baseline,
            "candidates": candidates,
            "eval_set_sha256": frozen.eval_set.sha256,
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
        return str(params.get("confidence", "auto"))
    return "auto"


def explorer_inputs(
    run_dir: str | Path,
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
    from kit.stages.candidates import stored_outputs
    from kit.stages.freeze import load_frozen

    frozen = load_frozen(run_dir)
    baseline, candidates = run_models(frozen.run_dir)
    if not candidates:
        raise CompkitError(f"{run_dir}: no candidate outputs to explore (run stage 2 first)")
    outcomes = load_run_outcomes(run_dir) if outcomes is None else outcomes
    tables = read_drilldown_tables(run_dir) if tables is None else tables
    outputs = stored_outputs(frozen.run_dir)
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
