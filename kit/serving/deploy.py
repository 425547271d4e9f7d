"""Deploy a model the way it will run, from the ``serving:`` block of its spec.

:func:`plan_deploy` checks everything that can be checked before anything starts (the GGUF
exists, a fixed port is free, an endpoint answers), so a bad study fails at once with a
:class:`~kit.errors.CompkitError` naming the model and the key. :func:`deploy` then yields a
:class:`Deployment`, stopped on the way out whatever happens:

``llamacpp_server``
    :class:`~kit.serving.servers.LlamaCppServer` with the model's GGUF (for a
    ``gguf_requant`` candidate the file stage 2 made in ``runs/NAME/models/``), served under
    the model's name; cold start measured.
``openai``
    an existing endpoint; kit sends traffic only (no cold start, no memory figure unless the
    server runs on this machine and ``serving`` names nothing to sample).
``transformers``
    the model in this process (its recipe applied as in stage 2); cold start = load time +
    one-token generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kit.errors import CompkitError
from kit.models import BUILTIN_PREFIX, builtin_gguf_path, locate_gguf
from kit.runtimes.base import GenerationRequest, Prompt, Runtime
from kit.runtimes.openai import OpenAIRuntime, endpoint_urls
from kit.serving.resources import size_on_disk
from kit.serving.servers import ColdStart, LlamaCppServer, port_in_use
from kit.study import ModelSpec, SamplingConfig, ServingDeploy, Study


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class DeployPlan:
    """A model's checked deployment: kind, files, endpoint, threads."""

    spec: ModelSpec
    kind: str
    deploy: ServingDeploy
    gguf: Path | None = None
    endpoint: str | None = None
    served_model: str | None = None
    threads: int = 1

    def describe(self) -> dict[str, Any]:
        return {
            "deploy": self.kind,
            "gguf": str(self.gguf) if self.gguf else None,
            "endpoint": self.endpoint,
            "served_model": self.served_model,
            "threads": self.threads if self.kind != "openai" else None,
            "settings": self.deploy.model_dump(mode="json"),
        }


def plan_deploy(spec: ModelSpec, study: Study, *, run_dir: Path) -> DeployPlan:
    """Check and resolve a model's ``serving:`` block (see module docstring).

    Raises
    ------
    CompkitError
        No serving block, a missing model file, a fixed port in use, an unreachable
        endpoint; the message names the model and the key.
    """
    block = spec.serving
    if block is None:
        raise CompkitError(
            f"model {spec.name!r} has no serving: block; add `serving: {{}}` to it to serve it "
            f"the default way for runtime {spec.runtime!r}"
        )
    kind = block.resolved(spec)
    threads = block.threads or usable_cores()
    if kind == "llamacpp_server":
        if block.port is not None and port_in_use(block.port):
            raise CompkitError(
                f"model {spec.name!r}: serving.port {block.port} is already in use on 127.0.0.1; "
                "choose another port or leave it out to use a free one"
            )
        try:
            gguf = _gguf(spec, study, run_dir)
        except CompkitError as exc:
            if str(exc).startswith(f"model {spec.name!r}"):
                raise
            raise CompkitError(f"model {spec.name!r} (serving): {exc}") from None
        return DeployPlan(spec, kind, block, gguf=gguf, threads=threads)
    if kind == "openai":
        endpoint = block.endpoint or spec.endpoint
        _check_reachable(spec, str(endpoint))
        return DeployPlan(
            spec, kind, block, endpoint=endpoint, served_model=block.served_model or spec.model
        )
    return DeployPlan(spec, kind, block, threads=threads)


def _gguf(spec: ModelSpec, study: Study, run_dir: Path) -> Path:
    if spec.recipe is None:
        return locate_gguf(spec, study.root)
    if spec.recipe.name != "gguf_requant":
        raise CompkitError(
            f"model {spec.name!r}: recipe {spec.recipe.name!r} cannot be served by llama.cpp"
        )
    source = (
        builtin_gguf_path(spec.model.removeprefix(BUILTIN_PREFIX))
        if spec.model.startswith(BUILTIN_PREFIX)
        else locate_gguf(spec.model_copy(update={"recipe": None}), study.root)
    )
    qtype = str(spec.recipe.params.get("type", "")).upper()
    made = run_dir / "models" / f"{source.stem}.{qtype}.gguf"
    if not made.is_file():
        raise CompkitError(
            f"model {spec.name!r}: the requantized GGUF {made} does not exist yet; run stage "
            "candidates first (`compkit candidates`), which makes it"
        )
    return made


def _check_reachable(spec: ModelSpec, endpoint: str) -> None:
    base, _ = endpoint_urls(endpoint)
    try:
        httpx.get(f"{base}/models", timeout=5.0)
    except httpx.HTTPError as exc:
        raise CompkitError(
            f"model {spec.name!r}: the endpoint {base} (serving.endpoint) is unreachable: "
            f"{type(exc).__name__}: {exc}. Start the server, or fix the URL."
        ) from None


