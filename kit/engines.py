"""Execution engines: where a model's run plan executes. Registry of names and metadata.

``local`` runs the plan in this process (:func:`kit.execute.run_model`), as every study without
an ``execution:`` key does. ``ray`` shards the plan over Ray actors, one model replica per actor
(:func:`kit.execute_ray.run_model_on_ray`), writing to the same crash-safe store with the same
requests and seeds, so the run folder and the verdict do not depend on the engine.

Nothing here imports an engine: ``import kit`` and local runs never import ray. The CLI's
``--ray [ADDRESS]`` and ``--workers N`` override the study's ``execution:`` key
(:func:`resolve_execution`).

Example::

    execution: {engine: ray, workers: 4, resources: {num_cpus: 4, num_gpus: 1}}
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kit.errors import CompkitError, DependencyMissing

if TYPE_CHECKING:
    from kit.study import ExecutionConfig


@dataclass(frozen=True)
class EngineInfo:
    """An engine's metadata; ``target`` is ``module:function`` running one model's plan."""

    name: str
    target: str | None  # None: the local path of kit.execute
    description: str
    requires: str | None  # top-level module that must be importable
    extra: str | None  # pip extra that provides it
    check: str | None = None  # "module:function" checking a config before anything runs


ENGINES: dict[str, EngineInfo] = {
    "local": EngineInfo(
        name="local",
        target=None,
        description="this process, one model replica (kit.execute.run_model)",
        requires=None,
        extra=None,
    ),
    "ray": EngineInfo(
        name="ray",
        target="kit.execute_ray:run_model_on_ray",
        description="Ray actors, one model replica each (CPU/GPU resources per replica), "
        "on a local Ray or an existing cluster; in-process runtimes only",
        requires="ray",
        extra="ray",
        check="kit.execute_ray:check_ray",
    ),
}


def engine_module(name: str, *, purpose: str) -> None:
    """Raise :class:`~kit.errors.DependencyMissing` (naming the extra) when ``name`` cannot
    be imported here."""
    info = ENGINES[name]
    if info.requires is None:
        return
    try:
        importlib.import_module(info.requires)
    except ImportError:
        raise DependencyMissing(info.requires, info.extra or "core", purpose) from None


def resolve_execution(
    configured: ExecutionConfig, *, ray: str | bool | None = None, workers: int | None = None
) -> ExecutionConfig:
    """The execution a run uses: the study's, overridden by the command line.

    Parameters
    ----------
    configured
        The study's ``execution:`` (local when the key is absent).
    ray
        ``--ray``: ``True`` for Ray at the study's address (or a local Ray), a string for an
        address; ``None`` keeps the study's engine.
    workers
        ``--workers``: replicas, overriding ``execution.workers``.
    """
    update: dict[str, object] = {}
    if ray is not None and ray is not False:
        update["engine"] = "ray"
        if isinstance(ray, str):
            update["address"] = ray
    if workers is not None:
        if workers < 1:
            raise CompkitError(f"--workers {workers}: give at least one replica")
        update["workers"] = workers
    return configured.model_copy(update=update) if update else configured


def check_execution(execution: ExecutionConfig, *, source: str) -> str | None:
    """Check an engine before anything runs (Ray installed, the cluster reachable and able to
    place a replica); returns a line describing it, ``None`` for the local engine.

    Raises
    ------
    CompkitError
        Naming the key (``execution.address``), the value and what to do.
    """
    info = ENGINES[execution.engine]
    if info.check is None:
        return None
    engine_module(execution.engine, purpose=f"{source}: execution.engine {execution.engine!r}")
    module_name, func = info.check.split(":")
    return getattr(importlib.import_module(module_name), func)(execution, source=source)
