"""Text generation: turn next-token scores into text, one token at a time.

A language model only ever answers one question: given these tokens, how likely is each possible next token?
Generating text is a loop around that answer:

    1. prefill: run the whole prompt through the model once; keep the logits of the last position,
    2. pick the next token from those logits (greedy argmax, or sampling with temperature/top-k/top-p/min-p),
    3. decode: feed just that token back in (the KV cache remembers the keys and values of everything before),
    4. stop at a stop token, a stop string or `max_new_tokens`.

The pieces are separate so that the CLI, the HTTP server, RAG and RLHF rollouts can reuse them:

    SamplingParams            how to pick tokens and when to stop (validated on construction)
    apply_repetition_penalty  \
    top_k_filter               | pure functions on a (B, V) tensor of logits
    top_p_filter               |
    min_p_filter               |
    sample_next               /  logits -> next token ids
    iter_generate             the loop itself, yielding one TokenEvent per new token (streaming)
    generate                  the loop run to the end -> GenerationResult (ids, text, finish reason, counts)
    generate_text             strings in, strings out
    stream_text               one string in, text pieces out as they complete

Batches. Prompts of different lengths are LEFT-padded, so every sequence's next token is in the last column:

    [pad pad  A   B   C ]   attention_mask [0 0 1 1 1]   position_ids [0 0 0 1 2]
    [ D   E   F   G   H ]                  [1 1 1 1 1]                [0 1 2 3 4]

The mask keeps real tokens from attending to padding, and positions count real tokens only
(cumsum(mask) - 1, as Hugging Face does), so each sequence gets exactly the numbers it would get alone.
A sequence that has finished keeps being fed a pad token (the batch stays rectangular) but is not extended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ByollmError
from byollm.model.model import KVCache

FinishReason = Literal["stop", "length"]


class GenerationError(ByollmError, ValueError):
    """Invalid sampling parameters, or a request the model cannot serve (such as one longer than block_size)."""


class TextTokenizer(Protocol):
    """What generation needs from a tokenizer (byollm's `Tokenizer` has all of it)."""

    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How to choose each next token, and when to stop.

    max_new_tokens: at most this many tokens are generated per sequence (finish_reason "length").
    temperature: logits are divided by it before sampling; 0 means greedy (always the most likely token).
    top_k: sample only among the k most likely tokens (None or 0: no limit).
    top_p: nucleus sampling: only the smallest set of most likely tokens whose probability reaches p
        (None or 1.0: no limit).
    min_p: drop tokens less likely than min_p times the most likely one (None or 0: no limit).
    repetition_penalty: > 1 discourages every token already seen (prompt and generated), 1.0 is off.
    stop_token_ids: generation stops after one of these (it is kept in token_ids, left out of the text).
        None: the tokenizer's eos when a tokenizer is given; () : never stop on a token.
    stop_strings: stop once the generated text contains one of these; the text is cut before it (the
        tokens that produced it stay in token_ids). Needs a tokenizer.
    seed: seeds a private torch.Generator, so sampling is reproducible (None: torch's global RNG).
    logprobs: also return the log-probability of each chosen token under the model's own distribution
        (log-softmax of the raw logits, before penalty, temperature and filters).
    skip_special_tokens: leave special tokens (e.g. <|endoftext|>) out of the returned text.

    Filters are applied in Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):  # a lone string, not a list of one-character stops
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings or ())
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise GenerationError naming the first bad value (also called by generate: fields can be set later)."""

        def bad(name: str, rule: str) -> GenerationError:
            return GenerationError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be a positive integer")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "must be None or an integer >= 0 (0 = no limit)")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", "must be None or in (0, 1]")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise bad("min_p", "must be None or in [0, 1]")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "must be a finite number > 0 (1.0 = off)")
        if self.stop_token_ids is not None and not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be None or a list of token ids >= 0")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop_strings", "must be a list of non-empty strings")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be None or an integer")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


# --------------------------------------------------------------------------------------------------
# From logits to a token: pure functions on (B, V) or (V,) tensors
# --------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
                             penalty: float) -> torch.Tensor:
    """Make tokens that already occurred less likely (CTRL, Keskar et al. 2019; Hugging Face's definition).

    For every token in `token_ids` a positive logit is divided by `penalty` and a negative one multiplied by
    it, so penalty > 1 lowers the token either way. A token counts once however often it occurred.
    logits: (B, V) or (V,). token_ids: (B, L) or (L,) ids per row (negative entries, e.g. padding, are ignored),
    or lists of ids. Returns a new tensor.
    """
    if penalty == 1.0:
        return logits
    ids = _id_rows(token_ids, logits.device)
    squeeze = logits.dim() == 1
    rows = logits[None] if squeeze else logits
    if ids.size(0) != rows.size(0):
        raise ValueError(f"token_ids has {ids.size(0)} rows but logits has {rows.size(0)}")
    # seen[b, v] = True if token v occurs in row b. scatter_add counts occurrences; padding adds 0.
    counts = torch.zeros(rows.shape, dtype=torch.long, device=rows.device)
    counts.scatter_add_(1, ids.clamp(min=0), (ids >= 0).long())
    seen = counts > 0
    penalised = torch.where(rows > 0, rows / penalty, rows * penalty)
    out = torch.where(seen, penalised, rows)
    return out[0] if squeeze else out


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th), set the rest to -inf."""
    if not k or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose total
    probability is >= p, set the rest to -inf. The most likely token is always kept.

    Sorted from most to least likely, a token is dropped when the tokens before it already reach p.
    Probabilities computed from logits are only float-accurate, so "reach" allows 1e-6 of rounding:
    probabilities [0.5, 0.3, 0.1, 0.1] keep 1 token at p=0.5, 2 at p=0.75, all 4 at p=1.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p - 1e-6
    drop_sorted[..., 0] = False  # always keep at least one token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Keep tokens at least min_p times as likely as the most likely one (Nguyen et al. 2024), drop the rest.
    Unlike top-p, the cut adapts: a confident model keeps few tokens, an unsure one many."""
    if not min_p:
        return logits
    probs = logits.float().softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None, *,
                token_ids: torch.Tensor | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Pick the next token of each row: (B, V) logits -> (B,) ids ((V,) -> a 0-d tensor).

    token_ids: the tokens each row has seen so far (prompt + generated), for the repetition penalty; the
    penalty is skipped without them. temperature 0 is greedy: the argmax, no randomness. Otherwise the logits
    are divided by the temperature (< 1 sharpens the distribution, > 1 flattens it), filtered by top-k, top-p
    and min-p, turned into probabilities and sampled with `generator`.
    """
    logits = logits.float()  # sampling in bf16 would round small probabilities away
    if token_ids is not None:
        logits = apply_repetition_penalty(logits, token_ids, params.repetition_penalty)
        # An extreme penalty (5e-324) can overflow a logit to inf, and inf - inf below would be nan.
        logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    # Greedy at 0, and at temperatures too small for fp32 (1e-300 rounds to 0): their limit is the argmax.
    if params.temperature < 1 / torch.finfo(logits.dtype).max:
        return logits.argmax(dim=-1)
    # Subtract each row's max before dividing (softmax does not change): every value is then <= 0, so a tiny
    # temperature sends the others to -inf (greedy in the limit) instead of overflowing to inf and nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _id_rows(token_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Token ids as a (B, L) long tensor; ragged lists are padded with -1."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.to(device=device, dtype=torch.long)
        return ids[None] if ids.dim() == 1 else ids
    rows = [list(r) for r in token_ids] if token_ids and not _is_int(token_ids[0]) else [list(token_ids)]
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device).view(
        len(rows), width)


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


