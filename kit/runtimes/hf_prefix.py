"""Prompt caching for the transformers runtime: a shared prompt prefix is computed once.

A study's prompts mostly share a long head (the instructions and few-shot examples of a
task). The runtime evaluates every prompt's head in blocks of :data:`PREFILL_BLOCK` tokens at
fixed positions (0, 32, 64, ...), keeps the keys and values of the last head it computed, and
hands out copies of them. A block's keys and values depend only on the tokens up to its end
and are always computed by the same operations (one forward pass of that block over the
cache of the blocks before it), so a prompt gets bit-identical logits whether its head came
from the cache or was just computed, whatever order the items run in (a resumed run changes
nothing). Only the tail after the last whole block the prompts share runs per prompt.

``options.prompt_cache: false`` turns it off (every prompt runs in one pass, as before).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Prompt heads are evaluated and shared in blocks of this many tokens (as the llama.cpp
#: runtime's :data:`kit.runtimes.llamacpp.PREFILL_BLOCK`).
PREFILL_BLOCK = 32


def shared_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row starts with."""
    if not rows:
        return 0
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


class PrefixCache:
    """The keys and values of the last prompt head computed, in whole blocks.

    Parameters
    ----------
    model
        The causal LM (its forward takes ``past_key_values``).
    device
        Where input ids go.
    takes
        Which of ``position_ids`` (blocks get their absolute ones) and ``logits_to_keep``
        (no vocabulary projection for a head) the forward takes.
    """

    def __init__(self, model: Any, *, device: torch.device, takes: set[str]):
        self.model = model
        self.device = device
        self.takes = takes
        self._tokens: list[int] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reused_tokens = 0  # head tokens served from the cache (what it saved)
        self.usable = True  # False for caches that are not plain per-position keys/values

    def take(self, ids: Sequence[int], limit: int) -> tuple[DynamicCache | None, int]:
        """A fresh cache of ``ids[:keep]``, ``keep`` = ``limit`` rounded down to whole blocks.

        Returns ``(None, 0)`` when not even one block fits under ``limit``.
        """
        keep = limit - limit % PREFILL_BLOCK
        if keep <= 0 or not self.usable:
            return None, 0
        have = min(shared_length([self._tokens, ids[:keep]]), keep)
        have -= have % PREFILL_BLOCK
        self.reused_tokens += have
        if have < keep:
            self._extend(ids, have, keep)
            if not self.usable:
                return None, 0
        return self._copy(keep), keep

    def _extend(self, ids: Sequence[int], have: int, keep: int) -> None:
        cache = self._copy(have)
        with torch.inference_mode():
            for begin in range(have, keep, PREFILL_BLOCK):
                block = list(ids[begin : begin + PREFILL_BLOCK])
                kwargs: dict[str, Any] = {"past_key_values": cache, "use_cache": True}
                if "logits_to_keep" in self.takes:
                    kwargs["logits_to_keep"] = 1
                if "position_ids" in self.takes:
                    kwargs["position_ids"] = torch.arange(
                        begin, begin + len(block), device=self.device
                    ).unsqueeze(0)
                out = self.model(input_ids=torch.tensor([block], device=self.device), **kwargs)
                cache = out.past_key_values
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            # sliding-window or other layers keep no plain per-position history to share:
            # this model runs every prompt whole, as with prompt_cache: false
            self.usable, self._tokens, self._layers = False, [], []
            return
        self._tokens = list(ids[:keep])
        self._layers = [(layer.keys, layer.values) for layer in cache.layers]

    def _copy(self, n: int) -> DynamicCache:
        """A new cache holding the first ``n`` positions of the stored head."""
        cache = DynamicCache(config=self.model.config)
        if n:
            for index, (keys, values) in enumerate(self._layers):
                cache.update(keys[..., :n, :].clone(), values[..., :n, :].clone(), index)
        return cache