# --------------------------------------------------------------------------- deployments


@dataclass
class Deployment:
    """A running model: an HTTP target (``runtime`` an OpenAIRuntime) or one in process."""

    plan: DeployPlan
    runtime: Runtime
    pid: int | None
    cold_start: ColdStart | None = None
    size_on_disk_bytes: int | None = None
    server: LlamaCppServer | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def in_process(self) -> bool:
        return self.plan.kind == "transformers"

    def alive(self) -> str | None:
        """None while the model can serve; else why it cannot: kit's server exited, or an
        endpoint no longer answers ``/v1/models`` (asked only after a failed request)."""
        if self.server is not None:
            return self.server.death_message()
        if self.plan.kind == "openai" and isinstance(self.runtime, OpenAIRuntime):
            url = f"{self.runtime.base_url}/models"
            try:
                httpx.get(url, headers=self.runtime.headers, timeout=2.0)
            except httpx.HTTPError as exc:
                return f"the endpoint stopped answering ({url}: {type(exc).__name__})"
        return None


def endpoint_runtime(spec: ModelSpec, url: str, model: str, *, timeout_s: float) -> OpenAIRuntime:
    """An OpenAIRuntime used as a request builder and tokenizer for the load generator."""
    target = ModelSpec(
        name=spec.name,
        runtime="openai",
        model=model,
        endpoint=url,
        api_key_env=spec.api_key_env,
        options={"logprobs": False, "stream": True, "max_retries": 0, "timeout_s": timeout_s},
    )
    return OpenAIRuntime(target)


@contextlib.contextmanager
def deploy(
    plan: DeployPlan, study: Study, *, run_dir: Path, sampling: SamplingConfig, timeout_s: float
) -> Iterator[Deployment]:
    """Start (or reach) the model; stop it on the way out, also on errors and Ctrl-C."""
    if plan.kind == "llamacpp_server":
        with _llamacpp(plan, timeout_s) as dep:
            yield dep
    elif plan.kind == "openai":
        runtime = endpoint_runtime(
            plan.spec, str(plan.endpoint), str(plan.served_model), timeout_s=timeout_s
        )
        try:
            yield Deployment(
                plan, runtime, None, size_on_disk_bytes=_recorded_size(plan.spec, run_dir)
            )
        finally:
            runtime.close()
    else:
        with _in_process(plan, study, run_dir, sampling) as dep:
            yield dep


@contextlib.contextmanager
def _llamacpp(plan: DeployPlan, timeout_s: float) -> Iterator[Deployment]:
    block = plan.deploy
    assert plan.gguf is not None
    server = LlamaCppServer(
        plan.gguf,
        alias=plan.spec.name,
        n_ctx=block.n_ctx,
        n_threads=plan.threads,
        interrupt_requests=block.interrupt_requests,
        logits_all=block.logits_all,
        extra_args=block.extra_args,
        port=block.port,
        ready_timeout_s=block.ready_timeout_s,
        name=f"llama_cpp.server for model {plan.spec.name!r}",
    )
    try:
        server.start()
        runtime = endpoint_runtime(plan.spec, server.url, plan.spec.name, timeout_s=timeout_s)
        try:
            info = {
                "command": [*server.command[:1], "-c", "<bootstrap>", *server.command[3:]],
                "url": server.url,
            }
            yield Deployment(
                plan, runtime, server.pid, server.cold_start, size_on_disk(plan.gguf), server, info
            )
        finally:
            runtime.close()
    finally:
        server.close()


@contextlib.contextmanager
def _in_process(
    plan: DeployPlan, study: Study, run_dir: Path, sampling: SamplingConfig
) -> Iterator[Deployment]:
    from kit.stages.candidates import open_candidate

    start = time.perf_counter()
    runtime, footprint = open_candidate(plan.spec, study, run_dir=run_dir)
    try:
        loaded = time.perf_counter() - start
        one = sampling.model_copy(update={"max_new_tokens": 1})
        first = time.perf_counter()
        runtime.generate([GenerationRequest("cold-start", Prompt(text="Hello"), 0)], sampling=one)
        cold = ColdStart(ready_s=loaded, first_token_s=time.perf_counter() - first)
        yield Deployment(
            plan,
            runtime,
            os.getpid(),
            cold,
            footprint.get("size_on_disk_bytes") or footprint.get("size_bytes"),
        )
    finally:
        runtime.close()


def _recorded_size(spec: ModelSpec, run_dir: Path) -> int | None:
    """Size on disk stage 1 or 2 recorded for the model (an endpoint's own report)."""
    path = run_dir / "candidates" / f"{spec.name}.json"
    if path.is_file():
        footprint = json.loads(path.read_text(encoding="utf-8")).get("footprint") or {}
        return footprint.get("size_on_disk_bytes") or footprint.get("size_bytes")
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("outputs", {}).get("model") == spec.name:
            return (data.get("model") or {}).get("size_bytes")
    return None