class _TextTracker:
    """The decoded text of one sequence, released in pieces that are safe to show.

    Tokens go through the tokenizer's StreamDecoder, which holds back unfinished UTF-8 characters. On top of
    that we look for stop strings and hold back any tail that could still grow into one (with stop "\\n\\n",
    a trailing "\\n" waits for the next token), so nothing after a stop string is ever shown.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: Sequence[str], skip_special: bool) -> None:
        from byollm.tokenizer.base import StreamDecoder

        self.decoder = StreamDecoder(tokenizer, skip_special=skip_special)  # type: ignore[arg-type]
        self.stop_strings = stop_strings
        self.text = ""  # everything decoded so far
        self.released = 0  # characters of `text` already handed out

    def add(self, token_id: int) -> tuple[str, bool]:
        """Take one token; return (text to release, whether a stop string was reached)."""
        self.text += self.decoder.put(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended (stop token or length): release everything, up to a stop string if one appears."""
        self.text += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        # A stop string can only start in the unreleased part: we never release a possible beginning of one.
        hits = [i for s in self.stop_strings if (i := self.text.find(s, self.released)) >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(self.text) - (0 if final else self._partial_stop_len()), False
        piece, self.released = self.text[self.released:end], end
        return piece, stopped

    def _partial_stop_len(self) -> int:
        """Length of the longest unreleased tail of the text that is a proper prefix of a stop string."""
        tail = self.text[self.released:]
        return max((k for s in self.stop_strings for k in range(1, min(len(s), len(tail) + 1))
                    if tail.endswith(s[:k])), default=0)


# --------------------------------------------------------------------------------------------------
# The generation loop
# --------------------------------------------------------------------------------------------------


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd bookkeeping, restoring the model's mode afterwards.
    Entered around each model call rather than the whole loop, so a paused stream leaks neither."""
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
    elif isinstance(prompts, (list, tuple)) and prompts and all(_is_int(t) for t in prompts):
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
                  params: SamplingParams | None = None, *, tokenizer: TextTokenizer | None = None,
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
    stop_ids = params.stop_token_ids
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        stop_ids = () if eos is None else (eos,)

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

    texts = None
    if tokenizer is not None:
        texts = [_TextTracker(tokenizer, params.stop_strings, params.skip_special_tokens) for _ in rows]
    # A model's vocabulary may be padded past the tokenizer's (50257 -> 50304, for faster matmuls): those
    # ids mean nothing, so they are never sampled.
    n_ids = min(config.vocab_size, getattr(tokenizer, "vocab_size", None) or config.vocab_size)
    return _generation_loop(model, rows, params, frozenset(stop_ids), texts, use_cache, window, n_ids)


def _generation_loop(model: nn.Module, rows: list[list[int]], params: SamplingParams, stop_ids: frozenset[int],
                     texts: list[_TextTracker] | None, use_cache: bool, window: int | None,
                     n_ids: int) -> Iterator[TokenEvent]:
    device = next(model.parameters()).device
    batch, longest = len(rows), max(len(r) for r in rows)
    padded = any(len(r) < longest for r in rows)  # without padding the model can take its fast causal path

    with _inference(model):
        # Left padding: (B, P) ids and mask, real tokens right-aligned. Pads get id 0; the mask hides them.
        ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
        mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, longest - len(row):] = torch.tensor(row, device=device)
            mask[i, longest - len(row):] = 1
        history = ids.masked_fill(mask == 0, -1)  # what the repetition penalty sees: -1 (ignored) for pads
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        cache = KVCache.for_model(model, batch, longest + params.max_new_tokens) if use_cache else None

    finished = [False] * batch
    for step in range(params.max_new_tokens):
        with _inference(model):
            if cache is not None and step > 0:
                # Decode: only the newest token goes in; the cache holds keys/values of everything before it.
                position_ids = mask.sum(dim=1, keepdim=True) - 1  # (B, 1): real tokens before it
                logits = model(ids[:, -1:], attention_mask=mask if padded else None, position_ids=position_ids,
                               kv_cache=cache, logits_to_keep=1).logits
            else:
                # Prefill with a cache, or every step without one: the whole (padded) sequence.
                ctx_ids, ctx_mask = (ids, mask) if window is None else (ids[:, -window:], mask[:, -window:])
                position_ids = (ctx_mask.cumsum(dim=1) - 1).clamp(min=0)
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
            text, reason = "", None
            if token in stop_ids:
                reason = "stop"  # the stop token itself is not text
                text = texts[i].finish() if texts else ""
            else:
                if texts:
                    text, hit_stop_string = texts[i].add(token)
                    reason = "stop" if hit_stop_string else None
                if reason is None and step + 1 == params.max_new_tokens:
                    reason = "length"
                    text += texts[i].finish() if texts else ""
            finished[i] = reason is not None
            yield TokenEvent(i, token, text, reason, None if logprobs is None else logprobs[i])
        if all(finished):
            return

        with _inference(model):
            # Append the new column: finished sequences get a pad (not extended, never seen by the penalty).
            done = torch.tensor(finished, device=device)
            new = next_ids.masked_fill(done, 0)[:, None]
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            history = torch.cat([history, new.masked_fill(done[:, None], -1)], dim=1)


def generate(model: nn.Module, prompts: list[list[int]] | list[int] | torch.Tensor,
             params: SamplingParams | None = None, *, tokenizer: TextTokenizer | None = None, use_cache: bool = True,
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


def generate_text(model: nn.Module, tokenizer: TextTokenizer, prompt: str | list[str],
                  params: SamplingParams | None = None, *, use_cache: bool = True,
                  sliding_window: bool = False) -> list[str]:
    """Continue one prompt or a batch of prompts; return the generated texts (without the prompts)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = [tokenizer.encode(p) for p in prompts]
    result = generate(model, ids, params, tokenizer=tokenizer, use_cache=use_cache, sliding_window=sliding_window)
    return [c.text or "" for c in result]


def stream_text(model: nn.Module, tokenizer: TextTokenizer, prompt_text: str, params: SamplingParams | None = None,
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
    "Completion", "GenerationError", "GenerationResult", "SamplingParams", "TokenEvent", "apply_repetition_penalty",
    "generate", "generate_text", "iter_generate", "min_p_filter", "sample_next", "stream_text", "top_k_filter",
    "top_p_filter",
]
