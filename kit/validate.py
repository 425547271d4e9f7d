"""Validate everything before writing anything.

:func:`validate_study` is what ``compkit validate`` prints and what ``compkit run`` does
first: the study (keys, runtimes and their options), the eval set, every prompt, the budget
(against the metric registry and the eval set's slices, impossible limits refused) and every
model's source, opened without running it (:meth:`kit.runtimes.base.Runtime.check_source`:
predictions files fully read and matched to the eval set's ids, GGUF files and model folders
present and readable, endpoints reachable and serving the model). A bad input fails in
seconds, naming the model and the file or key, and nothing has been written. A study with
``execution: {engine: ray}`` also has its engine checked (:func:`kit.engines.check_execution`):
Ray installed, the cluster address reachable, a replica's resources available.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kit.engines import check_execution
from kit.errors import CompkitError, Problem, ValidationError
from kit.evalset import EvalSet
from kit.recipes import check_recipe
from kit.runtimes import check_study_runtimes, runtime_class
from kit.stages.freeze import prepare
from kit.study import ModelSpec, Study


@dataclass
class Validated:
    """A study that passed every check, and what was found for each model."""

    study: Study
    eval_set: EvalSet
    sources: dict[str, str] = field(default_factory=dict)
    execution: str | None = None  # the engine, its cluster and replicas (None: local)


def _models(study: Study) -> list[tuple[str, ModelSpec]]:
    return [("baseline", study.baseline)] + [
        (f"candidates.{i}", spec) for i, spec in enumerate(study.candidates)
    ]


def _source_spec(spec: ModelSpec, study: Study) -> ModelSpec:
    """The spec whose files a candidate reads: its recipe's base model for a recipe."""
    if spec.recipe is None:
        return spec
    check_recipe(spec.recipe, runtime=spec.runtime)
    return spec.model_copy(update={"recipe": None})


def check_sources(
    study: Study, eval_set: EvalSet, *, extra_ids: list[str] | None = None
) -> dict[str, str]:
    """Open every model's source (no model runs); one problem per model that fails.

    ``extra_ids`` are the perturbed items' ids (a predictions file must answer them too).

    Raises
    ------
    ValidationError
        Naming each model's key (``candidates.2``) and what is wrong with its source.
    """
    ids = [item.id for item in eval_set] + list(extra_ids or [])
    found, problems = {}, []
    for key, spec in _models(study):
        try:
            runtime = runtime_class(spec.runtime)
            source = _source_spec(spec, study)
            found[spec.name] = runtime.check_source(
                source, base_dir=study.root, ids=ids, repeats=study.repeats
            )
        except ValidationError as exc:
            problems += [
                Problem(p.source, f"{spec.name}: {p.message}", row=p.row, field=p.field)
                for p in exc.problems
            ]
        except CompkitError as exc:
            problems.append(Problem(str(study.source), str(exc), field=key))
    if problems:
        raise ValidationError(f"study {study.source}: model sources", problems)
    return found


def validate_study(study_path: str | Path, *, sources: bool = True) -> Validated:
    """Every check a run needs, before anything is written (see the module docstring).

    Parameters
    ----------
    study_path
        The study YAML.
    sources
        Also open every model's source (default). Off, only the files kit itself reads are
        checked (study, eval set, template, budget).
    """
    study, eval_set, builder, _ = prepare(study_path)
    check_study_runtimes(study)
    found = {}
    if sources:
        found = check_sources(study, eval_set, extra_ids=perturbed_ids(study, builder))
    engine = check_execution(study.execution, source=str(study.source)) if sources else None
    return Validated(study, eval_set, found, engine)


def perturbed_ids(study: Study, builder) -> list[str]:
    """Ids of the study's perturbed items as a runtime without a tokenizer (a predictions
    file) gets them: padding sized by characters / 4, as its freeze would."""
    from kit.execute import prompt_counter
    from kit.runtimes.base import Runtime
    from kit.stages.freeze import study_perturbed

    class _NoTokenizer(Runtime):
        name = "validate"

        def identity(self):  # pragma: no cover - never called
            raise NotImplementedError

        def generate(self, requests, *, sampling, progress=None):  # pragma: no cover
            raise NotImplementedError

    counter = prompt_counter(_NoTokenizer(study.baseline))
    perturbed = study_perturbed(study, builder=builder, count=counter)
    return [] if perturbed is None else [it.id for it in perturbed.items.items]
