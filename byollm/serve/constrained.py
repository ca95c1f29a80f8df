"""Structured output: replies that are JSON by construction (`response_format` json_object and json_schema).

Constrained decoding. A JSON Schema (or "any JSON object") is compiled into a grammar, and a grammar matcher
follows the reply token by token. Before each token is sampled, the matcher says which tokens of the vocabulary
could continue a valid document (a bitmask over the vocabulary); the others get logit -inf, so they have
probability 0 and are never chosen. The chosen token is fed back to the matcher, which advances. Once the
document is complete the only allowed tokens are the stop tokens, so the reply ends there. Every reply that ends
with finish_reason "stop" therefore parses and validates, whatever the model would have preferred; a reply cut
by max_tokens ("length") is an unfinished document.

What it does to the distribution: the masked softmax renormalises the model's probabilities over the allowed
tokens, step by step. That is not the model's distribution conditioned on "the whole reply is valid" (that
would need to look ahead): a token that starts a valid but unlikely path is taken as readily as the model
likes its first step. The logprobs a reply reports are the model's own (before the mask).

The grammar work is xgrammar's (Dong et al. 2024, the library vLLM and SGLang use; C++, runs on the CPU):
`TokenizerInfo` from our vocabulary as raw byte strings, `GrammarCompiler` (compiled grammars are cached here by
schema), a `GrammarMatcher` per reply, `fill_next_token_bitmask` and `apply_token_bitmask_inplace`. A mask
costs a median 0.2 ms per token for SmolLM2's 49k vocabulary (tens of ms for a decode step); the first structured
request pays ~4 s once (importing xgrammar, which imports transformers, and indexing the vocabulary). Replies are
compact JSON (no free whitespace: a small model could otherwise spend its budget on blank lines).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from byollm.errors import ByollmError, require
from byollm.sampling import TokenConstraint
from byollm.tokenizer.base import Tokenizer

ANY_OBJECT = {"type": "object"}  # response_format json_object: any JSON object


class GrammarError(ByollmError):
    """A JSON Schema that the grammar library cannot turn into a grammar (the server answers 400)."""


class GrammarConstraint:
    """One reply's grammar state, as the engine's sampler uses it (a `byollm.sampling.TokenConstraint`)."""

    def __init__(self, compiled: Any, stop_ids: Sequence[int], vocab_size: int) -> None:
        self.xgr = require("xgrammar", "structured")
        # With no stop token (ignore_eos), the grammar itself ends the reply when the document is complete.
        self.matcher = self.xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None,
                                               terminate_without_stop_token=not stop_ids)
        self.bitmask = self.xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) or (V,) logits -> a copy with the tokens the grammar does not allow next at -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        out = logits.reshape(1, -1).float().clone()
        self.xgr.apply_token_bitmask_inplace(out, self.bitmask, vocab_size=self.vocab_size)
        return out.view_as(logits)

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """xgrammar's compiler for one tokenizer, and the compiled grammars of recent schemas.

    vocab_size: the ids the model may produce (its logits' width, at most the tokenizer's). Thread-safe: the
    server compiles in worker threads. Building the tokenizer's byte vocabulary takes a few tenths of a second
    for 49k tokens, so it is done on the first structured request, not at start-up.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 64) -> None:
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = require("xgrammar", "structured")
            tok = self.tokenizer
            specials = set(tok.special_tokens.values())
            raw = getattr(tok, "supports_bytes", False)

            def token_bytes(i: int) -> bytes:  # special tokens are never text: xgrammar takes b"" as special
                if i in specials:
                    return b""
                return tok.decode_bytes([i]) if raw else tok.decode([i]).encode("utf-8")

            vocab = [token_bytes(i) for i in range(self.vocab_size)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                     stop_token_ids=[i for i in specials if i < self.vocab_size])
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compile(self, schema: dict[str, Any] | None) -> Any:
        """The compiled grammar of a JSON Schema (None: any JSON object). GrammarError when it cannot be compiled."""
        key = json.dumps(schema)  # key order matters: it is the order the properties are written in
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._get_compiler()
            try:
                # strict_mode: no properties or items beyond the schema's (a subset of what it allows, so valid)
                # (the schema as given, not the sorted key: properties are generated in the schema's order)
                compiled = compiler.compile_json_schema(json.dumps(schema if schema is not None else ANY_OBJECT),
                                                        any_whitespace=False, strict_mode=schema is not None)
            except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with its parser's message
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message)  # its C++ log prefix: time, file, line
                raise GrammarError(f"the JSON schema cannot be compiled into a grammar ({message[:300]}); "
                                   "simplify it or check that it is valid JSON Schema") from None
            self._cache[key] = compiled
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return compiled

    def constraint(self, schema: dict[str, Any] | None, stop_ids: Sequence[int]) -> Callable[[], TokenConstraint]:
        """SamplingParams.constraint for replies that follow `schema` (None: any JSON object): a factory, so each
        choice of a request gets its own matcher."""
        compiled = self.compile(schema)
        stops, vocab_size = tuple(stop_ids), self.vocab_size
        return lambda: GrammarConstraint(compiled, stops, vocab_size)


__all__ = ["ANY_OBJECT", "GrammarConstraint", "GrammarError", "Grammars"]
