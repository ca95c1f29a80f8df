"""Guardrails in the server: the policy chains of `byollm.safety.guardrails` on every generation request.

`byollm serve CKPT --guardrails on|log [--guardrails_config policy.yaml]` (`ServeConfig.guardrails`, default off):

- **Input** (`/v1/chat/completions`, `/v1/completions`, `/v1/rag/chat`): every message (a completion's prompt as a
  user's; token-id prompts are decoded first) goes through the input chain before anything is tokenised or
  retrieved. A block is a 400 in OpenAI's error shape with code `content_policy_violation`, naming the policy and
  what it found, never the offending text. A redaction replaces the PII in the text the model sees.
- **Output**: the generated text is checked as it grows, *before* each piece is sent (`OutputGuard.feed`): at
  intervals of 1, 2, 4, ... pieces up to `check_every` (default 8), the pieces between held (so the first piece
  is not delayed and a long answer costs one check per 8 pieces). A
  block stops the generation (the engine's request is cancelled), the piece that triggered it is withheld, and
  the answer ends with `finish_reason: "content_filter"`, streamed or not, as OpenAI's API does. With PII
  redaction on the output, a stream holds back what could still grow into a PII span (the unfinished last word,
  and digit groups before it: an email or a card number arrives token by token; at most `pii.holdback`
  characters), so what a client sees is already redacted.
- **log** mode runs every policy and changes nothing: what would have been blocked or redacted is logged (policy,
  action, reason: no text) and counted.
- **Metrics**: `byollm_guardrail_decisions_total{stage, policy, action, mode}` counts each non-allow decision once
  per request and stage.
- **Logs never hold PII**: whatever the guardrails mode, the prompt and reply that `--log_prompts` logs pass
  through `byollm.safety.pii.redact` first (`log_safe`), and a caller without an API key is named by a hash of
  its address (`log_name`), as keys are.

What it cannot do: a block on output comes after the tokens before it were sent (a phrase split over two pieces
shows its first half); the heuristics' error rates are measured in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from byollm.errors import ByollmError
from byollm.safety import pii
from byollm.safety.guardrails import ChainResult, Decision, Guardrails, PIIPolicy, describe, load_guardrails
from byollm.serve.protocol import APIError

log = logging.getLogger("byollm.serve")

CONTENT_FILTER = "content_filter"


def make_guardrails(mode: str, config_path: str | None) -> Guardrails | None:
    """The server's guardrails (None when mode is "off" and no config is given)."""
    if mode == "off":
        return None
    if config_path is not None and not Path(config_path).is_file():
        raise ByollmError(f"serve: guardrails_config {config_path} does not exist; give a YAML file of guardrail "
                          "policies (see byollm.safety.guardrails.GuardrailsConfig)")
    try:
        return load_guardrails(mode, config_path)  # type: ignore[arg-type]
    except ByollmError as e:
        raise ByollmError(f"serve: {e}") from None


def log_safe(text: str) -> str:
    """`text` with every PII finding replaced by its `[KIND]` placeholder: what may go into a log."""
    return pii.redact(text)[0]


def log_name(key: str) -> str:
    """A caller as logs may name it: API keys are already hashed ("key:..."); a client address (the caller's name
    without keys) is personal data too, so it is hashed the same way ("ip#" + 12 hex digits)."""
    if key.startswith("ip:"):
        return "ip#" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return key


def log_safe_messages(messages: Sequence[dict[str, str]]) -> str:
    return json.dumps([{**m, "content": log_safe(m["content"])} for m in messages])


class DecisionLog:
    """Counts and logs a request's decisions once per (stage, policy, action), without any of the text."""

    def __init__(self, guardrails: Guardrails, metrics: Any, who: str) -> None:
        self.guardrails, self.metrics, self.who = guardrails, metrics, log_name(who)
        self.seen: set[tuple[str, str, str]] = set()

    def record(self, stage: str, decisions: Sequence[Decision]) -> None:
        new = []
        for d in decisions:
            if (stage, d.policy, d.action) not in self.seen:
                self.seen.add((stage, d.policy, d.action))
                self.metrics.guardrails.labels(stage, d.policy, d.action, self.guardrails.mode).inc()
                new.append(d)
        if not new:
            return
        if self.guardrails.mode == "log":
            log.warning("%s guardrails (log only) %s would: %s", self.who, stage, describe(new))
        else:
            log.info("%s guardrails %s: %s", self.who, stage, describe(new))


def _blocked(d: Decision, param: str) -> APIError:
    return APIError(400, f"the request was blocked by the server's content policy ({d.policy}: {d.reason})",
                    param=param, code="content_policy_violation")


