"""The one small interface every runtime implements.

Modelled on lm-evaluation-harness's ``LM``: a runtime *generates* text for prompts
(``generate``, like ``generate_until``) and *scores* continuations (``score_choices``,
like ``loglikelihood``). Runtimes know nothing about tasks, scoring or the run folder;
:mod:`kit.execute` turns eval items into requests and results into rows.

Every result carries what later stages need: token counts, time to first token, total
latency, token logprobs of the generated answer (for confidence), and a failure class when
a request failed (the item is kept, not dropped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kit.study import ModelSpec, SamplingConfig

#: Failure classes recorded on an item when a request fails.
ERROR_CLASSES = (
    "timeout",
    "http_5xx",
    "http_4xx",
    "connection",
    "truncated_stream",
    "invalid_response",
    "runtime_error",
)


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: chat ``messages`` (``chat: true``) or plain ``text``."""

    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("a Prompt has exactly one of messages or text")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. ``json_schema``: decoding is constrained to answers that follow it
    (``structured_output: json_schema``; :mod:`kit.structured`)."""

    item_id: str
    prompt: Prompt
    seed: int
    json_schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ChoiceRequest:
    """Score each continuation after the prompt (the assistant turn when chat)."""

    item_id: str
    prompt: Prompt
    continuations: tuple[str, ...]


@dataclass
class Generation:
    item_id: str
    text: str
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None  # time to first token
    latency_s: float | None = None  # total request latency
    token_logprobs: list[float] | None = None  # logprob of each generated token
    finish_reason: str | None = None  # "stop" | "length" | ...
    batch_size: int = 1
    error: str | None = None
    error_class: str | None = None  # one of ERROR_CLASSES
    confidence: float | None = (
        None  # confidence the runtime reports itself (predictions files), 0-1
    )
    token_ids: list[int] | None = None  # the generated token ids (in-process runtimes)
    nonfinite_logits: int | None = None  # decoding steps whose logits held a NaN or inf
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # runtime-specific figures (e.g. inter-token gaps)


@dataclass
class ChoiceScores:
    item_id: str
    logprobs: list[float]  # sum of token logprobs of each continuation
    n_tokens: list[int]  # tokens in each continuation
    latency_s: float | None = None
    error: str | None = None
    error_class: str | None = None


@dataclass(frozen=True)
class TokenScoreRequest:
    """Teacher forcing: score ``token_ids[start:]`` one position at a time.

    Position ``t`` (``start <= t < len(token_ids)``) is the model's next-token distribution
    after ``token_ids[:t]``; ``token_ids[t]`` is its target. ``support`` gives, per scored
    position, the token ids whose logprobs to return (a candidate gets the baseline's top-k);
    ``None`` returns the model's own ``top_k`` most probable tokens.
    """

    item_id: str
    token_ids: tuple[int, ...]
    start: int
    support: tuple[tuple[int, ...], ...] | None = None
    top_k: int = 32


@dataclass
class TokenScores:
    """Per scored position of a :class:`TokenScoreRequest` (log-softmax in float64 of the raw
    logits, no temperature or top-p).

    ``support_ids`` / ``support_logprobs``: the requested (or own top-k) tokens and their
    logprobs; ``target_logprobs``: logprob of the target token; ``argmax_ids`` /
    ``argmax_logprobs``: the model's most probable token; ``min_logprobs``: its least probable
    token's logprob (bounds the KL beyond the kept tokens); ``nonfinite``: logits that were NaN
    or inf (their position's values are NaN).
    """

    item_id: str
    target_logprobs: list[float]
    support_ids: list[list[int]]
    support_logprobs: list[list[float]]
    argmax_ids: list[int]
    argmax_logprobs: list[float]
    min_logprobs: list[float]
    nonfinite: list[int]
    error: str | None = None


def position_scores(req: TokenScoreRequest, logits: Any) -> TokenScores:
    """:class:`TokenScores` from raw logits (scored positions x vocabulary).

    Shared by the in-process runtimes: log-softmax in float64 over the whole vocabulary; a
    position whose logits hold a NaN or inf gets NaN values and its count in ``nonfinite``.
    Row ``j`` of ``logits`` is position ``req.start + j`` (its target ``req.token_ids[start+j]``).
    """
    import numpy as np

    from kit.errors import CompkitError

    targets = req.token_ids[req.start :]
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[0] != len(targets):
        raise CompkitError(
            f"item {req.item_id!r}: {z.shape[0]} logit rows for {len(targets)} scored positions"
        )
    bad = (~np.isfinite(z)).sum(axis=1)
    safe = np.where(np.isfinite(z), z, 0.0)
    peak = safe.max(axis=1, keepdims=True)
    logp = safe - peak - np.log(np.exp(safe - peak).sum(axis=1, keepdims=True))
    logp[bad > 0] = np.nan
    rows = np.arange(z.shape[0])
    if req.support is None:
        support = _top_k(np.nan_to_num(logp, nan=0.0), min(req.top_k, z.shape[1]))
    else:
        support = np.asarray([list(s) for s in req.support], dtype=np.int64)
        if support.shape[0] != z.shape[0] or (support.size and support.max() >= z.shape[1]):
            raise CompkitError(
                f"item {req.item_id!r}: the support ({support.shape}) does not fit "
                f"{z.shape[0]} positions of a {z.shape[1]}-token vocabulary"
            )
    argmax = np.where(bad > 0, -1, np.argmax(safe, axis=1))
    return TokenScores(
        item_id=req.item_id,
        target_logprobs=logp[rows, np.asarray(targets, dtype=np.int64)].tolist(),
        support_ids=support.tolist(),
        support_logprobs=np.take_along_axis(logp, support, axis=1).tolist(),
        argmax_ids=argmax.astype(int).tolist(),
        argmax_logprobs=np.where(bad > 0, np.nan, logp.max(axis=1)).tolist(),
        min_logprobs=np.where(bad > 0, np.nan, logp.min(axis=1)).tolist(),
        nonfinite=bad.astype(int).tolist(),
    )


def _top_k(logp: Any, k: int) -> Any:
    """Indices of the ``k`` largest values per row, largest first."""
    import numpy as np

    part = np.argpartition(-logp, kth=k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logp, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def failed_scores(req: TokenScoreRequest, error: str) -> TokenScores:
    return TokenScores(req.item_id, [], [], [], [], [], [], [], error=error)


@dataclass(frozen=True)
class ModelIdentity:
    """What exactly ran: enough to detect a swapped model later."""

    runtime: str
    runtime_version: str
    model: str
    weights_sha256: str | None = None  # combined hash of the weight files
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    served_model: str | None = None  # endpoints: model name the server reports
    endpoint: str | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    dtype: str | None = None
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[int], None]  # called with the number of items just finished


class Runtime(ABC):
    """Base class of runtimes. Subclasses register in :data:`kit.runtimes.RUNTIMES`."""

    name: ClassVar[str]

    def __init__(self, spec: ModelSpec, *, base_dir: Path | None = None):
        self.spec = spec
        self.base_dir = base_dir or Path.cwd()

    @abstractmethod
    def identity(self) -> ModelIdentity:
        """Describe the loaded model (hashes, versions) for the manifest."""

    @classmethod
    def weights_fingerprint(cls, spec: ModelSpec, *, base_dir: Path) -> str | None:
        """Hash of the model's weights *without loading it*, for ``compkit check``.

        Must equal ``identity().weights_sha256`` for the same files. ``None`` when the
        runtime cannot tell without loading (then check reports the weights as unverified).
        """
        return None

    @classmethod
    def check_source(
        cls, spec: ModelSpec, *, base_dir: Path, ids: Sequence[str], repeats: int
    ) -> str:
        """Open the model's source without running it; return what was found.

        Called by ``compkit validate`` and at the start of ``compkit run`` so a missing file,
        a malformed predictions file or a dead endpoint fails in seconds, before anything is
        written. Raises :class:`~kit.errors.CompkitError` naming the model and the source.
        """
        return "not checked before the run"

    @abstractmethod
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[Generation]:
        """Generate one answer per request, in request order."""

    def expect_ids(self, ids: Sequence[str], *, repeats: int) -> None:
        """Told the full set of item ids (and repeats) a run will ask for, before it starts.

        Runtimes with a fixed supply of answers (a predictions file) raise here when ids are
        missing or extra; model runtimes need nothing.
        """

    def score_choices(
        self, requests: Sequence[ChoiceRequest], *, progress: Progress | None = None
    ) -> list[ChoiceScores]:
        """Log-probability of each continuation; runtimes without logprobs raise."""
        raise NotImplementedError(f"runtime {self.name!r} cannot score choices")

    @property
    def supports_choice_scoring(self) -> bool:
        return type(self).score_choices is not Runtime.score_choices

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens in the prompt as the model sees it (used for length slices)."""
        raise NotImplementedError(f"runtime {self.name!r} cannot count tokens")

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of the prompt as the model sees it (teacher forcing starts from these)."""
        raise NotImplementedError(f"runtime {self.name!r} cannot tokenize")

    def score_tokens(
        self, requests: Sequence[TokenScoreRequest], *, progress: Progress | None = None
    ) -> list[TokenScores]:
        """Teacher forcing (:class:`TokenScoreRequest`); runtimes without logits raise."""
        raise NotImplementedError(f"runtime {self.name!r} cannot score tokens")

    @property
    def supports_token_scoring(self) -> bool:
        return type(self).score_tokens is not Runtime.score_tokens

    def vocabulary_sha256(self) -> str | None:
        """sha256 of the vocabulary (every token's text, in id order); two models whose
        vocabularies differ have token distributions that cannot be compared."""
        return None

    def close(self) -> None:
        """Release the model (memory, server connections)."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repeat_seed(study_seed: int, repeat: int) -> int:
    """Seed of a repeat: a stable hash of (study seed, repeat), below 2**31."""
    import hashlib

    digest = hashlib.sha256(f"{study_seed}:{repeat}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
