"""llama.cpp runtime: a GGUF model in this process through llama-cpp-python.

``spec.model`` is a ``.gguf`` file (relative paths are resolved against ``base_dir``), a
folder holding one GGUF (or the one ``gguf_file`` names), or ``builtin:<name>`` for the GGUF
a Python package ships (see :mod:`kit.models`). ``spec.options`` may set ``n_ctx`` (2048),
``n_threads`` (the cores this process may use), ``n_batch`` (512), ``n_gpu_layers`` (0 on
CPU; all layers when ``device`` is ``cuda``/``cuda:N``, or ``auto`` with a GPU build),
``extra_buffers``, ``verbose`` (False) and ``teacher_forcing`` (``batch``, the default:
token distributions of every position in ``n_batch`` chunks, as ``llama-perplexity
--kl-divergence`` computes them, about one prompt evaluation per item; ``decode``: on
generation's path, one token per decode, which costs as much as generating again).

``extra_buffers`` (llama.cpp's ``use_extra_bufts``: AMX and repacked CPU weight layouts)
defaults to on, except where the CPU advertises AMX but the kernel does not enable its tile
state (common in VMs, e.g. Firecracker): llama.cpp's AMX kernels then crash the process
with a segmentation fault on the first decode, so they are turned off there.

Prompts are formatted exactly as ``Llama.create_chat_completion`` / ``create_completion``
format them: chat prompts through llama-cpp-python's ``Jinja2ChatFormatter`` with the
GGUF's own ``tokenizer.chat_template`` (and its BOS/EOS token texts), tokenized with special
tokens parsed and no extra BOS; text prompts tokenized with the vocabulary's own BOS rule.

Decoding does not go through ``create_*_completion``: their logprobs need the model loaded
with ``logits_all=True`` (which keeps an ``n_ctx x n_vocab`` float32 array, 400 MB for a
49k vocabulary at 2048 tokens, and computes logits for every prompt token), their stream
yields text pieces rather than one chunk per token, and their sampler runs top-p *before*
temperature with llama-cpp-python's own defaults (top_k 40, min_p 0.05; repeat penalty 1.1
for chat). Instead a short token loop drives the same model with llama.cpp's own sampler
chain (``llama_sampler``): greedy when ``temperature == 0``, else temperature, then top-p,
then a seeded draw (the order transformers, vLLM and OpenAI use), one request at a time.
After each step it reads the last position's logits, so each generated token's logprob is
exact: under the raw model distribution when greedy, under the distribution the token was
drawn from (temperature-scaled, top-p-renormalised) when sampling, as in the transformers
runtime. An end-of-generation token counts as an output token (it was generated and
carries the model's decision to stop) but adds no text.

Choice scoring evaluates the prompt once per request (one decode, as generation does), then
each continuation one token per decode, rewinding the KV cache to the prompt between
continuations, and sums the log-softmax of the logits before each continuation token. One
token per decode is the path generation takes, so a continuation the model would generate
scores exactly the sum of its generated token logprobs; llama.cpp's multi-token batches run
other kernels whose logprobs differ by up to ~0.1 nat per token on quantized weights. Letter
labels (one token) cost no extra decode at all. Context and continuation are tokenized as in lm-evaluation-harness (and the
transformers runtime): trailing whitespace of the context moves to the continuation, and
the continuation tokens are those of ``context + continuation`` after the context's.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from kit.environment import amx_tile_unusable
from kit.errors import CompkitError
from kit.models import BUILTIN_PREFIX, GGUF_MAGIC, locate_gguf  # noqa: F401  (re-exported)
from kit.runtimes import RUNTIMES
from kit.runtimes.base import (
    ChoiceRequest,
    ChoiceScores,
    Generation,
    GenerationRequest,
    ModelIdentity,
    Progress,
    Prompt,
    Runtime,
    TokenScoreRequest,
    TokenScores,
    failed_scores,
    position_scores,
)
from kit.store import file_sha256 as store_sha256
from kit.structured import gbnf_for
from kit.study import ModelSpec, SamplingConfig

#: The ``spec.options`` this runtime reads (declared once, in the registry).
OPTIONS = RUNTIMES["llamacpp"].options

#: Prompts are evaluated in blocks of this many tokens at fixed positions (0, 32, 64, ...),
#: so a block's keys and values depend only on the tokens up to its end. With
#: ``options.prompt_cache`` (default on) the runtime keeps the whole blocks the previous
#: prompt shares with the next one (a few-shot prefix is evaluated once, as llama-server's
#: ``cache_prompt`` does), and every logit is bit-identical to evaluating from scratch in
#: any order: the kept blocks were computed by exactly the operations that would recompute
#: them.
PREFILL_BLOCK = 32

#: GGUF ``general.file_type`` number -> name ("Q4_1", "F16", ...).
FILE_TYPES: dict[int, str] = {
    getattr(llama_cpp, name): name.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix(
        "LLAMA_FTYPE_ALL_"
    )
    for name in dir(llama_cpp)
    if name.startswith("LLAMA_FTYPE_") and name != "LLAMA_FTYPE_GUESSED"
}

# sha256 of files already hashed by this process, keyed by (path, size, mtime_ns)
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


class LlamaCppRuntime(Runtime):
    """A GGUF model run by llama.cpp (``llama_cpp.Llama``) in this process.

    Parameters
    ----------
    spec
        ``spec.model`` is a ``.gguf`` path, a folder with one GGUF (or ``gguf_file``), or
        ``builtin:<name>``; ``device`` and ``options`` as in the module docstring.
    base_dir
        Folder that relative model paths are resolved against.

    Examples
    --------
    >>> spec = ModelSpec(name="q4", runtime="llamacpp",
    ...                  model="builtin:smollm2-135m-instruct")  # doctest: +SKIP
    >>> with LlamaCppRuntime(spec) as rt:  # doctest: +SKIP
    ...     rt.generate([GenerationRequest("q1", Prompt(text="Hello"), seed=1)],
    ...                 sampling=SamplingConfig(max_new_tokens=8))
    """

    name = "llamacpp"

    def __init__(self, spec: ModelSpec, *, base_dir: Path | None = None):
        super().__init__(spec, base_dir=base_dir)
        self.path = locate_gguf(spec, self.base_dir)
        self._settings = _settings(spec)
        self.llm: llama_cpp.Llama | None = _load(self.path, spec, self._settings)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._n_vocab = self.llm.n_vocab()
        self._n_ctx = self.llm.n_ctx()
        self._formatter = _chat_formatter(self.llm)
        self._identity: ModelIdentity | None = None
        # the tokens of the last prompt evaluated, and how many leading ones are whole blocks
        # whose keys and values the cache holds (prompt_cache)
        self._cached: list[int] = []
        self._cached_blocks = 0
        self.reused_tokens = 0  # prompt tokens served from the cache (how much it saved)

    # ------------------------------------------------------------------ prompts

    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as the model reads it (the GGUF chat template applied to chat prompts)."""
        if prompt.text is not None:
            return prompt.text
        if self._formatter is None:
            raise CompkitError(
                f"model {self.spec.name!r} ({self.path}): the GGUF has no "
                "tokenizer.chat_template; use prompt.chat: false for this model"
            )
        try:
            return self._formatter(messages=[dict(m) for m in prompt.messages or ()]).prompt
        except Exception as exc:  # jinja errors and the template's raise_exception
            raise CompkitError(
                f"model {self.spec.name!r}: the GGUF chat template cannot format "
                f"these messages: {exc}"
            ) from exc

    def _tokenize(self, text: str, *, chat: bool) -> list[int]:
        # chat templates write their own special tokens; plain text gets the vocab's BOS rule
        return self._model().tokenize(text.encode("utf-8"), add_bos=not chat, special=True)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of the prompt, as ``create_chat_completion``/``create_completion`` send them."""
        ids = self._tokenize(self.prompt_text(prompt), chat=prompt.messages is not None)
        return ids or self._start_tokens()

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.encode_prompt(prompt))

    def _start_tokens(self) -> list[int]:
        llm = self._model()
        start = llm.token_bos() if llm.token_bos() >= 0 else llm.token_eos()
        return [start]

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """Generate for each request in turn (llama.cpp in-process is sequential: batch 1)."""
        results = []
        for request in requests:
            results.append(self._generate_one(request, sampling))
            if progress is not None:
                progress(1)
        return results

    def _generate_one(self, request: GenerationRequest, sampling: SamplingConfig) -> Generation:
        ids = self.encode_prompt(request.prompt)  # CompkitError (template) stops the run
        start = time.perf_counter()
        try:
            return self._decode(request, ids, sampling, start)
        except Exception as exc:  # llama.cpp failed on this item: record it, keep going
            return Generation(
                item_id=request.item_id,
                text="",
                prompt_tokens=len(ids),
                latency_s=time.perf_counter() - start,
                error=f"{type(exc).__name__}: {exc}",
                error_class="runtime_error",
            )

    def _decode(
        self, request: GenerationRequest, ids: list[int], sampling: SamplingConfig, start: float
    ) -> Generation:
        if len(ids) >= self._n_ctx:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context holds {self._n_ctx}; "
                "raise options.n_ctx for this model"
            )
        llm = self._model()
        limit = min(sampling.max_new_tokens, self._n_ctx - len(ids))
        stops = [s.encode("utf-8") for s in sampling.stop if s]
        tokens: list[int] = []
        logprobs: list[float] = []
        nonfinite = 0
        text = b""
        ttft: float | None = None
        finish = "length"
        self._prefill(ids)
        grammar = self._grammar(request.json_schema)
        with _sampler(sampling, request.seed, grammar=grammar) as chain:
            while len(tokens) < limit:
                logits = self._last_logits()
                nonfinite += int(not np.isfinite(logits).all())
                token = llama_cpp.llama_sampler_sample(chain, llm.ctx, -1)
                if ttft is None:
                    ttft = time.perf_counter() - start
                tokens.append(token)
                logprobs.append(chosen_logprob(logits, token, sampling))
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                text += llm.detokenize([token])
                if stops and any(s in text[-(len(s) + 64) :] for s in stops):
                    finish = "stop"
                    break
                if len(tokens) < limit:
                    llm.eval([token])
        return Generation(
            item_id=request.item_id,
            text=_cut_at_stop(text.decode("utf-8", errors="replace"), sampling.stop),
            prompt_tokens=len(ids),
            output_tokens=len(tokens),
            ttft_s=ttft,
            latency_s=time.perf_counter() - start,
            token_logprobs=logprobs,
            finish_reason=finish,
            batch_size=1,
            token_ids=tokens,
            nonfinite_logits=nonfinite,
        )

    def _grammar(self, schema: Any) -> Any:
        """A llama.cpp grammar sampler for ``schema`` (its JSON-schema GBNF), or ``None``."""
        if schema is None:
            return None
        gbnf = gbnf_for(schema)
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            raise CompkitError(
                f"model {self.spec.name!r}: llama.cpp refused the grammar of a JSON schema"
            )
        return sampler

    def _last_logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._model().ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    # ------------------------------------------------------------------ score choices

    def score_choices(
        self, requests: Sequence[ChoiceRequest], *, progress: Progress | None = None
    ) -> list[ChoiceScores]:
        """Sum of continuation-token logprobs after each prompt (lm-evaluation-harness rule)."""
        results = []
        for request in requests:
            start = time.perf_counter()
            context, targets = self.choice_tokens(request)  # CompkitError (template) stops the run
            try:
                sums = self._score(context, targets)
                results.append(
                    ChoiceScores(
                        item_id=request.item_id,
                        logprobs=sums,
                        n_tokens=[len(t) for t in targets],
                        latency_s=time.perf_counter() - start,
                    )
                )
            except Exception as exc:
                results.append(
                    ChoiceScores(
                        item_id=request.item_id,
                        logprobs=[float("nan")] * len(targets),
                        n_tokens=[len(t) for t in targets],
                        latency_s=time.perf_counter() - start,
                        error=f"{type(exc).__name__}: {exc}",
                        error_class="runtime_error",
                    )
                )
            if progress is not None:
                progress(1)
        return results

    def choice_tokens(self, request: ChoiceRequest) -> tuple[list[int], list[list[int]]]:
        """Context token ids and each continuation's token ids for one choice request."""
        context = self.prompt_text(request.prompt)
        chat = request.prompt.messages is not None
        spaces = len(context) - len(context.rstrip())
        head, tail = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
        ctx_ids = self._tokenize(head, chat=chat)
        targets = []
        for cont in request.continuations:
            whole = self._tokenize(head + tail + cont, chat=chat)
            targets.append(whole[len(ctx_ids) :] if ctx_ids else whole)
        return ctx_ids or self._start_tokens(), targets

    def _score(self, context: list[int], targets: list[list[int]]) -> list[float]:
        if len(context) + max((len(t) for t in targets), default=0) > self._n_ctx:
            raise ValueError(
                f"prompt and continuation exceed the context of {self._n_ctx} "
                "tokens; raise options.n_ctx for this model"
            )
        llm = self._model()
        self._prefill(context)
        first = self._last_logits()
        sums = []
        for target in targets:
            total = 0.0
            logits = first
            for i, token in enumerate(target):
                total += float(_log_softmax(logits.astype(np.float64))[token])
                if i + 1 < len(target):
                    llm.eval([token])
                    logits = self._last_logits()
            sums.append(total)
            if not self._rewind(len(context)):  # the cache cannot drop a suffix: start again
                self._forget()
                self._prefill(context)
        return sums

    def _rewind(self, n_tokens: int) -> bool:
        """Drop the KV cache after ``n_tokens``; False when the model's cache cannot."""
        llm = self._model()
        memory = llama_cpp.llama_get_memory(llm.ctx)
        if memory is None or not llama_cpp.llama_memory_seq_rm(memory, -1, n_tokens, -1):
            return False
        llm.n_tokens = n_tokens
        return True

    def _forget(self) -> None:
        self._model().reset()
        self._cached, self._cached_blocks = [], 0

    def _reusable(self, ids: Sequence[int], limit: int) -> int:
        """How many leading tokens of ``ids`` (at most ``limit``) the cache can serve: whole
        blocks of the previous prompt that ``ids`` starts with."""
        if not self._settings["prompt_cache"]:
            return 0
        bound = min(self._cached_blocks, limit)
        same = 0
        while same < bound and self._cached[same] == ids[same]:
            same += 1
        return same - same % PREFILL_BLOCK

    def _prefill(self, ids: list[int]) -> None:
        """Evaluate the prompt ``ids`` (logits of its last token ready), reusing cached blocks.

        Without ``prompt_cache`` the prompt runs in one ``eval`` (``n_batch`` chunks) as before."""
        llm = self._model()
        if not self._settings["prompt_cache"]:
            llm.reset()
            llm.eval(ids)
            return
        keep = self._reusable(ids, len(ids) - 1)  # the last token must run: its logits
        if keep == 0 or not self._rewind(keep):
            self._forget()
            keep = 0
        self._cached, self._cached_blocks = list(ids[:keep]), keep  # valid if eval fails
        for begin in range(keep, len(ids), PREFILL_BLOCK):
            llm.eval(ids[begin : begin + PREFILL_BLOCK])
        self.reused_tokens += keep
        self._cached, self._cached_blocks = list(ids), len(ids) - len(ids) % PREFILL_BLOCK

    # ------------------------------------------------------------------ teacher forcing

    def score_tokens(
        self, requests: Sequence[TokenScoreRequest], *, progress: Progress | None = None
    ) -> list[TokenScores]:
        """Teacher forcing. ``teacher_forcing: batch`` (default): every position in ``n_batch``
        chunks with logits kept from the first scored position on, as ``llama-perplexity``
        evaluates a text. ``decode``: the path generation takes, the prompt in one ``eval``,
        then one token per decode, so a token the model would generate gets exactly its
        generation logits (quantized kernels for one token and for a batch differ slightly)."""
        results = []
        for req in requests:
            try:
                results.append(position_scores(req, self._forced_logits(req)))
            except Exception as exc:  # llama.cpp failed on this item: record it, keep going
                results.append(failed_scores(req, f"{type(exc).__name__}: {exc}"))
            if progress is not None:
                progress(1)
        return results

    def _forced_logits(self, req: TokenScoreRequest) -> np.ndarray:
        ids = list(req.token_ids)
        if not 1 <= req.start < len(ids):
            raise ValueError(f"nothing to score (start={req.start}, {len(ids)} tokens)")
        if len(ids) > self._n_ctx:
            raise ValueError(
                f"{len(ids)} tokens exceed the context of {self._n_ctx}; raise options.n_ctx"
            )
        if self._settings["forcing"] == "batch":
            return self._batched_logits(ids, req.start)
        llm = self._model()
        self._prefill(ids[: req.start])
        rows = [self._last_logits()]
        for token in ids[req.start : -1]:
            llm.eval([token])
            rows.append(self._last_logits())
        return np.stack(rows).astype(np.float64)

    def _batched_logits(self, ids: list[int], start: int) -> np.ndarray:
        """Every position in chunks with logits kept from ``start - 1`` on, as
        ``llama-perplexity`` evaluates a text (its kernels, not generation's): ``n_batch``
        chunks, or with ``prompt_cache`` the fixed blocks (cached ones reused)."""
        llm = self._model()
        cached = self._settings["prompt_cache"]
        size = PREFILL_BLOCK if cached else self._settings["n_batch"]
        keep = self._reusable(ids, start - 1) if cached else 0
        if keep == 0 or not self._rewind(keep):
            self._forget()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            keep = 0
        self._cached, self._cached_blocks = list(ids[:keep]), keep  # valid if decode fails
        rows = []
        batch = llama_cpp.llama_batch_init(size, 0, 1)
        try:
            for begin in range(keep, len(ids) - 1, size):
                chunk = ids[begin : min(begin + size, len(ids) - 1)]
                rows.extend(self._decode_chunk(batch, chunk, begin, start))
        finally:
            llama_cpp.llama_batch_free(batch)
        self.reused_tokens += keep
        done = len(ids) - 1
        llm.n_tokens = done
        self._cached, self._cached_blocks = list(ids[:done]), done - done % PREFILL_BLOCK
        return np.stack(rows).astype(np.float64)

    def _decode_chunk(self, batch: Any, chunk: list[int], begin: int, start: int) -> list:
        """``llama_decode`` one chunk at positions ``begin...``; the logit rows from
        ``start - 1`` on."""
        llm = self._model()
        wanted = []
        for j, token in enumerate(chunk):
            pos = begin + j
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos, 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = pos >= start - 1
            if pos >= start - 1:
                wanted.append(j)
        batch.n_tokens = len(chunk)
        if llama_cpp.llama_decode(llm.ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on tokens {begin}..{begin + len(chunk)}")
        return [
            np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(llm.ctx, j), shape=(self._n_vocab,)
            ).copy()
            for j in wanted
        ]

    def vocabulary_sha256(self) -> str | None:
        """sha256 of the GGUF vocabulary's token texts in id order (JSON list)."""
        import json

        texts = [
            llama_cpp.llama_vocab_get_text(self._vocab, i).decode("utf-8", errors="replace")
            for i in range(self._n_vocab)
        ]
        return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()

    # ------------------------------------------------------------------ identity

    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = self._describe()
        return self._identity

    def _describe(self) -> ModelIdentity:
        llm = self._model()
        digest = file_sha256(self.path)
        metadata = llm.metadata
        file_type = metadata.get("general.file_type")
        template = metadata.get("tokenizer.chat_template")
        extra: dict[str, Any] = {
            "path": str(self.path),
            "model_desc": _model_desc(llm),
            "architecture": metadata.get("general.architecture"),
            "general_name": metadata.get("general.name"),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()
            if template
            else None,
            **self._settings,
            "n_ctx": self._n_ctx,
        }
        if self.spec.model.startswith(BUILTIN_PREFIX):
            extra["builtin"] = self.spec.model.removeprefix(BUILTIN_PREFIX)
        return ModelIdentity(
            runtime=self.name,
            runtime_version=f"llama-cpp-python {llama_cpp.__version__}",
            model=self.spec.model,
            weights_sha256=digest,
            files={self.path.name: digest},
            parameters=int(llama_cpp.llama_model_n_params(llm.model)),
            size_bytes=self.path.stat().st_size,
            dtype=FILE_TYPES.get(int(file_type)) if file_type and file_type.isdigit() else None,
            device=_device_name(self.spec, self._settings["n_gpu_layers"]),
            extra=extra,
        )

    @classmethod
    def check_source(cls, spec: ModelSpec, *, base_dir: Path, ids, repeats: int) -> str:
        """The GGUF file exists, is readable and starts with the GGUF magic bytes."""
        path = locate_gguf(spec, base_dir)
        return f"GGUF {path} ({path.stat().st_size / 1e6:.1f} MB)"

    @classmethod
    def weights_fingerprint(cls, spec: ModelSpec, *, base_dir: Path) -> str | None:
        """sha256 of the GGUF file, without loading it (equals ``identity().weights_sha256``)."""
        return file_sha256(locate_gguf(spec, base_dir))

    # ------------------------------------------------------------------ lifecycle

    def _model(self) -> llama_cpp.Llama:
        if self.llm is None:
            raise CompkitError(f"model {self.spec.name!r}: the runtime was closed")
        return self.llm

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