def check_messages(guardrails: Guardrails | None, metrics: Any, who: str,
                   messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages to use (redacted in mode "on"); raises the 400 when a policy blocks."""
    if guardrails is None or not guardrails.input.active:
        return messages
    out, result = guardrails.check_messages(messages)
    return _apply(guardrails, metrics, who, result, "messages", out, messages)


def check_prompt(guardrails: Guardrails | None, metrics: Any, who: str, prompt: str) -> str:
    """A completion's prompt through the input chain (as a user's text); raises the 400 when a policy blocks."""
    if guardrails is None or not guardrails.input.active:
        return prompt
    result = guardrails.input.check(prompt, "user")
    return _apply(guardrails, metrics, who, result, "prompt", result.text, prompt)


async def screen_messages(guardrails: Guardrails | None, metrics: Any, who: str,
                          messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`check_messages` in a worker thread (a toxicity scorer takes tens of milliseconds: the event loop keeps
    serving other requests meanwhile)."""
    if guardrails is None or not guardrails.input.active:
        return messages
    return await asyncio.to_thread(check_messages, guardrails, metrics, who, messages)


async def screen_prompt(guardrails: Guardrails | None, metrics: Any, who: str, prompt: str) -> str:
    """`check_prompt` in a worker thread."""
    if guardrails is None or not guardrails.input.active:
        return prompt
    return await asyncio.to_thread(check_prompt, guardrails, metrics, who, prompt)


def _apply(guardrails: Guardrails, metrics: Any, who: str, result: ChainResult, param: str, changed: Any,
           original: Any) -> Any:
    DecisionLog(guardrails, metrics, who).record("input", result.decisions)
    if result.blocked is not None:
        raise _blocked(result.blocked, param)
    return changed if guardrails.mode == "on" else original


_GROWING_TAIL = re.compile(r"(?:[^\s]*\d[^\s]*[ \t])*[^\s]*\Z")


class OutputGuard:
    """The output chain over a growing answer. `feed(piece, final)` returns the text to send now ("" while it
    is held back), or None once a policy blocks: then nothing more may be sent and the request is stopped."""

    def __init__(self, guardrails: Guardrails, metrics: Any, who: str) -> None:
        self.chain = guardrails.output
        self.every = guardrails.config.check_every
        redactor = guardrails.output_pii() if guardrails.mode == "on" else None
        self.redactor: PIIPolicy | None = redactor
        self.holdback = redactor.config.holdback if redactor is not None else 0
        self.decisions = DecisionLog(guardrails, metrics, who)
        self.raw = ""  # everything generated so far
        self.sent = ""  # what the client has been given
        self.pending = 0  # pieces received since the last check
        self.checks = 0
        self.blocked: Decision | None = None

    def will_check(self, piece: str, final: bool = False) -> bool:
        """Whether `feed(piece, final)` runs the chain (the caller may run it in a thread), or only holds. The
        interval ramps up, 1, 2, 4, ... pieces, to `check_every`: the first piece is not held back (time to first
        token stays as without guardrails) and a long answer costs one check per `check_every` pieces."""
        interval = min(self.every, 2 ** min(self.checks, 30))
        return self.blocked is None and (final or (bool(piece) and self.pending + 1 >= interval))

    def feed(self, piece: str, final: bool = False) -> str | None:
        if self.blocked is not None:
            return None
        check = self.will_check(piece, final)
        self.raw += piece
        self.pending += bool(piece)
        if not check:
            return ""  # held until the next check: nothing unchecked is sent
        self.pending = 0
        self.checks += 1
        result = self.chain.check(self.raw, "output")
        self.decisions.record("output", result.decisions)
        if result.blocked is not None:
            self.blocked = result.blocked
            return None
        safe = self._safe_prefix(final)
        # A PII span longer than the hold-back window can reach into what was sent already: what was sent stays
        # sent (it cannot be taken back), and the text goes on from there.
        new = safe[len(self.sent):] if len(safe) > len(self.sent) else ""
        self.sent += new
        return new

    def _safe_prefix(self, final: bool) -> str:
        """The redacted text up to the point no PII span can still change (everything, when final)."""
        if self.redactor is None:
            return self.raw
        spans = self.redactor.spans(self.raw)
        # What could still become PII is the unfinished last word and, before it, space-separated groups holding a
        # digit (a phone, card or IBAN arrives group by group): hold that back, at most `holdback` characters.
        # Plain words before it cannot grow into a span, so prose streams with a delay of one word.
        tail = _GROWING_TAIL.search(self.raw)
        held = min(len(tail.group()) if tail else 0, self.holdback)
        end = len(self.raw) if final else max(0, len(self.raw) - held)
        if not final:
            for s in reversed(spans):  # a span touching the cut could still grow: cut before it
                if s.start < end <= s.end:
                    end = s.start
        out, pos = [], 0
        for s in spans:
            if s.end > end:
                break
            out += [self.raw[pos:s.start], f"[{s.kind}]"]
            pos = s.end
        return "".join(out) + self.raw[pos:end]


__all__ = ["CONTENT_FILTER", "DecisionLog", "OutputGuard", "check_messages", "check_prompt", "log_safe",
           "log_name", "log_safe_messages", "make_guardrails", "screen_messages", "screen_prompt"]
