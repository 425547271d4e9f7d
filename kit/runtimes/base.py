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
from collections.abc import Callable, Sequence
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
    item_id: str
    prompt: Prompt
    seed: int


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
