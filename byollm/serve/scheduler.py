"""Prefill for the batching engine: prompts go into the cache a chunk at a time, next to the running decodes.

A step of the engine (byollm.serve.engine) prefills newly admitted requests, then runs one decode forward for
the running ones. A 2,000-token prompt prefilled whole makes that step as long as 2,000 tokens of compute, and
every running stream waits for it: one long prompt shows up as a stall in everyone's inter-token latency.
Chunked prefill bounds the prompt work of a step: at most `chunk_tokens` prompt tokens per step, then the
decode batch runs, so the running streams get a token every step whatever arrives.

A request is *prefilling* from admission until its whole prompt is in its cache row. Each step continues the
oldest prefilling request by one piece of at most the budget left; a piece after the first starts at the row's
length, so its tokens take the next positions and attend to the earlier pieces through the cache, as a
decode step does, just more than one token at a time. Only the last piece computes logits: its last position
gives the first generated token. Short prompts take less than the budget, and the next prefilling request
gets the rest in the same step.

Rows. Decoding requests are kept in rows 0..d-1 (the decode batch is a slice). A prefilling request starts in
whatever row `byollm.serve.prefix_cache.place` gives it (a free row, maybe one that already holds the start
of its prompt); when its prompt is done it swaps into row d and joins the decode rows. Requests with the very
same prompt as one whose prefill just finished (`n > 1` completions, or the same request sent twice at once)
are not prefilled at all: they copy its rows (its whole prompt) and sample their first token from its logits,
each with its own generator. So n completions of one prompt cost one prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from byollm.sampling import GenerationError
from byollm.serve.prefix_cache import MIN_PREFIX_TOKENS, place
from byollm.serve.slot_cache import SlotKVCache


class Prefillable(Protocol):
    """What the scheduler reads and sets on an engine request."""

    prompt: list[int]
    history: list[int]  # prompt + generated tokens
    slot: int  # its cache row; -1 until its prefill starts


@dataclass
class PrefillStats:
    """Counters since the engine started (read by /metrics)."""

    computed_tokens: int = 0  # prompt tokens actually run through the model
    prefix_hits: int = 0  # requests that started from a cached prefix (or another request's whole prompt)
    prefix_hit_tokens: int = 0  # prompt tokens taken from the cache instead of computed


class PrefillScheduler:
    """Runs each step's prefill work for the engine. See the module docstring.

    chunk_tokens: at most this many prompt tokens per step (None: whole prompts, all admitted at once).
    prefix_caching: start prompts from cached prefixes (byollm.serve.prefix_cache) and share identical prompts.
    """

    def __init__(self, model: nn.Module, cache: SlotKVCache, *, chunk_tokens: int | None = 256,
                 prefix_caching: bool = True, min_prefix_tokens: int = MIN_PREFIX_TOKENS) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise GenerationError(f"prefill_chunk_tokens must be >= 1 or None (whole prompts), got {chunk_tokens}")
        self.model, self.cache = model, cache
        self.chunk_tokens, self.prefix_caching, self.min_prefix_tokens = chunk_tokens, prefix_caching, min_prefix_tokens
        self.stats = PrefillStats()

    def run(self, prefilling: list[Prefillable],
            decoding: list[Prefillable]) -> list[tuple[Prefillable, torch.Tensor]]:
        """Do one step's prefill work for `prefilling` (oldest first) next to the `decoding` rows 0..d-1.
        Return the requests whose prompt is now in the cache, each with the logits of its last position, in
        the order they were put into rows d, d+1, ...: the order in which they must join the decode rows."""
        budget = self.chunk_tokens or math.inf
        done: list[tuple[Prefillable, torch.Tensor]] = []
        for request in prefilling:
            if budget <= 0:
                break
            if any(request is r for r, _ in done):  # shared an earlier request's prompt
                continue
            if request.slot < 0:
                self._start(request, prefilling, decoding + [r for r, _ in done])
            start = self.cache.lengths[request.slot]
            n = int(min(budget, len(request.prompt) - start))
            logits = self._forward(request, start, n)
            budget -= n
            if logits is None:  # the budget ended inside this prompt: it goes on next step
                break
            self._join(request, len(decoding) + len(done))
            done.append((request, logits))
            for twin in self._twins(request, prefilling, done):
                twin.slot = len(decoding) + len(done)  # a free row: the decode rows and `done` come before it
                self.cache.copy_prefix(request.slot, twin.slot, len(request.prompt))
                self.cache.take(twin.slot, len(request.prompt))
                self._count(len(request.prompt))
                done.append((twin, logits))
        return done

    def drop(self, request: Prefillable) -> None:
        """A prefilling request was cancelled: free its row, keeping what it prefilled for reuse."""
        if request.slot >= 0:
            self.cache.free(request.slot, request.prompt[:self.cache.lengths[request.slot]])
            request.slot = -1

    # ---- the pieces ------------------------------------------------------------------------------
    def _start(self, request: Prefillable, prefilling: list[Prefillable], busy: list[Prefillable]) -> None:
        """Give the request a row, with as much of its prompt already cached as the rows allow."""
        held = {r.slot: r.history[:self.cache.lengths[r.slot]] for r in busy}
        held |= {r.slot: r.prompt[:self.cache.lengths[r.slot]] for r in prefilling if r.slot >= 0}
        free = [row for row in range(len(self.cache.lengths)) if row not in held]
        if self.prefix_caching:
            request.slot, cached = place(request.prompt, self.cache, held, free, self.min_prefix_tokens)
        else:
            request.slot, cached = free[0], 0
            self.cache.take(request.slot)
        self._count(cached)

    def _forward(self, request: Prefillable, start: int, n: int) -> torch.Tensor | None:
        """Run prompt[start:start + n] into the request's row, after its `start` cached positions. Return the
        logits of the prompt's last position if this piece ends the prompt, else None."""
        ids = torch.tensor([request.prompt[start:start + n]], device=self.cache.k[0].device)
        self.cache.bind(request.slot, request.slot + 1, n)
        self.stats.computed_tokens += n
        # No positions, no mask: the model continues from the row's length (kv_cache.length) with causal
        # attention over the cached positions and these, as for any cached sequence.
        if start + n < len(request.prompt):
            self.model.hidden_states(ids, kv_cache=self.cache)  # only its keys and values are needed
            return None
        return self.model(ids, kv_cache=self.cache, logits_to_keep=1).logits[0, -1]

    def _join(self, request: Prefillable, row: int) -> None:
        """Move a fully prefilled request into `row`, the first row after the decode rows."""
        self.cache.swap(request.slot, row)
        request.slot = row

    def _twins(self, request: Prefillable, prefilling: list[Prefillable],
               done: list[tuple[Prefillable, torch.Tensor]]) -> list[Prefillable]:
        """Not yet started requests with exactly `request`'s prompt: they share its prefill."""
        if not self.prefix_caching:
            return []
        return [r for r in prefilling if r.slot < 0 and r.prompt == request.prompt and all(r is not d for d, _ in done)]

    def _count(self, cached: int) -> None:
        if cached:
            self.stats.prefix_hits += 1
            self.stats.prefix_hit_tokens += cached


__all__ = ["PrefillScheduler", "PrefillStats", "Prefillable"]
