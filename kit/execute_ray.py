"""Run one model's plan sharded over Ray actors: one model replica per actor, one shared store.

The ``ray`` engine of :mod:`kit.engines`. Each actor (:class:`ShardReplica`) opens the model
once with the CPU / GPU resources of ``execution.resources``, builds the same
:class:`~kit.execute.RunPlan` as a local run and runs batches into the model's
:class:`~kit.store.OutputStore`, whose appends are safe for several writers.

The driver cuts the plan's keys into exactly the batches a local run makes
(:func:`kit.execute.chunk_keys` over the length-sorted keys, longest prompts first), drops the
keys already stored, and hands the batches out longest first to whichever replica is free,
two in flight per replica. Every replica thus gets long and short prompts interleaved, and a
slow node takes fewer batches instead of holding back the end. Because the batches and the
per-repeat seeds (:func:`kit.runtimes.base.repeat_seed`) are those of a local run, greedy
outputs are the same bytes and sampled outputs use the same seeds.

Failures:

* a bad item becomes an error row with its error class (:func:`kit.execute.run_chunk_isolated`);
* a replica that dies (killed, node lost) or breaks: its batches go back to the queue and the
  other replicas finish them; only when every replica is gone does the run stop;
* a killed driver takes its actors with it; what was stored stays. Rerunning runs only the
  missing keys (each batch skips keys stored meanwhile), so nothing is lost or duplicated.

Only the driver marks the store complete, after every batch is stored and replica 0 (which
alone saves a recipe's model files, so it often loads last) has loaded: a replica that loads
late may run no batch at all, but is never killed mid-save.

A local Ray started here binds 127.0.0.1 only. On a multi-node cluster the run folder must be
on a shared filesystem mounted at the same path on every node (each replica checks this before
loading its model), and the model files must be readable there; the driver's ``kit`` is shipped
to the cluster (``runtime_env.py_modules``) and every replica's output-relevant library versions
must equal the driver's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kit.environment import OUTPUT_LIBRARIES, hardware, library_versions
from kit.errors import CompkitError
from kit.evalset import EvalItem
from kit.execute import RunPlan, RunProgress, chunk_keys, finish_store, run_chunk_isolated
from kit.runtimes.base import Prompt, Runtime
from kit.store import OutputStore, atomic_write_json, pending
from kit.study import ExecutionConfig, ReplicaResources, SamplingConfig

#: Opens one replica's model: ``opener(rank, threads) -> (runtime, footprint)``.
Opener = Callable[[int, int], tuple[Runtime, dict[str, Any]]]
#: Batches in flight per replica: one running, one waiting, so a replica never idles.
IN_FLIGHT = 2
PROBE_FILE = ".ray-run.json"
#: Makes a Ray started here use 127.0.0.1 for every server it starts (read when ray imports).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_loopback_set = False  # this module set it (and may undo it)


@dataclass(frozen=True)
class PlanInputs:
    """What a replica needs to build the plan (:meth:`RunPlan.from_prompts`) but the runtime."""

    model_name: str
    items: Sequence[EvalItem]
    prompts: dict[str, Prompt]
    continuations: dict[str, tuple[str, ...]]
    sampling: SamplingConfig
    repeats: int
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)  # constrained decoding
    structured_output: bool = True
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # task -> token limit


@dataclass
class RayRunResult:
    """A finished sharded run: every stored row, and what ran where."""

    rows: pd.DataFrame
    identity: dict[str, Any]
    footprint: dict[str, Any]
    execution: dict[str, Any]


# --------------------------------------------------------------------------- connecting


def import_ray(*, local: bool) -> Any:
    """Import ray; for a Ray started in this process, make it bind 127.0.0.1 only (and undo
    that before joining a cluster, whose nodes must reach this driver)."""
    global _loopback_set
    if local and _LOOPBACK_ENV not in os.environ:
        os.environ[_LOOPBACK_ENV] = "0"
        _loopback_set = True
    import ray

    constants = ray._private.ray_constants
    if local and os.environ.get(_LOOPBACK_ENV) == "0":
        # ray read the variable when it was first imported; an earlier import missed it
        constants.ENABLE_RAY_CLUSTER = False
    elif not local and _loopback_set and not ray.is_initialized():
        os.environ.pop(_LOOPBACK_ENV, None)
        constants.ENABLE_RAY_CLUSTER = not constants.IS_WINDOWS_OR_OSX
        _loopback_set = False
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: the session this process already has, the cluster at ``address``, or
    a local Ray started here (bound to 127.0.0.1). Shuts down only what it started."""
    if address is not None:
        probe_address(address, key="execution.address")
    ray = import_ray(local=address is None)
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        ray.init(include_dashboard=False, configure_logging=False)
    else:
        import kit

        try:
            ray.init(
                address=address,
                runtime_env={"py_modules": [kit]},  # replicas run this driver's kit
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CompkitError(
                f"execution.address {address!r}: cannot join the Ray cluster: {exc}"
            ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def probe_address(address: str, *, key: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming ``key``, when nothing listens at a ``HOST:PORT`` or
    ``ray://HOST:PORT`` address (``auto`` is left to Ray)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise CompkitError(f"{key} {address!r}: expected 'auto', 'HOST:PORT' or 'ray://HOST:PORT'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise CompkitError(
            f"{key} {address!r}: the Ray cluster is unreachable ({exc}); start it with "
            "`ray start --head` or fix the address"
        ) from None


def actor_options(resources: ReplicaResources) -> dict[str, Any]:
    """``ray.remote(...).options`` for one replica."""
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory_gb is not None:
        options["memory"] = int(resources.memory_gb * 2**30)
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return options


def replicas_that_fit(resources: ReplicaResources, cluster: dict[str, float]) -> int:
    """How many replicas the cluster's resources (``ray.cluster_resources()``) can hold."""
    need = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}
    if resources.memory_gb is not None:
        need["memory"] = resources.memory_gb * 2**30
    fits = [int(cluster.get(name, 0.0) // amount) for name, amount in need.items() if amount > 0]
    return min(fits) if fits else 0


def check_ray(execution: ExecutionConfig, *, source: str) -> str:
    """For ``compkit validate``: join (or describe) the cluster and check a replica fits.

    Raises
    ------
    CompkitError
        The address is unreachable or not a Ray cluster (naming ``execution.address``), or
        the cluster cannot hold one replica (naming ``execution.resources``).
    """
    res = execution.resources
    if execution.address is None:
        import psutil

        cluster = {"CPU": float(psutil.cpu_count() or 1), "memory": psutil.virtual_memory().total}
        if res.num_gpus:
            cluster["GPU"] = float(_local_gpus())
        where = "a local Ray on this machine"
    else:
        with ray_session(execution.address) as ray:
            cluster = dict(ray.cluster_resources())
        where = f"the Ray cluster at {execution.address}"
    fit = replicas_that_fit(res, cluster)
    wanted = _describe_resources(res)
    if fit == 0:
        raise CompkitError(
            f"{source}: execution.resources: {where} cannot hold one replica of {wanted} "
            f"(it has {_describe_cluster(cluster)})"
        )
    note = "" if fit >= execution.workers else f"; only {fit} fit now"
    return (
        f"ray: {execution.workers} replica(s) of {wanted} on {where} "
        f"({_describe_cluster(cluster)}){note}"
    )


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _describe_resources(res: ReplicaResources) -> str:
    parts = [f"{res.num_cpus:g} CPU"]
    if res.num_gpus:
        parts.append(f"{res.num_gpus:g} GPU")
    if res.memory_gb:
        parts.append(f"{res.memory_gb:g} GiB")
    parts += [f"{v:g} {k}" for k, v in res.custom.items()]
    return " + ".join(parts)


def _describe_cluster(cluster: dict[str, float]) -> str:
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    mem = cluster.get("memory", 0) / 2**30
    return f"{cpus:g} CPUs, {gpus:g} GPUs, {mem:.0f} GiB"


# --------------------------------------------------------------------------- the replica


class ShardReplica:
    """One model replica (the body of a Ray actor): opens the model once, then runs batches.

    Parameters
    ----------
    opener
        Opens the model: ``opener(rank, threads) -> (runtime, footprint)``.
    inputs
        The plan's items, prompts, continuations, sampling and repeats.
    store_root, token
        The model's store, and the token the driver wrote to its probe file there.
    """

    def __init__(
        self,
        opener: Opener,
        inputs: PlanInputs,
        store_root: str,
        token: str,
        *,
        rank: int,
        threads: int,
        score_choices: bool,
    ):
        _check_shared_folder(store_root, token)
        self.runtime, self.footprint = opener(rank, threads)
        self.plan = RunPlan.from_prompts(
            model_name=inputs.model_name,
            items=inputs.items,
            prompts=inputs.prompts,
            continuations=inputs.continuations,
            runtime=self.runtime,
            sampling=inputs.sampling,
            repeats=inputs.repeats,
            schemas=inputs.schemas,
            structured_output=inputs.structured_output,
        )
        self.plan.max_new_tokens = dict(inputs.max_new_tokens)
        self.plan.score_choices = score_choices and self.runtime.supports_choice_scoring
        self.runtime.expect_ids([it.id for it in inputs.items], repeats=inputs.repeats)
        self.store = OutputStore(store_root)
        self.rank = rank

    def describe(self) -> dict[str, Any]:
        """The plan's key order (and its digest), the batch size, and what runs where."""
        keys = self.plan.keys()
        return {
            "rank": self.rank,
            "keys": keys,
            "keys_sha256": hashlib.sha256(json.dumps(keys).encode()).hexdigest(),
            "batch_size": self.runtime.spec.batch_size,
            "identity": asdict(self.runtime.identity()),
            "footprint": self.footprint,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "hardware": hardware().model_dump(),
            "libraries": library_versions(OUTPUT_LIBRARIES),
        }

    def run_batch(self, batch: list[tuple[str, int]]) -> int:
        """Run the keys of ``batch`` not stored yet and store their rows; returns how many ran."""
        done = self.store.done_keys(refresh=True)
        todo = [tuple(k) for k in batch if tuple(k) not in done]
        if todo:
            frame = run_chunk_isolated(self.runtime, self.plan, todo)
            self.store.append(frame, skip_stored=True)
        return len(todo)

    def close(self) -> None:
        self.runtime.close()


def _check_shared_folder(store_root: str, token: str) -> None:
    try:
        seen = json.loads((Path(store_root) / PROBE_FILE).read_text("utf-8"))["token"]
    except (OSError, ValueError, KeyError):
        seen = None
    if seen != token:
        raise CompkitError(
            f"replica on node {socket.gethostname()}: the run folder's store {store_root} is not "
            "visible here; on a multi-node cluster put the run folder on a shared filesystem "
            "mounted at the same path on every node"
        )


# --------------------------------------------------------------------------- the driver


@dataclass
class _Replica:
    rank: int
    actor: Any
    info: dict[str, Any] | None = None  # describe() once loaded
    in_flight: int = 0
    alive: bool = True
    error: str | None = None
    batches: int = 0


@dataclass
class _Schedule:
    """Batches waiting (longest prompts first), and which replica runs which."""

    replicas: list[_Replica]
    queue: deque[list[tuple[str, int]]] = field(default_factory=deque)
    waiting: dict[Any, tuple[_Replica, list[tuple[str, int]] | None]] = field(default_factory=dict)
    keys: list[tuple[str, int]] | None = None  # plan order, from the first replica loaded

    def alive(self) -> list[_Replica]:
        return [r for r in self.replicas if r.alive]

    def feed(self) -> None:
        for r in self.alive():
            while r.info is not None and self.queue and r.in_flight < IN_FLIGHT:
                batch = self.queue.popleft()
                self.waiting[r.actor.run_batch.remote(batch)] = (r, batch)
                r.in_flight += 1

    def busy(self) -> bool:
        return bool(self.queue) or any(b is not None for _, b in self.waiting.values())


def run_model_on_ray(
    *,
    opener: Opener,
    inputs: PlanInputs,
    store: OutputStore,
    execution: ExecutionConfig,
    score_choices: bool = True,
    progress: bool = True,
) -> RayRunResult:
    """Run every pending (item, repeat) of a model over ``execution.workers`` Ray replicas.

    Parameters
    ----------
    opener
        Opens one replica's model in its actor: ``opener(rank, threads) -> (runtime,
        footprint)``; it is pickled to the cluster, so it must be a module-level function or
        a ``functools.partial`` of one.
    inputs
        The plan's items, prompts, continuations, sampling and repeats.
    store
        The model's store; only this driver marks it complete, after every batch is stored.
    execution
        ``engine: ray``: address, workers, per-replica resources, start timeout.

    Returns
    -------
    Every stored row, the replicas' model identity and footprint, and the execution record
    (replicas, nodes, failures) for the candidate manifest.
    """
    token = secrets.token_hex(8)
    atomic_write_json(store.root / PROBE_FILE, {"token": token})
    try:
        with ray_session(execution.address) as ray:
            replicas, sched = _start_replicas(
                ray, opener, inputs, store, execution, token, score_choices=score_choices
            )
            try:
                _await_replica(ray, sched, store, inputs, execution)
                total = len(sched.keys or ())
                left = sum(map(len, sched.queue))
                with RunProgress(
                    inputs.model_name, total=total, initial=total - left, enabled=progress
                ) as bar:
                    _run_batches(ray, sched, store, inputs, execution, bar)
                _await_saver(ray, sched, store, inputs, execution)
            finally:
                _stop(ray, replicas)
    finally:
        (store.root / PROBE_FILE).unlink(missing_ok=True)
    rows = finish_store(store, model=inputs.model_name, repeats=inputs.repeats)
    first = next(r.info for r in replicas if r.info is not None)  # replica 0's, when it loaded
    return RayRunResult(rows, first["identity"], first["footprint"], _record(execution, replicas))


def _start_replicas(ray, opener, inputs, store, execution, token, *, score_choices):
    cluster = dict(ray.cluster_resources())
    fit = replicas_that_fit(execution.resources, cluster)
    wanted = _describe_resources(execution.resources)
    if fit == 0:
        raise CompkitError(
            f"execution.resources: the Ray cluster cannot hold one replica of {wanted} "
            f"(it has {_describe_cluster(cluster)})"
        )
    if fit < execution.workers:
        print(
            f"{inputs.model_name}: the cluster holds {fit} of {execution.workers} replicas of "
            f"{wanted} now; the others start if resources free up or are added",
            flush=True,
        )
    actor_cls = ray.remote(ShardReplica)
    threads = max(1, int(execution.resources.num_cpus))
    inputs_ref = ray.put(inputs)
    replicas = [
        _Replica(
            rank,
            actor_cls.options(**actor_options(execution.resources)).remote(
                opener,
                inputs_ref,
                str(store.root.resolve()),  # the same path on every node (shared filesystem)
                token,
                rank=rank,
                threads=threads,
                score_choices=score_choices,
            ),
        )
        for rank in range(execution.workers)
    ]
    sched = _Schedule(replicas)
    for r in replicas:
        sched.waiting[r.actor.describe.remote()] = (r, None)
    return replicas, sched


def _await_replica(ray, sched: _Schedule, store: OutputStore, inputs: PlanInputs, execution):
    """Wait until a replica has loaded its model (at the start, or after every loaded one
    stopped); the first one loaded tells the plan's batches."""
    deadline = time.monotonic() + execution.start_timeout_s
    while not any(r.info is not None for r in sched.alive()):
        if not sched.alive():
            raise _all_failed(sched, store, inputs)
        if time.monotonic() > deadline:
            raise CompkitError(
                f"{inputs.model_name}: no replica was placed and loaded within "
                f"{execution.start_timeout_s:g}s (execution.start_timeout_s); each needs "
                f"{_describe_resources(execution.resources)}"
            )
        _step(ray, sched, store, inputs)


def _run_batches(ray, sched: _Schedule, store: OutputStore, inputs: PlanInputs, execution, bar):
    """Hand out batches until every one is stored; replicas that fail are dropped."""
    sched.feed()
    while sched.busy():
        if not any(r.info is not None for r in sched.alive()):
            _await_replica(ray, sched, store, inputs, execution)
        bar.update(_step(ray, sched, store, inputs))
        sched.feed()


def _await_saver(ray, sched: _Schedule, store: OutputStore, inputs: PlanInputs, execution):
    """After the last batch, wait (within ``execution.start_timeout_s``) for replica 0 to finish
    loading: it alone saves the recipe's model files and its footprint (with their size on
    disk) is the run's record, so a replica 0 that started late (saving takes time; the other
    replicas may have run every batch meanwhile) must not be killed mid-save or left out."""
    saver = sched.replicas[0]
    deadline = time.monotonic() + execution.start_timeout_s
    while saver.alive and saver.info is None and time.monotonic() < deadline:
        _step(ray, sched, store, inputs)
    if saver.alive and saver.info is None:
        print(
            f"{inputs.model_name}: replica 0 did not load within {execution.start_timeout_s:g}s "
            "(execution.start_timeout_s); its model files are not saved and the footprint "
            "has no size on disk",
            flush=True,
        )


def _step(ray, sched: _Schedule, store: OutputStore, inputs: PlanInputs) -> int:
    """Settle what finished within a second; returns the keys newly stored."""
    ready, _ = ray.wait(list(sched.waiting), num_returns=1, timeout=1.0)
    stored = 0
    for ref in ready:
        replica, batch = sched.waiting.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            _drop(ray, sched, replica, exc, batch, model=inputs.model_name)
            continue
        if batch is None:
            _loaded(ray, sched, replica, result, store, model=inputs.model_name)
        else:
            replica.in_flight -= 1
            replica.batches += 1
            stored += len(batch)
    return stored


def _loaded(ray, sched: _Schedule, replica: _Replica, info, store: OutputStore, *, model) -> None:
    """A replica loaded its model: check it matches the driver, then give it work."""
    here = library_versions(OUTPUT_LIBRARIES)
    differ = {k: (v, here.get(k)) for k, v in info["libraries"].items() if here.get(k) != v}
    first = next((r.info for r in sched.replicas if r.info is not None), None)
    if differ or (first is not None and first["keys_sha256"] != info["keys_sha256"]):
        why = (
            "library versions differ from the driver's: "
            + ", ".join(f"{k} {a} (here {b})" for k, (a, b) in differ.items())
            if differ
            else "its plan's key order differs from the first replica's (another tokenizer?)"
        )
        _drop(ray, sched, replica, CompkitError(f"node {info['node']}: {why}"), None, model=model)
        return
    replica.info = info
    if sched.keys is None:
        sched.keys = [tuple(k) for k in info["keys"]]
        done = store.done_keys(refresh=True)
        batches = chunk_keys(sched.keys, info["batch_size"])  # the batches of a local run
        sched.queue.extend(b for b in (pending(b, done) for b in batches) if b)


def _drop(ray, sched: _Schedule, replica: _Replica, exc, batch, *, model) -> None:
    """Stop using a replica that died or failed; its batch goes back to the front."""
    if batch is not None:
        sched.queue.appendleft(batch)
        replica.in_flight -= 1
    if not replica.alive:
        return
    replica.alive, replica.error = False, _reason(exc)
    with contextlib.suppress(Exception):
        ray.kill(replica.actor, no_restart=True)
    left = len(sched.alive())
    print(
        f"{model}: replica {replica.rank} stopped ({replica.error}); "
        f"{left} replica(s) carry on with its batches",
        flush=True,
    )


def _reason(exc: BaseException) -> str:
    """The useful line of a Ray error: the exception raised in the actor, if any."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _reason(cause)
    if not isinstance(exc, ray_error_types()):
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    tail = [ln for ln in lines if "Error" in ln.split(":")[0]]
    return (tail[-1] if tail else lines[0] if lines else type(exc).__name__).strip()[:500]


def ray_error_types() -> tuple[type, ...]:
    import ray

    return (ray.exceptions.RayError,)


def _all_failed(sched: _Schedule, store: OutputStore, inputs: PlanInputs) -> CompkitError:
    stored = len(store.done_keys(refresh=True))
    total = len(inputs.items) * inputs.repeats
    reasons = "\n".join(f"  - replica {r.rank}: {r.error}" for r in sched.replicas if r.error)
    return CompkitError(
        f"{inputs.model_name}: every Ray replica stopped; {stored} of {total} rows are stored "
        f"and kept; fix the cause and rerun to resume:\n{reasons}"
    )


def _stop(ray, replicas: list[_Replica]) -> None:
    """Release every replica's model, then its actor (also when the run failed)."""
    closing = [r.actor.close.remote() for r in replicas if r.alive and r.info is not None]
    with contextlib.suppress(Exception):
        ray.wait(closing, num_returns=len(closing), timeout=30)
    for r in replicas:
        with contextlib.suppress(Exception):
            ray.kill(r.actor, no_restart=True)


def _record(execution: ExecutionConfig, replicas: list[_Replica]) -> dict[str, Any]:
    """The candidate manifest's account of the run: settings, replicas, nodes, failures."""
    return {
        **execution.model_dump(mode="json"),
        "replicas": [
            {
                "rank": r.rank,
                "node": (r.info or {}).get("node"),
                "hardware": (r.info or {}).get("hardware"),
                "batches": r.batches,
                "error": r.error,
            }
            for r in replicas
        ],
    }
