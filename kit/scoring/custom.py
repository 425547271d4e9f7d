"""Hugging Face ``evaluate`` modules as custom scorers, loaded from a local path only.

An ``evaluate`` module computes one aggregate over a list of predictions; kit needs a value
per item, so :class:`EvaluateScorer` calls the module once per distinct (prediction,
reference) pair and keeps the number the module reports under ``result_key``. The module's
metric is registered in :data:`kit.metrics.METRICS` with the direction you give, so
comparisons, slices and budget rules treat it like any built-in metric.

Modules are never fetched from the Hub: ``path_or_name`` must be a local module folder
(``<dir>/<dir name>.py``), a local ``.py`` file, or the name of a module shipped in
``kit/scoring/evaluate_modules/`` (:func:`shipped_modules`).

Example
-------
>>> scorer = evaluate_scorer("exact_match_normalized", task="generation",
...                          metric_name="exact_match_normalized",
...                          higher_is_better=True)                       # doctest: +SKIP
>>> outcomes = score_outputs(eval_set, outputs, sources=[scorer])       # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kit.errors import CompkitError, DependencyMissing
from kit.evalset import TASKS, EvalItem, EvalSet
from kit.metrics import MetricSpec, custom_item_metric, register_metric

#: Folder of the ``evaluate`` modules that ship with kit.
SHIPPED_DIR = Path(__file__).resolve().parent / "evaluate_modules"


def shipped_modules() -> list[str]:
    """Names of the ``evaluate`` modules shipped in :data:`SHIPPED_DIR`."""
    return sorted(d.name for d in SHIPPED_DIR.iterdir() if (d / f"{d.name}.py").is_file())


def resolve_module_path(path_or_name: str | Path) -> Path:
    """The local module script ``path_or_name`` refers to.

    Raises
    ------
    CompkitError
        When it is neither a local module (folder with ``<name>.py`` or a ``.py`` file) nor
        a shipped module name. Hub names are refused: kit scores offline.
    """
    path = Path(path_or_name).expanduser()
    if path.is_file() and path.suffix == ".py":
        return path.resolve()
    if path.is_dir() and (path / f"{path.name}.py").is_file():
        return (path / f"{path.name}.py").resolve()
    if path.is_dir():
        raise CompkitError(
            f"{path}: an evaluate module folder must hold {path.name}.py (the layout "
            "evaluate.load expects)"
        )
    shipped = SHIPPED_DIR / str(path_or_name) / f"{path_or_name}.py"
    if str(path_or_name) in shipped_modules():
        return shipped.resolve()
    raise CompkitError(
        f"evaluate module {str(path_or_name)!r} is not a local path; kit loads evaluate modules "
        f"only from disk, never from the Hub. Give a folder holding <name>/<name>.py, a .py "
        f"file, or a shipped module: {shipped_modules()}"
    )


def default_reference(item: EvalItem) -> str | None:
    """The text an item's output is compared with: generation ``reference``,
    classification ``label``, multiple-choice option text, extraction fields as JSON,
    tool call as JSON; ``None`` for refusal items."""
    if item.task == "generation":
        return item.reference
    if item.task == "classification":
        return item.label
    if item.task == "multiple_choice":
        assert item.choices is not None and item.answer is not None
        return item.choices[item.answer]
    if item.task == "extraction":
        return json.dumps(item.fields, ensure_ascii=False, sort_keys=True)
    if item.task == "tool_call":
        return json.dumps(
            {"tool": item.expected_tool, "arguments": item.expected_args},
            ensure_ascii=False,
            sort_keys=True,
        )
    return None


@dataclass(frozen=True, eq=False)
class EvaluateScorer:
    """A :class:`kit.scoring.ScoreSource` backed by a loaded ``evaluate`` module."""

    info: MetricSpec
    module: Any = field(repr=False)
    path: Path
    task: str
    result_key: str
    reference: Callable[[EvalItem], str | None] = field(repr=False)
    compute_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def item_value(self, prediction: str, reference: str) -> float:
        """The module's value for one prediction against one reference."""
        result = self.module.compute(
            predictions=[prediction], references=[reference], **dict(self.compute_kwargs)
        )
        if not isinstance(result, Mapping) or self.result_key not in result:
            raise CompkitError(
                f"evaluate module {self.path} returned {result!r}; expected a dict with "
                f"{self.result_key!r} (set result_key=)"
            )
        return float(result[self.result_key])

    def score(self, eval_set: EvalSet, outputs: pd.DataFrame) -> pd.DataFrame:
        """``model, item_id, repeat, <metric>`` for the scorer's task; failed requests and
        items without a reference get no value (as chrF)."""
        items = {it.id: it for it in eval_set.items if it.task == self.task}
        cache: dict[tuple[str, str], float] = {}
        rows = []
        for rec in outputs.to_dict("records"):
            item = items.get(rec["item_id"])
            if item is None or not _missing(rec.get("error")):
                continue
            reference = self.reference(item)
            if reference is None:
                continue
            key = (rec.get("output") or "", reference)
            if key not in cache:
                cache[key] = self.item_value(*key)
            rows.append((rec["model"], rec["item_id"], int(rec["repeat"]), cache[key]))
        return pd.DataFrame(rows, columns=["model", "item_id", "repeat", self.info.name])


