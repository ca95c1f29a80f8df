"""Sampling: how the next token is chosen from the model's scores, and when a sequence stops.

    SamplingParams            how to pick tokens and when to stop (validated on construction)
    MIN_TEMPERATURE           the one rule for tiny temperatures: below it, sampling is greedy
    apply_repetition_penalty  \
    top_k_filter               | pure functions on a (B, V) tensor of logits
    top_p_filter               |
    min_p_filter              /
    sample_next               logits -> next token ids
    seeded_generator          the private torch.Generator of a seeded request
    StopStringTracker         one sequence's decoded text, released in pieces that are safe to show
    StopChecker               whether a new token ends its sequence (stop token, stop string, length)

`byollm.generate` (one batch from start to end) and `byollm.serve.engine` (continuous batching) both pick and
stop with these, so a request gets the same tokens and the same text from either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from byollm.errors import ByollmError
from byollm.tokenizer.base import StreamDecoder, Tokenizer

FinishReason = Literal["stop", "length"]

# Temperatures below this are greedy (the argmax), as in vLLM. Logits divided by 1e-5 already turn a gap of
# 1e-4 into 10 nats, so sampling there differs from the argmax only between near-ties; taking the argmax
# makes such requests deterministic, needs no random numbers, and lets the engine batch them as greedy.
# (Any positive temperature is safe in sample_next: see there; this is about meaning, not overflow.)
MIN_TEMPERATURE = 1e-5


class GenerationError(ByollmError, ValueError):
    """Invalid sampling parameters, or a request the model cannot serve (such as one longer than block_size)."""


def is_int(x: object) -> bool:
    """An int that is not a bool (True would otherwise pass as token id 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How to choose each next token, and when to stop.

    max_new_tokens: at most this many tokens are generated per sequence (finish_reason "length").
    temperature: logits are divided by it before sampling; 0 means greedy (always the most likely token), and
        so does any temperature below MIN_TEMPERATURE (1e-5).
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
    top_logprobs: with logprobs, also the this many most likely tokens at each position and their logprobs.
    constraint: a factory of a TokenConstraint (below): each sequence calls it once for its own state, and only
        tokens the constraint allows are sampled (constrained decoding: structured output). Honoured by the
        serving engine (byollm.serve.engine).
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
    top_logprobs: int = 0
    constraint: Callable[[], TokenConstraint] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):  # a lone string, not a list of one-character stops
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings or ())
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0, or below MIN_TEMPERATURE): no randomness involved."""
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        """Raise GenerationError naming the first bad value (also called by generate: fields can be set later)."""

        def bad(name: str, rule: str) -> GenerationError:
            return GenerationError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be a positive integer")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "must be None or an integer >= 0 (0 = no limit)")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", "must be None or in (0, 1]")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise bad("min_p", "must be None or in [0, 1]")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "must be a finite number > 0 (1.0 = off)")
        if self.stop_token_ids is not None and not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be None or a list of token ids >= 0")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop_strings", "must be a list of non-empty strings")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be None or an integer")
        if not is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise bad("top_logprobs", "must be an integer >= 0")
        if self.constraint is not None and not callable(self.constraint):
            raise bad("constraint", "must be None or a callable returning a TokenConstraint")

    def resolved_stop_ids(self, tokenizer: Tokenizer | None) -> frozenset[int]:
        """The token ids that end a sequence: stop_token_ids, or by default the tokenizer's eos (if any)."""
        if self.stop_token_ids is not None:
            return frozenset(self.stop_token_ids)
        eos = tokenizer.eos_id if tokenizer is not None else None
        return frozenset(() if eos is None else (eos,))


class TokenConstraint(Protocol):
    """Which tokens may come next in one sequence (a grammar's state, for example), as the engine uses it:
    mask (V,) logits -> a copy with the disallowed tokens at -inf; accept the token that was chosen; done: the
    sequence is complete and must end (finish_reason "stop")."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...


def seeded_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator seeded with params.seed, so the request's samples are reproducible; None when it is
    not seeded or greedy (torch's global RNG is used, or no random numbers at all)."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


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
    penalty is skipped without them. A greedy temperature (0, or below MIN_TEMPERATURE) takes the argmax, no
    randomness. Otherwise the logits are divided by the temperature (< 1 sharpens the distribution, > 1
    flattens it), filtered by top-k, top-p and min-p, turned into probabilities and sampled with `generator`.
    """
    logits = logits.float()  # sampling in bf16 would round small probabilities away
    if token_ids is not None:
        logits = apply_repetition_penalty(logits, token_ids, params.repetition_penalty)
        # An extreme penalty (5e-324) can overflow a logit to inf, and inf - inf below would be nan.
        logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    if params.greedy:  # temperature 0, or below MIN_TEMPERATURE: the argmax
        return logits.argmax(dim=-1)
    # Subtract each row's max before dividing (softmax does not change): every value is then <= 0, so a small
    # temperature sends the others towards -inf (greedy in the limit) instead of overflowing to inf and nan.
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
    rows = [list(r) for r in token_ids] if token_ids and not is_int(token_ids[0]) else [list(token_ids)]
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device).view(
        len(rows), width)


# --------------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------------


class StopStringTracker:
    """The decoded text of one sequence, released in pieces that are safe to show, cut before a stop string.

    Tokens go through the tokenizer's StreamDecoder, which holds back unfinished UTF-8 characters. On top of
    that we look for stop strings and hold back any tail that could still grow into one (with stop "\\n\\n",
    a trailing "\\n" waits for the next token), so nothing after a stop string is ever shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str], skip_special: bool) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special=skip_special)
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


class StopChecker:
    """Whether each new token of one sequence ends it, and the text it releases.

    A stop token ends the sequence and is not text; a stop string ends it (the text is cut before it); the
    max_new_tokens-th token ends it with "length". Without a tokenizer there is no text (and no stop strings).
    """

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer | None) -> None:
        self.max_new_tokens = params.max_new_tokens
        self.stop_ids = params.resolved_stop_ids(tokenizer)
        self.text = None if tokenizer is None else StopStringTracker(tokenizer, params.stop_strings,
                                                                     params.skip_special_tokens)
        self.generated = 0

    def add(self, token: int) -> tuple[str, FinishReason | None]:
        """Take the next token; return (the text it releases, "stop"/"length" if it is the last, else None)."""
        self.generated += 1
        text, reason = "", None
        if token in self.stop_ids:
            reason = "stop"  # the stop token itself is not text
            text = self.text.finish() if self.text is not None else ""
        else:
            if self.text is not None:
                text, hit_stop_string = self.text.add(token)
                reason = "stop" if hit_stop_string else None
            if reason is None and self.generated == self.max_new_tokens:
                reason = "length"
                text += self.text.finish() if self.text is not None else ""
        return text, reason


__all__ = [
    "FinishReason", "GenerationError", "MIN_TEMPERATURE", "SamplingParams", "StopChecker", "StopStringTracker",
    "TokenConstraint",
    "apply_repetition_penalty", "is_int", "min_p_filter", "sample_next", "seeded_generator", "top_k_filter",
    "top_p_filter",
]
