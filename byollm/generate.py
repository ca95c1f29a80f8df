"""Text generation: turn next-token scores into text, one token at a time.

A language model only ever answers one question: given these tokens, how likely is each possible next token?
Generating text is a loop around that answer:

    1. prefill: run the whole prompt through the model once; keep the logits of the last position,
    2. pick the next token from those logits (greedy argmax, or sampling with temperature/top-k/top-p/min-p),
    3. decode: feed just that token back in (the KV cache remembers the keys and values of everything before),
    4. stop at a stop token, a stop string or `max_new_tokens`.

How step 2 picks and when step 4 stops live in `byollm.sampling` (SamplingParams, the logit filters,
sample_next, StopChecker), shared with the serving engine. This module is the loop, in the forms the CLI,
RAG and RLHF rollouts use:

    iter_generate             the loop itself, yielding one TokenEvent per new token (streaming)
    generate                  the loop run to the end -> GenerationResult (ids, text, finish reason, counts)
    generate_text             strings in, strings out
    stream_text               one string in, text pieces out as they complete
    inference_mode            eval mode + no autograd around model calls, restoring the mode afterwards

Batches. Prompts of different lengths are LEFT-padded, so every sequence's next token is in the last column:

    [pad pad  A   B   C ]   attention_mask [0 0 1 1 1]   position_ids [0 0 0 1 2]
    [ D   E   F   G   H ]                  [1 1 1 1 1]                [0 1 2 3 4]

The mask keeps real tokens from attending to padding, and positions count real tokens only
(`position_ids_from_mask`: cumsum(mask) - 1, as Hugging Face does), so each sequence gets exactly the numbers
it would get alone. A sequence that has finished keeps being fed a pad token (the batch stays rectangular)
but is not extended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.model.model import KVCache, position_ids_from_mask
from byollm.sampling import (
    FinishReason,
    GenerationError,
    SamplingParams,
    StopChecker,
    is_int,
    sample_next,
    seeded_generator,
)
from byollm.tokenizer.base import Tokenizer

# --------------------------------------------------------------------------------------------------
# Results and streaming events
# --------------------------------------------------------------------------------------------------


class TokenEvent(NamedTuple):
    """One new token of sequence `index`, as `iter_generate` produces it.

    text: the text this token completes and that is safe to show: '' while a UTF-8 character is unfinished or
    the text might be the start of a stop string. Joining one sequence's `text` pieces gives its final text.
    finish_reason: None while the sequence goes on; "stop" or "length" on its last token.
    """

    index: int
    token_id: int
    text: str
    finish_reason: FinishReason | None
    logprob: float | None


@dataclass
class Completion:
    """What one prompt produced."""

    token_ids: list[int]  # the generated tokens (a stop token included), not the prompt
    text: str | None  # decoded generated text (cut before a stop string); None without a tokenizer
    finish_reason: FinishReason  # "stop": stop token or string; "length": max_new_tokens reached
    prompt_tokens: int
    logprobs: list[float] | None = None  # per generated token, when SamplingParams.logprobs

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationResult:
    """One Completion per prompt, in prompt order. Indexable and iterable like a list."""

    completions: list[Completion]

    def __len__(self) -> int:
        return len(self.completions)

    def __getitem__(self, i: int) -> Completion:
        return self.completions[i]

    def __iter__(self) -> Iterator[Completion]:
        return iter(self.completions)

    @property
    def token_ids(self) -> list[list[int]]:
        return [c.token_ids for c in self.completions]

    @property
    def texts(self) -> list[str | None]:
        return [c.text for c in self.completions]


# --------------------------------------------------------------------------------------------------
# The generation loop
# --------------------------------------------------------------------------------------------------


@contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd bookkeeping, restoring the model's mode afterwards.
    Entered around each model call rather than a whole loop, so a paused stream leaks neither."""
    was_training = model.training
    if was_training:  # (switching walks every module, so skip it when the model is already in eval mode)
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _prompt_lists(prompts: list[list[int]] | list[int] | torch.Tensor) -> list[list[int]]:
    """Normalise a prompt or batch of prompts to a list of id lists."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
        raise GenerationError("generate takes token ids; for strings use generate_text or stream_text")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.is_floating_point():
            raise GenerationError(f"prompt tensor must be integer ids of shape (T,) or (B, T), got {prompts.shape}")
        rows = prompts[None].tolist() if prompts.dim() == 1 else prompts.tolist()
    elif isinstance(prompts, (list, tuple)) and prompts and all(is_int(t) for t in prompts):
        rows = [list(prompts)]
    elif isinstance(prompts, (list, tuple)) and prompts:
        rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in prompts]
    else:
        raise GenerationError("prompts must be a list of token ids, a list of such lists, or a tensor; got "
                              f"{type(prompts).__name__} {prompts!r:.60}")
    for i, row in enumerate(rows):
        if not row:
            raise GenerationError(f"prompt {i} is empty: generation needs at least one token to start from "
                                  "(e.g. the tokenizer's bos or eos token)")
    return rows


def iter_generate(model: nn.Module, prompts: list[list[int]] | list[int] | torch.Tensor,
                  params: SamplingParams | None = None, *, tokenizer: Tokenizer | None = None,
                  use_cache: bool = True, sliding_window: bool = False) -> Iterator[TokenEvent]:
    """Generate from one prompt or a batch, yielding a TokenEvent for every new token as soon as it exists.

    Arguments as for `generate`. Checks happen now; generation runs as the iterator is consumed (stopping
    early is fine). Events of one step come in batch order; a sequence's last event has a finish_reason.
    """
    params = params or SamplingParams()
    params.validate()
    rows = _prompt_lists(prompts)
    config = model.config
    for i, row in enumerate(rows):
        if min(row) < 0 or max(row) >= config.vocab_size:
            raise GenerationError(f"prompt {i} has token id {min(row) if min(row) < 0 else max(row)}, outside the "
                                  f"model's vocabulary 0..{config.vocab_size - 1}: was it made by another tokenizer?")
    if params.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=...")

    # Learned position embeddings only exist for positions < block_size; RoPE can go further (quality drops).
    longest = max(len(r) for r in rows)
    total = longest + params.max_new_tokens
    window = None
    if sliding_window and total > config.block_size:
        window, use_cache = config.block_size, False  # the window moves every step: recompute, no cache
    elif config.pos_embedding == "learned" and total > config.block_size:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds this model's "
            f"block_size ({config.block_size}, learned positions); shorten the prompt, lower max_new_tokens, or "
            "pass sliding_window=True to keep only the last block_size tokens as context")

    stops = [StopChecker(params, tokenizer) for _ in rows]  # stop token (default: eos), stop strings, length
    # A model's vocabulary may be padded past the tokenizer's (50257 -> 50304, for faster matmuls): those
    # ids mean nothing, so they are never sampled.
    n_ids = min(config.vocab_size, getattr(tokenizer, "vocab_size", None) or config.vocab_size)
    return _generation_loop(model, rows, params, stops, use_cache, window, n_ids)


def _generation_loop(model: nn.Module, rows: list[list[int]], params: SamplingParams, stops: list[StopChecker],
                     use_cache: bool, window: int | None, n_ids: int) -> Iterator[TokenEvent]:
    device = next(model.parameters()).device
    batch, longest = len(rows), max(len(r) for r in rows)
    padded = any(len(r) < longest for r in rows)  # without padding the model can take its fast causal path

    with inference_mode(model):
        # Left padding: (B, P) ids and mask, real tokens right-aligned. Pads get id 0; the mask hides them.
        ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
        mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, longest - len(row):] = torch.tensor(row, device=device)
            mask[i, longest - len(row):] = 1
        history = ids.masked_fill(mask == 0, -1)  # what the repetition penalty sees: -1 (ignored) for pads
        generator = seeded_generator(params, device)
        cache = KVCache.for_model(model, batch, longest + params.max_new_tokens) if use_cache else None

    finished = [False] * batch
    for step in range(params.max_new_tokens):
        with inference_mode(model):
            if cache is not None and step > 0:
                # Decode: only the newest token goes in; the cache holds keys/values of everything before it.
                position_ids = mask.sum(dim=1, keepdim=True) - 1  # (B, 1): real tokens before it
                logits = model(ids[:, -1:], attention_mask=mask if padded else None, position_ids=position_ids,
                               kv_cache=cache, logits_to_keep=1).logits
            else:
                # Prefill with a cache, or every step without one: the whole (padded) sequence.
                ctx_ids, ctx_mask = (ids, mask) if window is None else (ids[:, -window:], mask[:, -window:])
                position_ids = position_ids_from_mask(ctx_mask)
                logits = model(ctx_ids, attention_mask=ctx_mask if padded else None, position_ids=position_ids,
                               kv_cache=cache, logits_to_keep=1).logits
            logits = logits[:, -1, :n_ids].float()  # (B, V)
            next_ids = sample_next(logits, params, generator, token_ids=history)
            logprobs = None
            if params.logprobs:
                logprobs = F.log_softmax(logits, dim=-1).gather(1, next_ids[:, None])[:, 0].tolist()
        tokens = next_ids.tolist()

        for i, token in enumerate(tokens):
            if finished[i]:
                continue
            text, reason = stops[i].add(token)
            finished[i] = reason is not None
            yield TokenEvent(i, token, text, reason, None if logprobs is None else logprobs[i])
        if all(finished):
            return

        with inference_mode(model):
            # Append the new column: finished sequences get a pad (not extended, never seen by the penalty).
            done = torch.tensor(finished, device=device)
            new = next_ids.masked_fill(done, 0)[:, None]
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            history = torch.cat([history, new.masked_fill(done[:, None], -1)], dim=1)


def generate(model: nn.Module, prompts: list[list[int]] | list[int] | torch.Tensor,
             params: SamplingParams | None = None, *, tokenizer: Tokenizer | None = None, use_cache: bool = True,
             on_token: Callable[[int, int], None] | None = None, sliding_window: bool = False) -> GenerationResult:
    """Continue each prompt; return one Completion per prompt.

    prompts: one prompt (a list of ids or a 1-D tensor) or a batch (a list of id lists of any lengths, or a
        (B, T) tensor). Batches are left-padded; every sequence gets the same tokens as it would alone (up to
        float rounding, and except that seeded sampling draws the whole batch from one generator).
    tokenizer: decodes the output into `text` and supplies the default stop token (eos); needed for stop_strings.
    use_cache: keep keys/values in a KVCache and feed one token per step (fast). False recomputes the
        whole sequence every step: slow, but the simplest correct reference.
    on_token: called as on_token(batch_index, token_id) for every generated token, in order.
    sliding_window: when prompt + max_new_tokens exceeds block_size, keep only the last block_size tokens as
        context (as nanoGPT does) instead of raising; positions restart at 0 in the window. This recomputes
        every step (no cache). Without it, learned-position models (GPT-2) raise GenerationError, and RoPE
        models run past block_size (they accept any position but were not trained there).
    """
    rows = _prompt_lists(prompts)
    params = params or SamplingParams()
    generated: list[list[int]] = [[] for _ in rows]
    pieces: list[list[str]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    reasons: list[FinishReason] = ["length"] * len(rows)
    for event in iter_generate(model, rows, params, tokenizer=tokenizer, use_cache=use_cache,
                               sliding_window=sliding_window):
        generated[event.index].append(event.token_id)
        pieces[event.index].append(event.text)
        if event.logprob is not None:
            logprobs[event.index].append(event.logprob)
        if event.finish_reason is not None:
            reasons[event.index] = event.finish_reason
        if on_token is not None:
            on_token(event.index, event.token_id)
    return GenerationResult([
        Completion(token_ids=generated[i], text="".join(pieces[i]) if tokenizer is not None else None,
                   finish_reason=reasons[i], prompt_tokens=len(rows[i]),
                   logprobs=logprobs[i] if params.logprobs else None)
        for i in range(len(rows))
    ])


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[str],
                  params: SamplingParams | None = None, *, use_cache: bool = True,
                  sliding_window: bool = False) -> list[str]:
    """Continue one prompt or a batch of prompts; return the generated texts (without the prompts)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = [tokenizer.encode(p) for p in prompts]
    result = generate(model, ids, params, tokenizer=tokenizer, use_cache=use_cache, sliding_window=sliding_window)
    return [c.text or "" for c in result]


def stream_text(model: nn.Module, tokenizer: Tokenizer, prompt_text: str, params: SamplingParams | None = None,
                *, use_cache: bool = True, sliding_window: bool = False) -> Iterator[str]:
    """Continue `prompt_text`, yielding pieces of generated text as soon as they are complete.

        for piece in stream_text(model, tok, "Once upon a time", SamplingParams(temperature=0.8)):
            print(piece, end="", flush=True)

    The pieces join to the text `generate_text` returns: complete characters only, nothing of a stop string.
    """
    events = iter_generate(model, [tokenizer.encode(prompt_text)], params, tokenizer=tokenizer,
                           use_cache=use_cache, sliding_window=sliding_window)
    return (event.text for event in events if event.text)


__all__ = [
    "Completion", "GenerationResult", "TokenEvent", "generate", "generate_text", "inference_mode", "iter_generate",
    "stream_text",
]
