"""Runtime registry: name -> where the class lives, plus metadata.

Classes are imported only when used, so ``import kit`` never loads torch or llama_cpp,
and a missing optional dependency produces a message naming the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kit.errors import CompkitError, DependencyMissing, Problem, ValidationError

if TYPE_CHECKING:
    from pathlib import Path

    from kit.runtimes.base import Runtime
    from kit.study import ModelSpec, Study


Options = dict[str, type | tuple[type, ...]]
#: Read by callers (progress bars), accepted by every runtime.
_COMMON: Options = {"progress": (bool, int, float, str, type(None))}


@dataclass(frozen=True)
class RuntimeInfo:
    """A runtime's metadata; ``options`` are the ``spec.options`` keys it reads and their types
    (any other key is refused with a "did you mean")."""

    name: str
    target: str  # "module:Class"
    description: str
    requires: str  # top-level module that must be importable
    extra: str  # pip extra that provides it
    logprobs: bool  # can report token logprobs / score choices
    in_process: bool
    options: Options = field(default_factory=lambda: dict(_COMMON))
    #: the option that sets the runtime's CPU threads (a Ray replica sets it to its cores
    #: unless the study does); ``None``: the runtime follows ``OMP_NUM_THREADS``
    threads_option: str | None = None


RUNTIMES: dict[str, RuntimeInfo] = {
    "transformers": RuntimeInfo(
        name="transformers",
        target="kit.runtimes.hf:TransformersRuntime",
        description="Hugging Face transformers in this process (CPU or CUDA); HF folders, "
        "GGUF via gguf_file, or builtin:<name> models",
        requires="transformers",
        extra="core",
        logprobs=True,
        in_process=True,
        options={"prompt_cache": bool, **_COMMON},
    ),
    "llamacpp": RuntimeInfo(
        name="llamacpp",
        target="kit.runtimes.llamacpp:LlamaCppRuntime",
        description="llama.cpp in this process (llama_cpp.Llama) for GGUF files",
        requires="llama_cpp",
        extra="llamacpp",
        logprobs=True,
        in_process=True,
        options={
            "n_ctx": int,
            "n_threads": int,
            "n_batch": int,
            "n_gpu_layers": int,
            "extra_buffers": bool,
            "verbose": bool,
            "teacher_forcing": str,
            "prompt_cache": bool,
            **_COMMON,
        },
        threads_option="n_threads",
    ),
    "openai": RuntimeInfo(
        name="openai",
        target="kit.runtimes.openai:OpenAIRuntime",
        description="any OpenAI-compatible server (/v1/chat/completions, /v1/completions): "
        "vLLM, TGI, llama.cpp server, Ollama",
        requires="httpx",
        extra="core",
        logprobs=True,
        in_process=False,
        options={
            "concurrency": int,
            "timeout_s": (int, float),
            "connect_timeout_s": (int, float),
            "max_retries": int,
            "backoff_s": (int, float),
            "backoff_max_s": (int, float),
            "logprobs": bool,
            "stream": bool,
            "neutral_sampling": bool,
            "extra_body": dict,
            "response_format": str,
            **_COMMON,
        },
    ),
    "predictions": RuntimeInfo(
        name="predictions",
        target="kit.runtimes.predictions:PredictionsRuntime",
        description="a JSONL file of predictions made elsewhere (id, output[, confidence, latency])",
        requires="pandas",
        extra="core",
        logprobs=False,
        in_process=False,
    ),
}


def runtime_class(name: str) -> type[Runtime]:
    """Import and return the runtime class registered as ``name``."""
    if name not in RUNTIMES:
        raise CompkitError(f"unknown runtime {name!r}; available: {sorted(RUNTIMES)}")
    info = RUNTIMES[name]
    try:
        importlib.import_module(info.requires)
    except ImportError:
        raise DependencyMissing(info.requires, info.extra, f"runtime {name!r}") from None
    module_name, cls_name = info.target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def open_runtime(spec: ModelSpec, *, base_dir: Path | None = None) -> Runtime:
    """Instantiate the runtime a model spec names (loads the model)."""
    return runtime_class(spec.runtime)(spec, base_dir=base_dir)


def with_threads(spec: ModelSpec, threads: int) -> ModelSpec:
    """``spec`` running on ``threads`` CPU threads, unless its options already say how many."""
    option = RUNTIMES[spec.runtime].threads_option if spec.runtime in RUNTIMES else None
    if option is None or option in spec.options:
        return spec
    return spec.model_copy(update={"options": {**spec.options, option: threads}})


def check_study_runtimes(study: Study) -> None:
    """Every model of ``study`` names a registered runtime and only options it reads; else one
    problem per model key.

    Raises
    ------
    ValidationError
        Naming the key (``candidates.1.runtime``), the unknown name, a close match and the
        available runtimes.
    """
    import difflib

    models = [("baseline", study.baseline)] + [
        (f"candidates.{i}", spec) for i, spec in enumerate(study.candidates)
    ]
    problems = []
    for key, spec in models:
        if spec.runtime in RUNTIMES:
            problems += option_problems(spec, key=key, source=str(study.source))
            continue
        close = difflib.get_close_matches(spec.runtime, list(RUNTIMES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(
            Problem(
                str(study.source),
                f"unknown runtime {spec.runtime!r}{hint}; available: {sorted(RUNTIMES)}",
                field=f"{key}.runtime",
            )
        )
    if problems:
        raise ValidationError(f"study {study.source}", problems)


def option_problems(spec: ModelSpec, *, key: str, source: str) -> list[Problem]:
    """Unknown ``spec.options`` keys (with a close match) and values of the wrong type."""
    import difflib

    info = RUNTIMES.get(spec.runtime)
    if info is None:
        return []
    problems = []
    for name, value in spec.options.items():
        if name not in info.options:
            known = sorted(k for k in info.options if k != "progress")
            close = difflib.get_close_matches(name, list(info.options), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                Problem(
                    source,
                    f"unknown option {name!r}{hint}; the {spec.runtime} runtime reads "
                    f"{known or 'no options'}",
                    field=f"{key}.options.{name}",
                )
            )
            continue
        allowed = info.options[name]
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(t.__name__ for t in allowed)
            problems.append(
                Problem(source, f"expected {names}, got {value!r}", field=f"{key}.options.{name}")
            )
    return problems