def evaluate_scorer(
    path_or_name: str | Path,
    *,
    task: str,
    metric_name: str,
    higher_is_better: bool,
    description: str | None = None,
    result_key: str | None = None,
    reference: Callable[[EvalItem], str | None] | None = None,
    compute_kwargs: Mapping[str, Any] | None = None,
) -> EvaluateScorer:
    """Load a local ``evaluate`` module and register its metric; returns the scorer.

    Parameters
    ----------
    path_or_name
        A module folder, a module ``.py`` file, or a shipped module name
        (:func:`shipped_modules`). Never a Hub id.
    task
        The task whose items it scores (one of :data:`kit.evalset.TASKS`).
    metric_name
        The outcome column and metric name to register.
    higher_is_better
        The metric's direction, read by comparisons, charts and budget rules.
    description
        Registry description; default: the module's own description.
    result_key
        Key of the module's result dict holding the value; default ``metric_name``, or the
        single key the module returns.
    reference
        Item -> reference text; default :func:`default_reference`.
    compute_kwargs
        Extra keyword arguments for ``module.compute``.

    Returns
    -------
    EvaluateScorer
        Pass it to :func:`kit.scoring.score_outputs` (``sources=[scorer]``) or merge its
        ``score(eval_set, outputs)`` with :func:`kit.scoring.add_scores`.

    Raises
    ------
    CompkitError
        For a non-local module, an unknown task, a name clash in the registry, or a module
        whose result has no usable key.
    """
    if task not in TASKS:
        raise CompkitError(f"task {task!r} is not one of {list(TASKS)}")
    script = resolve_module_path(path_or_name)
    module = _load_module(script)
    probe = module.compute(predictions=["x"], references=["x"], **dict(compute_kwargs or {}))
    key = _result_key(probe, metric_name, result_key, script)
    info = register_metric(
        custom_item_metric(
            metric_name,
            description or _first_line(getattr(module, "description", "")) or script.stem,
            higher_is_better=bool(higher_is_better),
            tasks=(task,),
        )
    )
    return EvaluateScorer(
        info=info,
        module=module,
        path=script,
        task=task,
        result_key=key,
        reference=reference or default_reference,
        compute_kwargs=dict(compute_kwargs or {}),
    )


def _load_module(script: Path) -> Any:
    try:
        import evaluate
    except ImportError:
        raise DependencyMissing("evaluate", "core", "evaluate modules as scorers") from None
    try:
        return evaluate.load(str(script), keep_in_memory=True)
    except Exception as exc:  # evaluate raises many types for broken scripts
        raise CompkitError(f"evaluate module {script} could not be loaded: {exc}") from exc


def _result_key(probe: Any, metric_name: str, result_key: str | None, script: Path) -> str:
    if not isinstance(probe, Mapping):
        raise CompkitError(f"evaluate module {script} returned {probe!r}, not a dict")
    numeric = [k for k, v in probe.items() if isinstance(v, (int, float)) and not math.isnan(v)]
    for key in (result_key, metric_name):
        if key is not None and key in probe:
            return key
    if result_key is None and len(numeric) == 1:
        return numeric[0]
    raise CompkitError(
        f"evaluate module {script} returns keys {sorted(probe)}; name the one to use with "
        f"result_key= (wanted {result_key or metric_name!r})"
    )


def _first_line(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
