"""``compkit new``: a user's own study in one command.

:func:`new_study` writes ``study.yaml``, ``prompt.jinja`` and ``budget.yaml`` into a new
folder from the templates in ``templates/new_study/`` (the budget lists the demo's example
rules commented out), then validates them exactly as ``compkit validate`` does
(:func:`kit.stages.freeze.prepare`: the eval set, every rendered prompt, every budget rule).
It never overwrites a file, and when validation fails it removes what it wrote, so nothing
half-written stays behind.

Example
-------
>>> new_study("my-study", eval_set="data/my.jsonl", baseline="builtin:smollm2-135m-instruct")
...                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.errors import CompkitError

FILES = ("study.yaml", "prompt.jinja", "budget.yaml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class NewStudy:
    """What :func:`new_study` wrote and the command that runs it."""

    folder: Path
    study: Path
    files: tuple[Path, ...]
    next_command: str


def infer_runtime(model: str) -> str:
    """The runtime a model reference implies: ``*.gguf`` -> llamacpp, ``*.jsonl`` ->
    predictions, ``http(s)://`` -> openai (not allowed without a served name), else
    transformers (``builtin:<name>`` or an HF folder)."""
    lowered = model.lower()
    if lowered.startswith(("http://", "https://")):
        raise CompkitError(
            f"--baseline {model!r} is a URL: give the served model's name and --runtime openai "
            "(then set `endpoint:` in study.yaml)"
        )
    if lowered.endswith(".gguf"):
        return "llamacpp"
    if lowered.endswith(".jsonl"):
        return "predictions"
    return "transformers"


def _model_name(model: str) -> str:
    stem = Path(model.removeprefix("builtin:")).name
    stem = re.sub(r"\.(gguf|jsonl)$", "", stem, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:48]
    return name or "baseline"


def _relative(target: Path, folder: Path) -> str:
    """``target`` relative to ``folder`` when it is nearby (at most one level up), else
    absolute: a study moved with its folder keeps working either way."""
    relative = Path(os.path.relpath(target.resolve(), folder.resolve())).as_posix()
    return relative if not relative.startswith("../..") else target.resolve().as_posix()


def _flow(mapping: dict[str, Any]) -> str:
    """A YAML flow mapping in the given key order (values JSON-encoded, which YAML reads)."""
    import json

    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in mapping.items()) + "}"


def _spec(model: str, runtime: str, folder: Path) -> dict[str, Any]:
    from kit.runtimes import RUNTIMES

    if runtime not in RUNTIMES:
        raise CompkitError(f"--runtime {runtime!r} is not one of {sorted(RUNTIMES)}")
    ref = model
    if runtime != "openai" and not model.startswith("builtin:"):
        path = Path(model).expanduser()
        if not path.exists():
            raise CompkitError(f"--baseline {model}: no such file or folder")
        ref = _relative(path, folder)
    if model.startswith("builtin:"):
        from kit.models import BUILTIN_MODELS

        if model.removeprefix("builtin:") not in BUILTIN_MODELS:
            raise CompkitError(
                f"--baseline {model}: unknown builtin model; available: "
                f"{['builtin:' + n for n in BUILTIN_MODELS]}"
            )
    return {"name": _model_name(model), "runtime": runtime, "model": ref}


def _candidates(baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """A first candidate compkit can make itself from the baseline, where it can."""
    base, runtime = baseline["name"], baseline["runtime"]
    if runtime == "transformers":
        return [{**baseline, "name": f"{base}-int8-dynamic", "recipe": "int8_dynamic"}]
    if runtime == "llamacpp":
        recipe = {"name": "gguf_requant", "params": {"type": "Q4_0"}}
        return [{**baseline, "name": f"{base}-q4_0", "recipe": recipe}]
    return []


def _render(name: str, context: dict[str, Any]) -> str:
    import jinja2

    from kit.resources import templates_dir

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "new_study")),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML and Jinja text, not HTML; values go through tojson / flow
    )
    env.filters["flow"] = _flow
    return env.get_template(name).render(**context)


def new_study(
    name: str,
    *,
    eval_set: str | Path,
    baseline: str,
    runtime: str | None = None,
    folder: str | Path | None = None,
    task: str | None = None,
) -> NewStudy:
    """Write and validate a new study folder.

    Parameters
    ----------
    name
        The study's name (letters, digits, ``._-``); also the folder's default name.
    eval_set
        The eval-set file (JSONL, CSV, Parquet or a ``datasets`` folder); referenced by a
        path relative to the study, never copied.
    baseline
        The original model: ``builtin:<name>``, an HF folder, a GGUF file, a predictions
        JSONL, or a served model name with ``runtime="openai"``.
    runtime
        Default: :func:`infer_runtime`.
    folder
        Where to write (default ``./<name>``); must not hold any of :data:`FILES`.
    task
        The task of eval rows without a ``task`` column.

    Raises
    ------
    CompkitError
        A bad name, a missing eval set or model, a file that exists, or a study that does
        not validate (then nothing written is left behind).
    """
    if not _NAME.match(name):
        raise CompkitError(
            f"study name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (start with a "
            "letter or digit)"
        )
    folder = Path(folder if folder is not None else name).expanduser()
    source = Path(eval_set).expanduser()
    if not source.exists():
        raise CompkitError(f"--eval-set {eval_set}: no such file or folder")
    existing = [folder / f for f in FILES if (folder / f).exists()]
    if existing:
        raise CompkitError(
            f"{', '.join(map(str, existing))} already exist(s); compkit new never overwrites: "
            "pick another NAME or --dir"
        )
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        spec = _spec(baseline, runtime or infer_runtime(baseline), folder)
        context = {
            "name": name,
            "study_file": (folder / "study.yaml").as_posix(),
            "eval_set": _relative(source, folder),
            "task": task,
            "baseline": {"name": spec["name"], "spec": spec},
            "candidates": _candidates(spec),
            "study_name": name,
        }
        texts = {
            "study.yaml": _render("study.yaml.j2", context),
            "prompt.jinja": _render("prompt.jinja", context),
            "budget.yaml": _render("budget.yaml.j2", context),
        }
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return _write_and_validate(folder, texts, created=created)


def _write_and_validate(folder: Path, texts: dict[str, str], *, created: bool) -> NewStudy:
    from kit.stages.freeze import prepare

    written: list[Path] = []
    try:
        for file, text in texts.items():
            path = folder / file
            with open(path, "x", encoding="utf-8") as f:  # "x": never overwrite, even racing
                f.write(text)
            written.append(path)
        study, *_ = prepare(folder / "study.yaml")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    study_file = folder / "study.yaml"
    command = f"compkit run {study_file.as_posix()} --out runs/{study.name}"
    return NewStudy(folder, study_file, tuple(written), command)
