"""Constrained decoding for the transformers runtime: llguidance as a logits processor.

llguidance (the Rust grammar engine behind Guidance; ``pip install llguidance``, CPU wheels
without dependencies) compiles a JSON schema into a token-level matcher over the model's own
tokenizer. :class:`GrammarProcessor` keeps one matcher per batch row that has a schema; at
every step it feeds the row's last token to its matcher and masks every token the schema
forbids (EOS only once the JSON is complete). Rows without a schema decode freely, so a batch
may mix constrained and free items.

The processor runs after kit's score tap, so recorded token logprobs (confidence) are the
model's own, as in llama.cpp where the grammar sampler follows the logits read-out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from kit.errors import CompkitError

#: At most one space between JSON tokens (llguidance's default admits any run of whitespace,
#: and a small model can spend its whole token budget on newlines; llama.cpp's GBNF bounds
#: it too).
JSON_OPTIONS = {"whitespace_pattern": r"[ ]?"}


def llg_tokenizer(tokenizer: Any, n_vocab: int) -> Any:
    """An llguidance tokenizer for a fast Hugging Face tokenizer (about 1 s; cache it)."""
    try:
        import llguidance.hf
    except ImportError as exc:  # pragma: no cover - pinned in requirements/base.txt
        raise CompkitError(
            "structured_output: json_schema with the transformers runtime needs llguidance "
            "(pip install 'llguidance==1.9.1')"
        ) from exc
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
    except ValueError as exc:
        raise CompkitError(
            f"structured_output needs a fast tokenizer (tokenizer.json); {exc}"
        ) from exc


class GrammarProcessor(LogitsProcessor):
    """Masks each constrained row's logits to the tokens its JSON schema allows.

    Parameters
    ----------
    tokenizer
        From :func:`llg_tokenizer`.
    schemas
        One entry per batch row: the row's JSON schema, or ``None`` (unconstrained).
    prompt_len
        Width of the (left-padded) prompt; tokens after it are generated.
    """

    def __init__(
        self, tokenizer: Any, schemas: Sequence[Mapping[str, Any] | None], *, prompt_len: int
    ):
        import llguidance

        self.prompt_len = prompt_len
        self.matchers: list[Any] = []
        for schema in schemas:
            if schema is None:
                self.matchers.append(None)
                continue
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                dict(schema), defaults=JSON_OPTIONS
            )
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if matcher.is_error():
                raise CompkitError(f"llguidance refused a JSON schema: {matcher.get_error()}")
            self.matchers.append(matcher)
        self.n_words = (tokenizer.vocab_size + 31) // 32
        self.errors: list[str | None] = [None] * len(self.matchers)

    @property
    def active(self) -> bool:
        return any(m is not None for m in self.matchers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from llguidance.numpy import fill_next_token_bitmask

        step = input_ids.shape[1] - self.prompt_len
        bitmask = np.full((len(self.matchers), self.n_words), -1, dtype=np.int32)
        rows = []
        for row, matcher in enumerate(self.matchers):
            if matcher is None or self.errors[row] is not None:
                continue
            fed = step > 0 and not matcher.is_stopped()
            if fed and not matcher.consume_token(int(input_ids[row, -1])):
                self.errors[row] = matcher.get_error()
                continue
            # a stopped matcher (the JSON is complete) allows only EOS
            fill_next_token_bitmask(matcher, bitmask, row)
            rows.append(row)
        if rows:
            allowed = _unpack(bitmask[rows], scores.shape[-1])
            sub = scores[rows]
            sub[~torch.from_numpy(allowed).to(scores.device)] = float("-inf")
            scores[rows] = sub
        return scores


def _unpack(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """Bool mask ``rows x vocab`` from llguidance's 32-bit little-endian words."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)
    if bits.shape[1] < vocab:
        bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
    return bits[:, :vocab]
