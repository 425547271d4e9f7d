"""Load an OpenAI-compatible endpoint with the study's profiles, on the frozen prompts.

:class:`PromptSet` holds the frozen eval prompts in one seeded order that every model gets:
a profile's measured requests are the first ``requests`` of that order (so two profiles, or
two models, answer the same items and can be compared item by item), its warm-up requests
the ones after them. :class:`EndpointTarget` turns a prompt into the JSON body the quality
runtime would send (:meth:`kit.runtimes.openai.OpenAIRuntime.request_payload`: the same
sampling, the same neutral server settings), streamed, without logprobs.

:func:`run_endpoint` runs the study's ``serving.profiles`` in order (see
:mod:`kit.serving.load` for each schedule) and hands every finished :class:`ProfileRun` to
``on_profile`` at once, so a crash loses at most the profile in flight.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kit.errors import CompkitError
from kit.runtimes.base import GenerationRequest, Prompt, repeat_seed
from kit.runtimes.openai import OpenAIRuntime, run_coroutine
from kit.serving.client import LoadClient, RequestSpec
from kit.serving.load import (
    SWEEP_STOP_ERROR_RATE,
    ProfileRun,
    ProfileSpec,
    profile_bar,
    profile_line,
    run_profile,
    seeded_order,
    sweep_rates,
)
from kit.study import SamplingConfig, ServingConfig

LENGTH_GROUPS = ("short", "long", "longest")
_WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "market",
    "garden",
    "window",
    "letter",
    "music",
    "story",
    "city",
    "table",
    "water",
    "paper",
    "money",
    "night",
    "light",
    "voice",
    "power",
    "field",
    "level",
    "order",
    "house",
    "friend",
    "answer",
]


@dataclass(frozen=True)
class PromptSet:
    """The frozen prompts in the seeded order all models share, with their lengths, and what
    each is deployed with: its answer's JSON schema (``structured_output: json_schema``)
    and its task's token limit (``tasks.<task>.max_new_tokens``)."""

    ids: tuple[str, ...]
    prompts: dict[str, Prompt]
    lengths: dict[str, int]
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_frozen(
        cls,
        prompts: dict[str, Prompt],
        *,
        seed: int,
        schemas: dict[str, dict[str, Any]] | None = None,
        limits: dict[str, int] | None = None,
    ) -> PromptSet:
        if not prompts:
            raise CompkitError("the run has no frozen prompts to load the server with")
        lengths = {i: len(_text(p)) for i, p in prompts.items()}
        order = tuple(seeded_order(sorted(prompts), seed))
        return cls(order, dict(prompts), lengths, dict(schemas or {}), dict(limits or {}))

    def measured(self, n: int) -> list[str]:
        """The first ``n`` ids of the order (cycling when ``n`` exceeds the prompts)."""
        return [self.ids[i % len(self.ids)] for i in range(n)]

    def warmup(self, n: int, *, after: int) -> list[str]:
        """``n`` ids following the first ``after`` (cycling)."""
        return [self.ids[(after + i) % len(self.ids)] for i in range(n)]

    def by_length(self, which: str, n: int) -> list[str]:
        """``short``: the ``n`` shortest prompts; ``longest``: the ``n`` longest; ``long``:
        ``n`` prompts centred on the 75th percentile of length."""
        ranked = sorted(self.ids, key=lambda i: (self.lengths[i], i))
        n = min(n, len(ranked))
        if which == "short":
            return ranked[:n]
        if which == "longest":
            return ranked[len(ranked) - n :]
        if which == "long":
            centre = round(0.75 * (len(ranked) - 1))
            start = min(max(0, centre - n // 2), len(ranked) - n)
            return ranked[start : start + n]
        raise CompkitError(f"unknown prompt-length group {which!r}; groups: {LENGTH_GROUPS}")


def _text(p: Prompt) -> str:
    return (
        p.text if p.text is not None else "\n".join(m.get("content", "") for m in p.messages or ())
    )


class EndpointTarget:
    """JSON bodies for one endpoint, as the quality runtime sends them (no logprobs).

    Parameters
    ----------
    runtime
        An open :class:`~kit.runtimes.openai.OpenAIRuntime` for the endpoint (it recognised
        the server and chose the neutral sampling settings).
    sampling
        The frozen sampling settings; ``max_new_tokens`` overrides their maximum.
    """

    def __init__(
        self,
        runtime: OpenAIRuntime,
        sampling: SamplingConfig,
        *,
        max_new_tokens: int | None,
    ):
        self.runtime = runtime
        self.fixed_limit = max_new_tokens is not None
        self.sampling = (
            sampling.model_copy(update={"max_new_tokens": max_new_tokens})
            if max_new_tokens
            else sampling
        )
        self.seed = repeat_seed(sampling.seed, 0)

    @property
    def flavour(self) -> str:
        return str(self.runtime.identity().extra.get("server_flavour", "unknown"))

    def request(
        self,
        index: int,
        item_id: str | None,
        phase: str,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        extra: dict[str, Any] | None = None,
        schema: dict[str, Any] | None = None,
    ) -> RequestSpec:
        sampling = (
            self.sampling
            if max_tokens is None
            else self.sampling.model_copy(update={"max_new_tokens": max_tokens})
        )
        gen = GenerationRequest(
            item_id or f"synthetic-{index}",
            prompt,
            self.seed,
            json_schema=schema,
        )
        payload = self.runtime.request_payload(gen, sampling)
        payload.update(extra or {})
        return RequestSpec(index, item_id, phase, self.runtime.request_url(prompt), payload)

    def eval_requests(self, measured: Sequence[str], warmup: Sequence[str], prompts: PromptSet):
        """Warm-up requests first, then the measured ones, indexed in that order; each with
        its schema and its task's token limit (unless ``serving.max_new_tokens`` fixes one)."""
        ids = [(i, "warmup") for i in warmup] + [(i, "measure") for i in measured]
        return [
            self.request(
                k,
                item,
                phase,
                prompts.prompts[item],
                max_tokens=None if self.fixed_limit else prompts.limits.get(item),
                schema=prompts.schemas.get(item),
            )
            for k, (item, phase) in enumerate(ids)
        ]

    def synthetic_prompts(self, n: int, tokens: int, *, seed: int) -> list[Prompt]:
        """``n`` distinct text prompts of ``tokens`` tokens by the server's tokenizer (about
        that many where the server cannot count tokens)."""
        return [
            Prompt(text=_fit_words(self.runtime, tokens, random.Random(f"{seed}:{k}")))
            for k in range(n)
        ]


def _fit_words(runtime: OpenAIRuntime, tokens: int, rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(tokens * 2 + 8)]

    def count(k: int) -> int:
        try:
            return runtime.count_tokens(Prompt(text=" ".join(words[:k])))
        except NotImplementedError:
            return k  # about one token per common English word

    lo, hi = 1, len(words)
    while lo < hi:  # the largest word count whose prompt has at most `tokens` tokens
        mid = (lo + hi + 1) // 2
        if count(mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


# --------------------------------------------------------------------------- the plan


@dataclass
class EndpointPlan:
    """Everything :func:`run_endpoint` needs besides the target."""

    model: str
    config: ServingConfig
    prompts: PromptSet
    progress: bool = True
    alive: Callable[[], str | None] | None = None
    on_profile: Callable[[ProfileRun], None] | None = None


def run_endpoint(target: EndpointTarget, plan: EndpointPlan) -> list[ProfileRun]:
    """Run every profile of ``plan.config.profiles``; stops early when the server is gone."""
    return run_coroutine(lambda: _run_all(target, plan))


async def _run_all(target: EndpointTarget, plan: EndpointPlan) -> list[ProfileRun]:
    runs: dict[str, ProfileRun] = {}
    cfg = plan.config
    for group in cfg.profiles:
        for spec, requests in _group_profiles(group, target, plan, runs):
            if spec.name in runs:
                continue
            run = await _one(target, plan, spec, requests)
            runs[spec.name] = run
            if plan.progress:
                print(profile_line(plan.model, run), flush=True)
            if plan.on_profile is not None:
                plan.on_profile(run)
            if run.aborted:
                return list(runs.values())
            if spec.kind in ("constant", "poisson") and _error_share(run) > SWEEP_STOP_ERROR_RATE:
                break  # GuideLLM stops escalating rates once requests mostly fail
    return list(runs.values())


async def _one(target, plan: EndpointPlan, spec: ProfileSpec, requests) -> ProfileRun:
    cfg = plan.config
    bar = profile_bar(model=plan.model, spec=spec, total=len(requests), progress=plan.progress)
    try:
        async with LoadClient(
            headers=target.runtime.headers,
            timeout_s=cfg.timeout_s,
            max_connections=max(1, spec.concurrency),
        ) as client:
            return await run_profile(
                client,
                spec,
                requests,
                max_duration_s=cfg.max_duration_s,
                seed=cfg.seed,
                alive=plan.alive,
                bar=bar,
            )
    finally:
        if bar is not None:
            bar.close()


def _error_share(run: ProfileRun) -> float:
    measured = run.measured
    return sum(r.status != "ok" for r in measured) / len(measured) if measured else 1.0


def _group_profiles(group: str, target: EndpointTarget, plan: EndpointPlan, runs):
    """(spec, requests) pairs of one study profile kind, built when reached (a sweep's
    rates need the synchronous and throughput runs before them)."""
    cfg, prompts = plan.config, plan.prompts
    n, w = cfg.requests, cfg.warmup
    eval_reqs = target.eval_requests(prompts.measured(n), prompts.warmup(w, after=n), prompts)
    if group == "synchronous":
        yield ProfileSpec.synchronous(), eval_reqs
    elif group == "concurrency":
        for level in cfg.concurrency:
            yield ProfileSpec.concurrent(level), eval_reqs
    elif group == "throughput":
        yield ProfileSpec.throughput(cfg.max_concurrency), eval_reqs
    elif group == "rate_sweep":
        yield from _sweep(cfg, eval_reqs, runs)
    elif group == "prompt_length":
        for which in LENGTH_GROUPS:
            ids = prompts.by_length(which, n)
            spec = ProfileSpec(
                f"prompt_length={which}", "synchronous", group, "prompt_length", which
            )
            yield spec, target.eval_requests(ids, prompts.by_length(which, w), prompts)
    elif group == "synthetic":
        yield from _synthetic(cfg, target)
    else:
        raise CompkitError(f"unknown serving profile {group!r}")


def _sweep(cfg: ServingConfig, eval_reqs, runs):
    yield ProfileSpec.synchronous(group="rate_sweep"), eval_reqs
    yield ProfileSpec.throughput(cfg.max_concurrency), eval_reqs
    sync, peak = runs["synchronous"].request_rate(), runs["throughput"].request_rate()
    if sync <= 0 and peak <= 0:
        return
    for rate in sweep_rates(sync, peak, cfg.sweep_size):
        if rate > 0 and math.isfinite(rate):
            spec = ProfileSpec.at_rate(
                rate, poisson=cfg.rate_strategy == "poisson", max_concurrency=cfg.max_concurrency
            )
            yield spec, eval_reqs


def _synthetic(cfg: ServingConfig, target: EndpointTarget):
    syn = cfg.synthetic
    label = f"{syn.prompt_tokens}/{syn.output_tokens}"
    total = cfg.requests + cfg.warmup
    prompts = target.synthetic_prompts(total, syn.prompt_tokens, seed=cfg.seed)
    extra = {"ignore_eos": True} if target.flavour == "vllm" else {}
    requests = [
        target.request(
            k,
            None,
            "warmup" if k < cfg.warmup else "measure",
            p,
            max_tokens=syn.output_tokens,
            extra=extra,
        )
        for k, p in enumerate(prompts)
    ]
    yield (
        ProfileSpec(f"synthetic={label}", "synchronous", "synthetic", "synthetic", label),
        requests,
    )
    if cfg.concurrency:
        top = cfg.concurrency[-1]
        value = f"{label},concurrency={top}"
        spec = ProfileSpec(
            f"synthetic={value}", "concurrency", "synthetic", "synthetic", value, top
        )
        yield spec, requests


# --------------------------------------------------------------------------- client ceiling


def client_ceiling(
    *, concurrency: int, requests: int = 400, tokens: int = 16, max_duration_s: float = 5.0
) -> dict[str, Any]:
    """The load generator's own limit: requests/s against an instant fake server
    (:class:`~kit.serving.fake.FakeServer`, ``tokens`` chunks per answer) at
    ``concurrency`` in flight. A measured throughput near it would be the client's, not the
    server's."""
    from kit.serving.fake import FakeServer

    with FakeServer(tokens=tokens) as fake:
        payload = {
            "model": fake.config.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        url = f"{fake.url}/v1/chat/completions"
        specs = [RequestSpec(k, None, "measure", url, payload) for k in range(requests)]
        spec = ProfileSpec.throughput(concurrency)

        async def go() -> ProfileRun:
            async with LoadClient(timeout_s=30.0, max_connections=concurrency) as client:
                return await run_profile(client, spec, specs, max_duration_s=max_duration_s)

        run = run_coroutine(go)
    ok = sum(r.status == "ok" for r in run.records)
    return {
        "ceiling_rps": run.request_rate(),
        "concurrency": concurrency,
        "requests": len(run.records),
        "ok": ok,
        "tokens_per_answer": tokens,
    }
