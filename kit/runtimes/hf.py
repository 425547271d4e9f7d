"""Hugging Face transformers runtime: a causal LM in this process, on CPU or CUDA.

Loads a local folder (safetensors only, never pickles, never remote code), a GGUF inside a
folder (``gguf_file``), or ``builtin:<name>`` (see :mod:`kit.models`). Recipes that build a
modified model in memory hand it in with :meth:`TransformersRuntime.from_model`.

Generation runs length-sorted, left-padded batches through ``model.generate``. Two small
hooks ride along every decoding step instead of ``output_scores``: a logits processor that
keeps a reference to the final processed scores, and a stopping criterion that turns them
into the chosen token's logprob, timestamps the step, and notes which rows finished (EOS
or a stop string). That gives per-item ``token_logprobs``, ``ttft_s`` and ``latency_s`` at
the cost of one ``logsumexp`` per step, without storing a vocabulary-sized tensor per step.

Sampling settings come only from the study's :class:`~kit.study.SamplingConfig`: the
model's own ``generation_config`` sampling defaults (temperature, top_k, repetition
penalty ...) are neutralised, so every runtime decodes under the same rule.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from kit.errors import CompkitError
from kit.models import (
    BUILTIN_PREFIX,
    builtin_gguf_path,
    identity_files,
    read_source_record,
    resolve_model_dir,
    weights_identity,
)
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
from kit.runtimes.hf_prefix import PrefixCache, shared_length
from kit.study import ModelSpec, SamplingConfig

T = TypeVar("T")
R = TypeVar("R")

#: Generation settings that would change decoding if a model's generation_config set them.
_NEUTRAL_GENERATION = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "renormalize_logits": False,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}
#: Sampling warpers transformers would add itself; ours run before the score tap instead.
_NEUTRAL_SAMPLING = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


@dataclass(frozen=True)
class _Source:
    """Where a loaded model came from."""

    folder: Path
    gguf_file: str | None
    builtin: str | None


@dataclass
class _Encoded:
    """One generation request, tokenized."""

    index: int
    request: GenerationRequest
    ids: list[int]


class TransformersRuntime(Runtime):
    """A transformers causal LM behind the :class:`~kit.runtimes.base.Runtime` interface.

    Parameters
    ----------
    spec
        ``spec.model`` is ``builtin:<name>``, a folder, or a ``.gguf`` file; ``gguf_file``
        picks a GGUF inside the folder; ``dtype``, ``device`` ("auto" = CUDA when
        available) and ``batch_size`` apply.
    base_dir
        Folder that relative model paths are resolved against.

    Examples
    --------
    >>> spec = ModelSpec(name="base", runtime="transformers",
    ...                  model="builtin:smollm2-135m-instruct")  # doctest: +SKIP
    >>> with TransformersRuntime(spec) as rt:  # doctest: +SKIP
    ...     rt.generate([GenerationRequest("q1", Prompt(text="Hello"), seed=1)],
    ...                 sampling=SamplingConfig(max_new_tokens=8))
    """

    name = "transformers"

    def __init__(self, spec: ModelSpec, *, base_dir: Path | None = None):
        super().__init__(spec, base_dir=base_dir)
        self._source = _locate(spec, self.base_dir)
        self.model, self.tokenizer = _load(self._source, spec)
        self._prepare()

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, spec: ModelSpec, *, base_dir: Path | None = None
    ) -> TransformersRuntime:
        """Wrap a model already in memory (e.g. one a compression recipe modified).

        The model stays on its device and is put in eval mode; the tokenizer is not
        modified. :meth:`identity` hashes the model's state dict instead of files.
        """
        self = cls.__new__(cls)
        Runtime.__init__(self, spec, base_dir=base_dir)
        self._source = None
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._prepare()
        return self

    def _prepare(self) -> None:
        self.device = _model_device(self.model)
        self._identity: ModelIdentity | None = None
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        forward = inspect.signature(self.model.forward).parameters
        self._forward_takes = {k for k in ("position_ids", "logits_to_keep") if k in forward}
        self._prefix = (
            PrefixCache(self.model, device=self.device, takes=self._forward_takes)
            if self.spec.options.get("prompt_cache", True)
            else None
        )

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from the prompt cache so far (:mod:`kit.runtimes.hf_prefix`)."""
        return self._prefix.reused_tokens if self._prefix is not None else 0

    def _cached_head(self, ids: Sequence[int], limit: int) -> tuple[Any, int]:
        """A cache holding the whole blocks of ``ids[:limit]`` and their length, or (None, 0)."""
        if self._prefix is None:
            return None, 0
        return self._prefix.take(ids, limit)

    def _after_head(self, ids: Sequence[int], cache: Any, keep: int) -> dict[str, Any]:
        """Forward arguments for the tail ``ids[keep:]`` of one sequence over ``cache``."""
        kwargs: dict[str, Any] = {"input_ids": torch.tensor([list(ids[keep:])], device=self.device)}
        if cache is not None:
            kwargs["past_key_values"] = cache
            if "position_ids" in self._forward_takes:
                kwargs["position_ids"] = torch.arange(keep, len(ids), device=self.device)[None]
        return kwargs

    # ------------------------------------------------------------------ prompts

    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as the model reads it (chat template applied for chat prompts)."""
        if prompt.text is not None:
            return prompt.text
        if not getattr(self.tokenizer, "chat_template", None):
            raise CompkitError(
                f"model {self.spec.name!r} ({self.spec.model}): the tokenizer has "
                "no chat template; use prompt.chat: false for this model"
            )
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in prompt.messages or ()], add_generation_prompt=True, tokenize=False
        )

    def _encode_text(self, text: str, *, chat: bool) -> list[int]:
        # a chat template already holds the special tokens; plain text gets the usual ones
        return list(self.tokenizer(text, add_special_tokens=not chat).input_ids)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of the prompt, unpadded."""
        return self._encode_text(self.prompt_text(prompt), chat=prompt.messages is not None)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.encode_prompt(prompt))

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[Generation]:
        encoded = [_Encoded(i, r, self.encode_prompt(r.prompt)) for i, r in enumerate(requests)]
        encoded.sort(key=lambda e: (-len(e.ids), e.index))
        results: list[Generation | None] = [None] * len(encoded)
        for batch in _chunks(encoded, self.spec.batch_size):
            generations = _split_on_oom(
                batch, lambda b: self._generate_batch(b, sampling), self._oom_generations
            )
            for enc, gen in zip(batch, generations, strict=True):
                results[enc.index] = gen
            if progress is not None:
                progress(len(batch))
        return [r for r in results if r is not None]

    def _generate_batch(self, batch: list[_Encoded], sampling: SamplingConfig) -> list[Generation]:
        start = time.perf_counter()
        rows = [e.ids for e in batch]
        head, keep = self._cached_head(rows[0], min(shared_length(rows), *map(len, rows)) - 1)
        input_ids, attention_mask = self._pad(rows, keep)
        if head is not None:
            head.batch_repeat_interleave(len(rows))
        tap, raw = _ScoreTap(_warpers(sampling)), _FiniteTap()
        watch = _StepWatch(
            tap,
            eos_ids=self.eos_ids,
            stop=sampling.stop,
            tokenizer=self.tokenizer,
            prompt_len=input_ids.shape[1],
            device=self.device,
        )
        # as llama.cpp's chain: the grammar masks first, then temperature and top-p draw from
        # what it allows (top-p first could leave nothing allowed); the tap records the
        # model's own sampling distribution, without the grammar
        grammar = self._grammar_processor(batch, prompt_len=input_ids.shape[1])
        processors = LogitsProcessorList(
            [raw, tap, *([grammar] if grammar is not None else []), *_warpers(sampling)]
        )
        if not sampling.greedy:
            torch.manual_seed(batch[0].request.seed)
        with torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=head,
                generation_config=self._generation_config(sampling),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([watch]),
            )
        generated = sequences[:, input_ids.shape[1] :].tolist()
        logprobs = watch.logprobs_by_row()
        bad = raw.by_row()
        return [
            self._finish(
                enc, generated[row], logprobs[row], watch, row, start, sampling, len(batch), bad
            )
            for row, enc in enumerate(batch)
        ]

    def _finish(
        self,
        enc: _Encoded,
        generated: list[int],
        logprobs: list[float],
        watch: _StepWatch,
        row: int,
        start: float,
        sampling: SamplingConfig,
        batch_size: int,
        nonfinite: list[list[bool]],
    ) -> Generation:
        step = watch.finished_at[row]
        n = len(watch.times) if step is None else step + 1
        text = _cut_at_stop(
            self.tokenizer.decode(generated[:n], skip_special_tokens=True), sampling.stop
        )
        return Generation(
            item_id=enc.request.item_id,
            text=text,
            prompt_tokens=len(enc.ids),
            output_tokens=n,
            ttft_s=watch.times[0] - start if watch.times else None,
            latency_s=watch.times[n - 1] - start if n else None,
            token_logprobs=logprobs[:n],
            finish_reason="length" if step is None else "stop",
            batch_size=batch_size,
            extra={"step_times_s": [t - start for t in watch.times[:n]]},  # per token
            token_ids=[int(t) for t in generated[:n]],
            nonfinite_logits=int(sum(nonfinite[row][:n])) if nonfinite else 0,
        )

    def _grammar_processor(self, batch: list[_Encoded], *, prompt_len: int) -> Any:
        """llguidance's processor when a row of ``batch`` has a JSON schema, else ``None``."""
        schemas = [e.request.json_schema for e in batch]
        if all(s is None for s in schemas):
            return None
        from kit.runtimes.hf_grammar import GrammarProcessor, llg_tokenizer

        if getattr(self, "_llg", None) is None:
            self._llg = llg_tokenizer(self.tokenizer, self.model.config.vocab_size)
        return GrammarProcessor(self._llg, schemas, prompt_len=prompt_len)

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        settings: dict[str, Any] = {
            **_NEUTRAL_GENERATION,
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": not sampling.greedy,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_ids or None,
        }
        if not sampling.greedy:
            settings.update(_NEUTRAL_SAMPLING)  # our own warpers run before the score tap
            if getattr(self.model.generation_config, "min_p", None) is not None:
                settings["min_p"] = 0.0  # None would inherit the model's min_p
        return GenerationConfig(**settings)

    def _pad(self, rows: list[list[int]], keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows padded to one width: the shared cached head ``[:keep]`` first, then the pads,
        then each row's tail (``keep=0``: left padding)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if keep:
                ids[i, :keep] = torch.tensor(r[:keep], dtype=torch.long)
                mask[i, :keep] = 1
            if len(r) > keep:
                ids[i, width - len(r) + keep :] = torch.tensor(r[keep:], dtype=torch.long)
                mask[i, width - len(r) + keep :] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _oom_generations(enc: _Encoded, exc: BaseException) -> Generation:
        return Generation(
            item_id=enc.request.item_id,
            text="",
            prompt_tokens=len(enc.ids),
            error=f"out of memory generating for a {len(enc.ids)}-token prompt even alone: {exc}",
            error_class="runtime_error",
        )

    # ------------------------------------------------------------------ score choices

    def score_choices(
        self, requests: Sequence[ChoiceRequest], *, progress: Progress | None = None
    ) -> list[ChoiceScores]:
        """Sum of continuation-token logprobs after each prompt (lm-evaluation-harness rule).

        Context and context+continuation are encoded separately (trailing whitespace of the
        context moves to the continuation) and the continuation is the tokens after the
        context's. The shared context runs once per request with the KV cache on; all of its
        continuations are then scored in one small batch on top of the expanded cache, so
        12 labels cost about one prompt pass instead of twelve.
        """
        pairs = self._choice_pairs(requests)
        by_request: dict[int, list[_Pair]] = {}
        for p in pairs:
            by_request.setdefault(p.request, []).append(p)
        results = []
        for i, req in enumerate(requests):
            group = by_request.get(i, [])
            start = time.perf_counter()
            sums = self._score_shared(group) if any(p.target for p in group) else [0.0] * len(group)
            results.append(
                ChoiceScores(
                    item_id=req.item_id,
                    logprobs=sums,
                    n_tokens=[len(p.target) for p in group],
                    latency_s=time.perf_counter() - start,
                )
            )
            if progress is not None:
                progress(1)
        return results

    def _score_shared(self, group: list[_Pair]) -> list[float]:
        """Score every continuation of one request with one pass over the shared context."""
        context = group[0].context
        if any(p.context != context for p in group):  # tokenization diverged: score alone
            return [self._score_shared([p])[0] for p in group]
        sums = [0.0] * len(group)
        head, keep = self._cached_head(context, len(context) - 1)
        with torch.inference_mode():
            out = self.model(**self._after_head(context, head, keep), use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            for j, p in enumerate(group):
                if p.target:
                    sums[j] = float(first[p.target[0]])
            longer = [j for j, p in enumerate(group) if len(p.target) > 1]
            if not longer:
                return sums
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(longer))
            width = max(len(group[j].target) - 1 for j in longer)
            n_ctx = len(context)
            input_ids = torch.full((len(longer), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(longer), n_ctx + width), dtype=torch.long)
            mask[:, :n_ctx] = 1
            for row, j in enumerate(longer):  # right-padded: pads come after every real token
                tail = group[j].target[:-1]
                input_ids[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                mask[row, n_ctx : n_ctx + len(tail)] = 1
            kwargs: dict[str, Any] = {
                "attention_mask": mask.to(self.device),
                "past_key_values": cache,
            }
            if "position_ids" in self._forward_takes:
                positions = torch.arange(n_ctx, n_ctx + width, device=self.device)
                kwargs["position_ids"] = positions.expand(len(longer), -1)
            logits = self.model(input_ids=input_ids.to(self.device), **kwargs).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, j in enumerate(longer):
                target = group[j].target
                picked = logprobs[row, torch.arange(len(target) - 1), torch.tensor(target[1:])]
                sums[j] += float(picked.sum())
        return sums

    def _choice_pairs(self, requests: Sequence[ChoiceRequest]) -> list[_Pair]:
        pairs = []
        for i, req in enumerate(requests):
            context = self.prompt_text(req.prompt)
            chat = req.prompt.messages is not None
            for j, cont in enumerate(req.continuations):
                ctx_ids, target = self._encode_pair(context, cont, chat=chat)
                pairs.append(_Pair(i, j, ctx_ids, target))
        return pairs

    def _encode_pair(
        self, context: str, continuation: str, *, chat: bool
    ) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode_text(context + continuation, chat=chat)
        ctx = self._encode_text(context, chat=chat)
        if not ctx:  # nothing to condition on: start from a special token, as lm-eval does
            start = self.tokenizer.bos_token_id
            return [start if start is not None else self.pad_id], whole
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ teacher forcing

    def score_tokens(
        self, requests: Sequence[TokenScoreRequest], *, progress: Progress | None = None
    ) -> list[TokenScores]:
        """Teacher forcing: one forward pass per sequence (no padding, so nothing else enters
        a dynamically quantized layer's activation scale), logits kept only for the scored
        positions, log-softmax in float64."""
        results = []
        for req in requests:
            try:
                results.append(self._score_sequence(req))
            except torch.OutOfMemoryError as exc:
                results.append(failed_scores(req, f"out of memory: {exc}"))
            if progress is not None:
                progress(1)
        return results

    def _score_sequence(self, req: TokenScoreRequest) -> TokenScores:
        ids = list(req.token_ids)
        n_scored = len(ids) - req.start
        if n_scored <= 0 or req.start < 1:
            raise CompkitError(f"item {req.item_id!r}: nothing to score (start={req.start})")
        head, keep = self._cached_head(ids, req.start - 1)
        kwargs = self._after_head(ids, head, keep)
        if "logits_to_keep" in self._forward_takes:
            kwargs["logits_to_keep"] = n_scored + 1
        with torch.inference_mode():
            logits = self.model(use_cache=head is not None, **kwargs).logits[0]
        # the last n_scored + 1 rows are positions start-1 .. end; the last predicts past the end
        logits = logits[-(n_scored + 1) : -1].float().cpu().double().numpy()
        return position_scores(req, logits)

    def vocabulary_sha256(self) -> str | None:
        """sha256 of the tokenizer's token strings in id order (JSON list)."""
        import json

        tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()

    # ------------------------------------------------------------------ identity

    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = self._describe()
        return self._identity

    @classmethod
    def check_source(cls, spec: ModelSpec, *, base_dir: Path, ids, repeats: int) -> str:
        """The model folder (or the builtin package's GGUF) exists and holds loadable weights
        (safetensors or a GGUF; pickle-only folders are refused)."""
        if spec.model.startswith(BUILTIN_PREFIX):
            gguf = builtin_gguf_path(spec.model.removeprefix(BUILTIN_PREFIX))
            return f"builtin model, GGUF {gguf}"
        source = _locate(spec, base_dir)
        return f"model folder {source.folder}" + (
            f" (GGUF {source.gguf_file})" if source.gguf_file else ""
        )

    @classmethod
    def weights_fingerprint(cls, spec: ModelSpec, *, base_dir: Path) -> str | None:
        """Combined sha256 of the model folder's files, without loading the model.

        Equals ``identity().weights_sha256`` of a runtime opened from the same spec. A
        ``builtin:`` model is converted first if its cache folder is missing.
        """
        source = _locate(spec, base_dir)
        return weights_identity(source.folder, gguf_file=source.gguf_file)[0]

    def _describe(self) -> ModelIdentity:
        common = {
            "runtime": self.name,
            "runtime_version": f"transformers {transformers.__version__}; torch {torch.__version__}",
            "model": self.spec.model,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
        }
        if self._source is None:
            digest, size = state_dict_sha256(self.model)
            extra = {
                "source": "in-memory model",
                "tokenizer_sha256": _tokenizer_sha256(self.tokenizer),
            }
            return ModelIdentity(weights_sha256=digest, size_bytes=size, extra=extra, **common)
        src = self._source
        combined, files, size = weights_identity(src.folder, gguf_file=src.gguf_file)
        extra: dict[str, Any] = {"path": str(src.folder), "gguf_file": src.gguf_file}
        if src.builtin is not None:
            record = read_source_record(src.folder) or {}
            extra.update(
                builtin=src.builtin,
                source_gguf_file=record.get("gguf_file"),
                source_gguf_sha256=record.get("gguf_sha256"),
            )
        return ModelIdentity(
            weights_sha256=combined, files=files, size_bytes=size, extra=extra, **common
        )

    def close(self) -> None:
        model = getattr(self, "model", None)
        self.model = None
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- decoding hooks


class _ScoreTap(LogitsProcessor):
    """Keeps the scores of the current step as the model's sampling distribution gives them
    (its ``warpers``, temperature and top-p, applied to a copy; no grammar); passes the raw
    scores on unchanged."""

    def __init__(self, warpers: Sequence[LogitsProcessor] = ()) -> None:
        self.warpers = list(warpers)
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = scores
        for warper in self.warpers:
            warped = warper(input_ids, warped.clone())
        self.scores = warped
        return scores


class _FiniteTap(LogitsProcessor):
    """First logits processor: notes, per step and row, whether the raw logits held a NaN or
    an inf (before temperature or top-p, which set -inf on purpose)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append((~torch.isfinite(scores)).any(dim=-1))
        return scores

    def by_row(self) -> list[list[bool]]:
        if not self.steps:
            return []
        return torch.stack(self.steps, dim=1).cpu().tolist()


class _StepWatch(StoppingCriteria):
    """Called after each decoding step: logprob of the chosen tokens, time, finished rows."""

    def __init__(
        self,
        tap: _ScoreTap,
        *,
        eos_ids: list[int],
        stop: Sequence[str],
        tokenizer: Any,
        prompt_len: int,
        device: torch.device,
    ):
        self.tap = tap
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.stop = [s for s in stop if s]
        # a stop string spans at most 4 byte-level tokens per character, plus a margin
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.steps: list[torch.Tensor] = []
        self.times: list[float] = []
        self.finished_at: list[int | None] = []
        self.done: torch.Tensor | None = None  # rows finished (EOS or stop string), on device

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tokens = input_ids[:, -1]
        step_scores = self.tap.scores
        assert step_scores is not None, "the score tap did not run before the stopping criterion"
        chosen = step_scores.gather(1, tokens[:, None]).squeeze(1)
        self.steps.append(chosen - torch.logsumexp(step_scores, dim=-1))
        if self.done is None:
            self.done = torch.zeros_like(tokens, dtype=torch.bool)
            self.finished_at = [None] * len(tokens)
        hits = torch.isin(tokens, self.eos) & ~self.done
        flags = hits.tolist()  # waits for the device: the step's tokens exist now
        self.times.append(time.perf_counter())
        if self.stop:
            flags = [a or b for a, b in zip(flags, self._stop_string_hits(input_ids), strict=True)]
        step = len(self.times) - 1
        for row in (r for r, hit in enumerate(flags) if hit):
            self.finished_at[row] = step
            self.done[row] = True
        return self.done.clone()

    def _stop_string_hits(self, input_ids: torch.LongTensor) -> list[bool]:
        """Rows whose last generated tokens contain a stop string."""
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :].tolist()
        hits = []
        for tail, done in zip(tails, self.finished_at, strict=True):
            text = self.tokenizer.decode(tail, skip_special_tokens=False) if done is None else ""
            hits.append(any(s in text for s in self.stop))
        return hits

    def logprobs_by_row(self) -> list[list[float]]:
        if not self.steps:
            return []
        return torch.stack(self.steps, dim=1).float().cpu().tolist()


def _warpers(sampling: SamplingConfig) -> list[LogitsProcessor]:
    """Temperature and top-p (the score tap applies them too: logprobs are post-warping)."""
    if sampling.greedy:
        return []
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


# ---------------------------------------------------------------------- loading


def _locate(spec: ModelSpec, base_dir: Path) -> _Source:
    path = resolve_model_dir(spec.model, base_dir=base_dir)
    builtin = (
        spec.model.removeprefix(BUILTIN_PREFIX) if spec.model.startswith(BUILTIN_PREFIX) else None
    )
    if path.is_file():
        if path.suffix != ".gguf":
            raise CompkitError(
                f"model {spec.model!r} ({spec.name}): {path} is a file but not a "
                ".gguf; give the model folder instead"
            )
        if spec.gguf_file not in (None, path.name):
            raise CompkitError(
                f"model {spec.name!r}: model names the GGUF {path.name} but "
                f"gguf_file says {spec.gguf_file!r}"
            )
        return _Source(path.parent, path.name, builtin)
    identity_files(path, gguf_file=spec.gguf_file)  # refuses pickle-only or empty folders
    return _Source(path, spec.gguf_file, builtin)


def _device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec.device)
    except RuntimeError as exc:
        raise CompkitError(
            f"model {spec.name!r}: device {spec.device!r} is not a torch device"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompkitError(
            f"model {spec.name!r}: device {spec.device!r} asked for, but torch sees "
            "no CUDA device here; use device: cpu or auto"
        )
    return device


def _load(source: _Source, spec: ModelSpec) -> tuple[Any, Any]:
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if source.gguf_file:
        common["gguf_file"] = source.gguf_file
    dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    device = _device(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=dtype, use_safetensors=None if source.gguf_file else True, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(source.folder, padding_side="left", **common)
    except (OSError, ValueError, KeyError) as exc:
        raise CompkitError(
            f"model {spec.name!r}: cannot load {spec.model!r} from {source.folder} "
            f"with transformers: {exc}"
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _model_device(model: Any) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for i in value if isinstance(value, list | tuple) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


# ---------------------------------------------------------------------- identity helpers


def state_dict_sha256(model: Any) -> tuple[str, int]:
    """sha256 over the names, dtypes, shapes and bytes of a model's state dict.

    Returns
    -------
    tuple
        ``(hex digest, total tensor bytes)``. Quantized tensors hash their integer values
        and quantization parameters; other non-tensor entries hash their ``repr``.
    """
    h = hashlib.sha256()
    size = 0
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0")
        size += _hash_value(h, value)
    return h.hexdigest(), size


def _hash_value(h: Any, value: Any) -> int:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_quantized:
            h.update(f"q{t.qscheme()}".encode())
            size = _hash_value(h, t.int_repr())
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                h.update(f"{t.q_scale()}:{t.q_zero_point()}".encode())
            else:
                size += _hash_value(h, t.q_per_channel_scales())
                size += _hash_value(h, t.q_per_channel_zero_points())
            return size
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(raw.tobytes())
        return raw.nbytes
    if isinstance(value, list | tuple):
        return sum(_hash_value(h, v) for v in value)
    h.update(repr(value).encode())
    return 0


def _tokenizer_sha256(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    payload = backend.to_str() + "\0" + str(getattr(tokenizer, "chat_template", None) or "")
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------- batching helpers


@dataclass(frozen=True)
class _Pair:
    """One (request, continuation) to score: context ids and continuation ids."""

    request: int
    choice: int
    context: list[int]
    target: list[int]


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _split_on_oom(
    batch: list[T], run: Callable[[list[T]], list[R]], alone: Callable[[T, BaseException], R]
) -> list[R]:
    """Run a batch; on out-of-memory retry it in halves, down to single items.

    An item that runs out of memory even alone becomes ``alone(item, exc)``.
    """
    try:
        return run(batch)
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            return [alone(batch[0], exc)]
    half = len(batch) // 2
    return _split_on_oom(batch[:half], run, alone) + _split_on_oom(batch[half:], run, alone)
