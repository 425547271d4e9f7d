"""Stage 5, the serving path: deploy each model the way it will run, load it, measure it.

=======================  ======================================================================
module                   job
=======================  ======================================================================
``servers``              server subprocesses on 127.0.0.1: ``llama_cpp.server`` with cold-start
                         timing, process groups, readiness timeout, always stopped
``fake``                 an OpenAI-compatible fake server (instant or slow, with faults) for
                         the client ceiling and for tests
``deploy``               a model's ``serving:`` block checked up front, then deployed
``client``               one streamed request -> one :class:`~kit.serving.client.RequestRecord`
                         (send, first byte, every chunk with its token count, end); aiohttp
``load``                 load profiles and their schedules (synchronous, concurrency,
                         throughput, constant / Poisson rates, GuideLLM's sweep)
``endpoint``             the study's profiles on the frozen prompts against one endpoint; the
                         load generator's own ceiling
``batch``                the in-process batch profile (transformers) over batch sizes
``latency``              metrics from stored timelines: TTFT, TPOT, ITL, E2E percentiles with
                         CIs, throughput, goodput, error classes (and vLLM / GuideLLM variants)
``quality``              outputs under load scored like stage 3, compared with unloaded ones
``resources``            peak memory of a process tree (psutil), GPU memory (NVML /
                         nvidia-smi), size on disk
``cost``                 cost per request and per 1,000 correct answers from a ``cost:`` block
``tables``               every serving table from the stored timelines
``evidence``             the budget evidence: candidates against the baseline, with CIs
``tradeoff``             what each candidate buys against what it pays (for the memo's chart)
=======================  ======================================================================

The stage glue (read a run folder, write ``tables/serving_*.parquet`` and
``serving/<model>/``) is :mod:`kit.stages.serving`. Definitions: ``docs/serving.md``.
"""