# ---------------------------------------------------------------------- logprobs


def chosen_logprob(logits: np.ndarray, token: int, sampling: SamplingConfig) -> float:
    """Logprob of ``token`` under the distribution it was chosen from.

    Greedy: the model's own distribution. Sampling: logits divided by the temperature,
    restricted to the top-p nucleus (smallest set of most probable tokens whose
    probability reaches ``top_p``, as llama.cpp's top-p sampler keeps) and renormalised.
    """
    z = logits.astype(np.float64)
    if not sampling.greedy:
        z = z / sampling.temperature
        if sampling.top_p < 1.0:
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), sampling.top_p)) + 1]
            nucleus = np.full_like(z, -np.inf)
            nucleus[keep] = z[keep]
            nucleus[token] = z[token]  # float ties at the cut: the drawn token is always kept
            z = nucleus
    return float(_log_softmax(z)[token])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z[np.isfinite(z)].max()
    return z - m - np.log(np.exp(z - m).sum())


@contextmanager
def _sampler(sampling: SamplingConfig, seed: int, *, grammar: Any = None) -> Iterator[Any]:
    """llama.cpp sampler chain: [grammar ->] greedy, or temperature -> top-p -> seeded draw.

    A ``grammar`` sampler (JSON-schema GBNF) masks tokens the grammar forbids first; the chain
    owns it and frees it with the chain."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        if grammar is not None:
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if sampling.greedy:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.temperature != 1.0:
                llama_cpp.llama_sampler_chain_add(
                    chain, llama_cpp.llama_sampler_init_temp(sampling.temperature)
                )
            if sampling.top_p < 1.0:
                llama_cpp.llama_sampler_chain_add(
                    chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1)
                )
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)
            )
        yield chain
    finally:
        llama_cpp.llama_sampler_free(chain)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


# ---------------------------------------------------------------------- locating and loading


def _settings(spec: ModelSpec) -> dict[str, Any]:
    """Validated llama.cpp settings from ``spec.options`` and ``spec.device``."""
    options = spec.options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise CompkitError(
            f"model {spec.name!r}: unknown llamacpp option(s) {unknown}; "
            f"known: {sorted(k for k in OPTIONS if k != 'progress')}"
        )
    for key, kind in OPTIONS.items():
        value = options.get(key)
        wrong_bool = isinstance(value, bool) and kind is int
        if value is not None and (wrong_bool or not isinstance(value, kind)):
            raise CompkitError(
                f"model {spec.name!r}: option {key} must be "
                f"{getattr(kind, '__name__', kind)}, got {value!r}"
            )
    if options.get("teacher_forcing", "batch") not in ("decode", "batch"):
        raise CompkitError(
            f"model {spec.name!r}: option teacher_forcing must be 'decode' or 'batch', got "
            f"{options['teacher_forcing']!r}"
        )
    for key in ("n_ctx", "n_threads", "n_batch"):
        if key in options and options[key] < 1:
            raise CompkitError(
                f"model {spec.name!r}: option {key} must be at least 1, got {options[key]}"
            )
    threads = options.get("n_threads") or _usable_cores()
    return {
        "n_ctx": options.get("n_ctx", 2048),
        "n_threads": threads,
        "n_batch": options.get("n_batch", 512),
        "n_gpu_layers": options.get("n_gpu_layers", _default_gpu_layers(spec)),
        "main_gpu": _gpu_index(spec),
        "extra_buffers": options.get("extra_buffers", not amx_unusable()),
        "verbose": options.get("verbose", False),
        "forcing": options.get("teacher_forcing", "batch"),
        "prompt_cache": options.get("prompt_cache", True),
    }


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _default_gpu_layers(spec: ModelSpec) -> int:
    device = spec.device
    if device == "auto":
        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    if device.startswith("cuda"):
        if not llama_cpp.llama_supports_gpu_offload():
            raise CompkitError(
                f"model {spec.name!r}: device {device!r} asked for, but this llama-cpp-python "
                "build runs on CPU only; use device: cpu, or reinstall it with GPU support "
                "(CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall llama-cpp-python)"
            )
        return -1
    if device != "cpu":
        raise CompkitError(
            f"model {spec.name!r}: device {device!r} is not one of cpu, cuda, cuda:N, auto"
        )
    return 0


def _gpu_index(spec: ModelSpec) -> int:
    _, _, index = spec.device.partition(":")
    if spec.device.startswith("cuda") and index:
        if not index.isdigit():
            raise CompkitError(f"model {spec.name!r}: device {spec.device!r} is not cuda:N")
        return int(index)
    return 0


def _device_name(spec: ModelSpec, n_gpu_layers: int) -> str:
    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    return spec.device if spec.device.startswith("cuda") else "gpu"


def _load(path: Path, spec: ModelSpec, settings: dict[str, Any]) -> llama_cpp.Llama:
    try:
        with _model_params(use_extra_bufts=settings["extra_buffers"]):
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=settings["n_ctx"],
                n_batch=settings["n_batch"],
                n_threads=settings["n_threads"],
                n_threads_batch=settings["n_threads"],
                n_gpu_layers=settings["n_gpu_layers"],
                main_gpu=settings["main_gpu"],
                logits_all=False,
                seed=0,  # unused: every request builds its own seeded sampler
                verbose=settings["verbose"],
            )
    except (ValueError, RuntimeError, OSError) as exc:
        raise CompkitError(
            f"model {spec.name!r}: llama.cpp cannot load {path}: {exc} (a "
            "truncated download, or a GGUF architecture this llama-cpp-python "
            f"{llama_cpp.__version__} does not know)"
        ) from exc


@contextmanager
def _model_params(**fields: Any) -> Iterator[None]:
    """Set llama_model_params fields that ``Llama()`` has no argument for, while it loads."""
    lowlevel = importlib.import_module("llama_cpp.llama_cpp")
    original = lowlevel.llama_model_default_params

    def default_params() -> Any:
        params = original()
        for key, value in fields.items():
            setattr(params, key, value)
        return params

    with mock.patch.object(lowlevel, "llama_model_default_params", default_params):
        yield


def amx_unusable() -> bool:
    """True where llama.cpp was built with AMX kernels, the CPU advertises AMX, but the
    kernel does not enable AMX tile data (some VMs): then llama_decode would fault.

    The Makefile builds llama.cpp without AMX, so this is False there and llama.cpp's
    extra buffer types (repacked weight layouts) stay on. The CPU side is
    :func:`kit.environment.amx_tile_unusable`.
    """
    if b"AMX" not in llama_cpp.llama_print_system_info():
        return False
    return amx_tile_unusable()


def _chat_formatter(llm: llama_cpp.Llama) -> Jinja2ChatFormatter | None:
    """The formatter ``create_chat_completion`` builds from the GGUF's chat template."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def text(token: int) -> str:
        return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8") if token != -1 else ""

    return Jinja2ChatFormatter(
        template=template,
        eos_token=text(llm.token_eos()),
        bos_token=text(llm.token_bos()),
        stop_token_ids=[llm.token_eos()],
    )


def _model_desc(llm: llama_cpp.Llama) -> str:
    buf = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")


def file_sha256(path: Path) -> str:
    """sha256 of a file (:func:`kit.store.file_sha256`), remembered for this process while its
    size and mtime are unchanged (GGUF files are hashed once, not per open)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = store_sha256(path)
    return _FILE_HASHES[key]
