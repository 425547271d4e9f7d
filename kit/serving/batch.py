"""The in-process batch profile: a transformers model over batch sizes (1, 4, 16, ...).

For each batch size ``b`` the measured prompts (the same first ``requests`` of the shared
order as every served model) go through :meth:`~kit.runtimes.base.Runtime.generate` ``b`` at
a time, after one discarded warm-up batch of ``warmup`` prompts. Each request's timeline is
written like a served one (:class:`~kit.serving.client.RequestRecord`): sent = its batch's
start, first token = the batch's first decoding step, one chunk per generated token at the
step's time, and end = when the batch returned: in-process batch inference hands a request
back with its whole batch, so its end-to-end latency is the batch's. Requests/s = requests /
wall time of the profile's batches. Each profile is bounded by ``max_duration_s`` (no new
batch starts after it).

The outputs at batch size 1 and the largest size feed the batch-size flip rate
(:func:`kit.serving.quality.batch_flips`): left padding and batched kernels change float
results, and a candidate must not be blamed for what batching does to the baseline too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kit.runtimes.base import Generation, GenerationRequest, Runtime, repeat_seed
from kit.serving.client import RequestRecord
from kit.serving.endpoint import PromptSet
from kit.serving.load import ProfileRun, ProfileSpec, profile_bar, profile_line
from kit.study import SamplingConfig, ServingConfig


def batch_profile(size: int) -> ProfileSpec:
    return ProfileSpec(f"batch_size={size}", "batch", "batch", "batch_size", str(size), size)


def run_batch_profiles(
    runtime: Runtime,
    prompts: PromptSet,
    *,
    model: str,
    batch_sizes: Sequence[int],
    config: ServingConfig,
    sampling: SamplingConfig,
    progress: bool = True,
    on_profile: Callable[[ProfileRun], None] | None = None,
) -> list[ProfileRun]:
    """Run every batch size (module docstring); hands each finished run to ``on_profile``."""
    if config.max_new_tokens:
        sampling = sampling.model_copy(update={"max_new_tokens": config.max_new_tokens})
    measured = prompts.measured(config.requests)
    warm = prompts.warmup(config.warmup, after=config.requests)
    runs = []
    for size in batch_sizes:
        spec = batch_profile(size)
        runtime.spec = runtime.spec.model_copy(update={"batch_size": size})
        bar = profile_bar(model=model, spec=spec, total=len(measured), progress=progress)
        try:
            run = _one_size(runtime, prompts, spec, measured, warm, config, sampling, bar)
        finally:
            if bar is not None:
                bar.close()
        runs.append(run)
        if progress:
            print(profile_line(model, run), flush=True)
        if on_profile is not None:
            on_profile(run)
    return runs


def _one_size(runtime, prompts, spec, measured, warm, config, sampling, bar) -> ProfileRun:
    seed = repeat_seed(sampling.seed, 0)
    if warm:
        reqs = [_request(prompts, i, seed) for i in warm[: spec.concurrency]]
        runtime.generate(reqs, sampling=sampling)  # discarded
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = t0 + config.max_duration_s
    stopped = "count"
    for start in range(0, len(measured), spec.concurrency):
        if time.perf_counter() >= deadline:
            stopped = "time"
            break
        chunk = measured[start : start + spec.concurrency]
        sent = time.perf_counter() - t0
        gens = runtime.generate([_request(prompts, i, seed) for i in chunk], sampling=sampling)
        end = time.perf_counter() - t0
        records += [_record(start + k, g, sent, end) for k, g in enumerate(gens)]
        if bar is not None:
            bar.update(len(chunk))
    return ProfileRun(spec, records, time.perf_counter() - t0, stopped)


def _record(index: int, g: Generation, sent: float, end: float) -> RequestRecord:
    steps = [sent + t for t in g.extra.get("step_times_s") or []]
    ok = g.error is None
    return RequestRecord(
        index=index,
        item_id=g.item_id,
        phase="measure",
        scheduled_s=None,
        sent_s=sent,
        first_chunk_s=steps[0] if steps else None,
        first_token_s=steps[0] if steps else None,
        last_token_s=steps[-1] if steps else None,
        end_s=end,
        chunk_s=steps,
        chunk_tokens=[1] * len(steps),
        event_s=list(steps),
        output=g.text,
        output_tokens=g.output_tokens,
        prompt_tokens=g.prompt_tokens,
        token_source="runtime",
        finish_reason=g.finish_reason,
        status="ok" if ok else "error",
        error_class=g.error_class,
        error=g.error,
    )


def _request(prompts: PromptSet, item: str, seed: int) -> GenerationRequest:
    """The item's request with its answer schema (the batch shares one token limit)."""
    return GenerationRequest(
        item, prompts.prompts[item], seed, json_schema=prompts.schemas.get(item)
    )
