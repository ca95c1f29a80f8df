"""Generation: one request through the engine, as one JSON answer or a stream of server-sent events.

`respond(service, job, request)` is what every generation route ends with (chat, completions, RAG): it starts the
request in the engine, waits for its first output (so errors such as a full queue still get a status code), then
either collects the whole answer or streams OpenAI's chunk objects. With guardrails on (`byollm.serve.moderation`)
every piece of text passes the output chain before it is sent; a block ends the answer with
`finish_reason: "content_filter"` and cancels the rest of the generation.

A request for n choices is n engine requests with the same prompt (choice i seeded with seed + i, so a seed gives
n different but reproducible choices; greedy ones are equal); the engine's prefix cache shares their prefill.
Each choice is an `InFlight`; the answer has one choice per index (streamed: chunks carry their choice's index),
and its usage counts the prompt once and every choice's completion tokens. With logprobs, each choice carries
its tokens' log-probabilities (`Logprobs`) in OpenAI's chat or legacy completions shape.

`service` is the server's state (`byollm.serve.server`): it has `async_engine`, `limiter`, `metrics`, `model_name`
and `guardrails`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal

from byollm.errors import ByollmError, require

require("fastapi", "serve")

from fastapi import Request  # noqa: E402
from fastapi.responses import Response, StreamingResponse  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from byollm.sampling import SamplingParams  # noqa: E402
from byollm.serve.engine import QueueFull, StepOutput  # noqa: E402
from byollm.serve.moderation import CONTENT_FILTER, OutputGuard, log_name, log_safe  # noqa: E402
from byollm.serve.protocol import (  # noqa: E402
    APIError,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    TextCompletion,
    TextCompletionChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
    bad_request,
)
from byollm.tokenizer.base import Tokenizer  # noqa: E402

log = logging.getLogger("byollm.serve")

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but the metrics count it


def json_response(body: BaseModel, status: int = 200) -> Response:
    """A JSON answer serialised by its model (the same shape the OpenAPI schema documents)."""
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


@dataclass
class Job:
    """A validated request, ready for the engine. `log_text` (only with log_prompts) is already PII-redacted.
    n: choices. logprobs: None (off) or how many alternatives per token (0: the chosen token's only). echo: text
    put before each completion (the prompt's). user: the client's end-user id (logged hashed)."""

    kind: Literal["chat", "completion"]
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    key: str
    reserved: int  # tokens charged to the rate limiter (prompt + n x max_tokens)
    arrived: float
    request_id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    log_text: str | None = None
    n: int = 1
    logprobs: int | None = None
    echo: str = ""
    user: str | None = None

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id

    def choice_params(self, index: int) -> SamplingParams:
        """Choice `index`'s sampling parameters: seed + index, so seeded choices differ but are reproducible."""
        if index == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + index)

    def share(self, index: int) -> int:
        """The tokens of `reserved` that choice `index` stands for: its max_tokens (and the prompt, choice 0)."""
        budget = self.params.max_new_tokens
        return self.reserved - (self.n - 1) * budget if index == 0 else budget


class Logprobs:
    """One choice's token log-probabilities, as OpenAI shapes them: chat (`content` entries with bytes and
    top_logprobs) or completions (parallel lists with each token's text_offset in the choice's text)."""

    def __init__(self, job: Job, tokenizer: Tokenizer) -> None:
        self.chat, self.tokenizer = job.kind == "chat", tokenizer
        self.stop_ids = frozenset(job.params.stop_token_ids or ())
        self.echo_chars, self.reply = len(job.echo), b""  # the reply's bytes so far, for text_offset
        self.pending: list[tuple[int, float, list[tuple[int, float]]]] = []

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its bytes. A byte-level token may hold part of a character: its text is then
        OpenAI's "bytes:\\xe2\\x80" form (U+FFFD for all of them would merge different tokens)."""
        tok = self.tokenizer
        raw = tok.decode_bytes([token_id]) if getattr(tok, "supports_bytes", False) else \
            tok.decode([token_id]).encode("utf-8")
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def add(self, out: StepOutput | None) -> None:
        """Note the token of `out` (a stop token is not part of the reply, so it has no entry)."""
        if out is None or out.logprob is None or out.token_id < 0:
            return
        if out.finish_reason == "stop" and out.token_id in self.stop_ids:
            return
        self.pending.append((out.token_id, out.logprob, out.top_logprobs or []))

    def take(self) -> ChoiceLogprobs | CompletionLogprobs:
        """The entries noted since the last take, in the route's shape."""
        pending, self.pending = self.pending, []
        if self.chat:
            def top(token_id: int, logprob: float) -> TopLogprob:
                text, raw = self.token(token_id)
                return TopLogprob(token=text, logprob=logprob, bytes=raw)

            return ChoiceLogprobs(content=[
                TokenLogprob(**top(t, lp).model_dump(), top_logprobs=[top(a, alp) for a, alp in alts])
                for t, lp, alts in pending])
        tokens, offsets = [], []
        for t, _, _ in pending:  # a token starts after the characters completed before it
            text, raw = self.token(t)
            tokens.append(text)
            offsets.append(self.echo_chars + len(self.reply.decode("utf-8", errors="ignore")))
            self.reply += bytes(raw)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[lp for _, lp, _ in pending],
                                  top_logprobs=[{self.token(a)[0]: alp for a, alp in alts} for _, _, alts in pending],
                                  text_offset=offsets)


class InFlight:
    """One request in the engine: its outputs, timing and accounting, released exactly once."""

    def __init__(self, service: Any, job: Job, index: int = 0) -> None:
        self.service, self.job, self.index = service, job, index
        request_id = job.request_id if index == 0 else f"{job.request_id}-{index}"
        self.outputs = service.async_engine.generate(job.prompt_ids, job.choice_params(index), request_id=request_id)
        self.last = job.arrived
        self.first = True
        self.counts_prompt = index == 0  # the prompt is counted (usage, limits, metrics) once per request
        self.prompt_tokens = len(job.prompt_ids) if self.counts_prompt else 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.closed = False
        self.sent: list[str] = []  # the text the client was given (for the log, with log_prompts)
        guardrails = service.guardrails
        self.guard = (OutputGuard(guardrails, service.metrics, self.job.response_id)
                      if guardrails is not None and guardrails.output.active else None)
        self.logprobs = Logprobs(job, service.tokenizer) if job.logprobs is not None else None

    async def next(self) -> StepOutput:
        """The next StepOutput (StopAsyncIteration at the end); records the latencies."""
        try:
            out = await self.outputs.__anext__()
        except QueueFull:
            raise APIError(503, "the server is at capacity (its request queue is full); retry shortly",
                           type="server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        now = time.perf_counter()
        metrics = self.service.metrics
        (metrics.ttft if self.first else metrics.itl).observe(now - self.last)
        self.first, self.last = False, now
        self.prompt_tokens = out.prompt_tokens if self.counts_prompt else 0
        self.completion_tokens = out.completion_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            metrics.e2e.observe(now - self.job.arrived)
        return out

    async def text_of(self, out: StepOutput | None) -> str | None:
        """The text of `out` that may be sent now ("" : none yet), after the output guardrails; None when they
        block: the answer ends there with finish_reason "content_filter". A check (tens of milliseconds with a
        toxicity scorer) runs in a worker thread, so other requests keep streaming meanwhile."""
        final = out is None or out.finish_reason is not None
        piece = "" if out is None else out.text
        if self.logprobs is not None:
            self.logprobs.add(out)
        if self.guard is not None:
            guard = self.guard
            checked = (await asyncio.to_thread(guard.feed, piece, final) if guard.will_check(piece, final)
                       else guard.feed(piece, final))
            if checked is None:
                self.finish_reason = CONTENT_FILTER
                return None
            piece = checked
        if piece:
            self.sent.append(piece)
        return piece

    async def close(self, status: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.outputs.aclose()  # leaving early cancels the request in the engine
        service, job = self.service, self.job
        service.limiter.refund(job.key, job.share(self.index) - self.prompt_tokens - self.completion_tokens)
        service.metrics.prompt_tokens.inc(self.prompt_tokens)
        service.metrics.completion_tokens.inc(self.completion_tokens)
        service.metrics.finished.labels(self.finish_reason or status).inc()
        who = log_name(job.key) + (f" user#{hashlib.sha256(job.user.encode()).hexdigest()[:12]}" if job.user else "")
        choice = f" choice {self.index}" if job.n > 1 else ""
        log.info("%s%s %s %s: %s, %d prompt + %d completion tokens, %.3f s", job.response_id, choice, job.kind, who,
                 self.finish_reason or status, self.prompt_tokens, self.completion_tokens,
                 time.perf_counter() - job.arrived)
        if job.log_text is not None:
            if self.counts_prompt:
                log.info("%s prompt: %s", job.response_id, job.log_text)
            log.info("%s%s reply: %s", job.response_id, choice, log_safe("".join(self.sent))[:2000])


def usage(runs: list[InFlight]) -> Usage:
    """The prompt once, and every choice's completion tokens."""
    prompt, completion = sum(r.prompt_tokens for r in runs), sum(r.completion_tokens for r in runs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def until_disconnect(request: Request, awaitable: Awaitable[Any], every: float = 0.1) -> Any:
    """Await `awaitable`; if the client disconnects meanwhile, cancel it and answer 499 (CLIENT_CLOSED)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def respond(service: Any, job: Job, request: Request) -> Response:
    runs: list[InFlight] = []
    try:
        for index in range(job.n):
            runs.append(InFlight(service, job, index))
    except BaseException as e:
        service.limiter.refund(job.key, sum(job.share(i) for i in range(len(runs), job.n)))
        for run in runs:
            run.prompt_tokens = 0
            await run.close("error")
        if isinstance(e, ByollmError):  # the engine's own checks (the server's come first and say more)
            raise bad_request(str(e)) from None
        raise
    firsts: list[StepOutput | None] = []
    try:
        for run in runs:
            try:
                firsts.append(await until_disconnect(request, run.next()))  # errors (queue full) still get a status
            except StopAsyncIteration:
                firsts.append(None)
    except BaseException as e:
        gone = isinstance(e, asyncio.CancelledError) or getattr(e, "status", None) == CLIENT_CLOSED
        for run in runs:
            if isinstance(e, APIError):  # not served (queue full, client gone): close() refunds all its tokens
                run.prompt_tokens = 0
            await run.close("disconnected" if gone else "error")
        raise
    if job.stream:
        return StreamingResponse(_stream(service, job, runs, firsts, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        texts = [await _collect(run, out, request) for run, out in zip(runs, firsts, strict=True)]
    finally:
        for run in runs:
            await run.close("disconnected")
    if any(run.finish_reason == "cancelled" for run in runs):
        raise APIError(503, "the server cancelled the request (it is shutting down, or a step failed); retry",
                       type="server_error", code="cancelled", headers={"Retry-After": "1"})
    common = {"id": job.response_id, "created": job.created, "model": service.model_name, "usage": usage(runs)}
    if job.kind == "chat":
        choices = [ChatChoice(index=run.index, message=ChatChoiceMessage(role="assistant", content=text),
                              logprobs=None if run.logprobs is None else run.logprobs.take(),
                              finish_reason=run.finish_reason) for run, text in zip(runs, texts, strict=True)]
        return json_response(ChatCompletion(**common, object="chat.completion", choices=choices))
    completions = [CompletionChoice(index=run.index, text=job.echo + text,
                                    logprobs=None if run.logprobs is None else run.logprobs.take(),
                                    finish_reason=run.finish_reason) for run, text in zip(runs, texts, strict=True)]
    return json_response(TextCompletion(**common, object="text_completion", choices=completions))


async def _collect(run: InFlight, out: StepOutput | None, request: Request) -> str:
    """The whole text of one choice, from its first output `out` on."""
    pieces: list[str] = []
    while True:
        piece = await run.text_of(out)
        if piece is None:  # the output guardrails blocked: stop generating
            break
        pieces.append(piece)
        if out is None or out.finish_reason is not None:
            break
        try:
            out = await until_disconnect(request, run.next())
        except StopAsyncIteration:
            out = None
    return "".join(pieces)


async def _stream(service: Any, job: Job, runs: list[InFlight], firsts: list[StepOutput | None],
                  request: Request) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`.

    A client that disconnects stops the stream: Starlette cancels this generator (ASGI servers of spec < 2.4,
    such as uvicorn, report the disconnect while we stream), and it is checked here too every half second;
    `finally` then cancels the request in the engine. Each piece passes the output guardrails before it is
    sent; when they block, the piece is withheld and the last chunk says "content_filter". With n choices the
    chunks of the choices alternate, each with its choice's index, and each choice ends with its own last chunk."""
    chat = job.kind == "chat"
    head = {"id": job.response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created, "model": service.model_name}
    usage_null = {"usage": None} if job.include_usage else {}  # null in every chunk, when usage was asked for

    def event(choices: list[ChatChunkChoice] | list[CompletionChoice], **usage: Usage | None) -> str:
        # exclude_unset: a chunk has exactly the fields set here (see protocol's note on stream chunks)
        chunk = (ChatCompletionChunk if chat else TextCompletionChunk)(**head, choices=choices, **usage)
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

    def choice(run: InFlight, text: str | None, finish_reason: str | None = None) -> str:
        """A chunk of one choice carrying `text` (None: no text, as in the last chunk) and the logprobs of the
        tokens since its last chunk."""
        logprobs = run.logprobs.take() if run.logprobs is not None and run.logprobs.pending else None
        if chat:
            delta = ChatDelta() if text is None else ChatDelta(content=text)
            return event([ChatChunkChoice(index=run.index, delta=delta, logprobs=logprobs,
                                          finish_reason=finish_reason)], **usage_null)
        return event([CompletionChoice(index=run.index, text=text or "", logprobs=logprobs,
                                       finish_reason=finish_reason)], **usage_null)

    try:
        for run in runs:
            if chat:  # the first chunk of each choice says who speaks
                role = ChatChunkChoice(index=run.index, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                       finish_reason=None)
                yield event([role], **usage_null)
            elif job.echo:
                yield choice(run, job.echo)
        outs, active, checked = list(firsts), list(runs), time.perf_counter()
        while active:
            for run in list(active):
                out = outs[run.index]
                piece = await run.text_of(out)
                ended = piece is None or out is None or out.finish_reason is not None
                if piece:
                    yield choice(run, piece)
                if ended:  # finished, or blocked by the output guardrails (withheld, and the generation stops)
                    active.remove(run)
                    if run.finish_reason == CONTENT_FILTER:
                        await run.close(CONTENT_FILTER)  # free the batch slot now, before the last chunks
                    yield choice(run, None, run.finish_reason or "stop")
                    continue
                if run.last - checked > 0.5:
                    checked = run.last
                    if await request.is_disconnected():
                        return
                try:
                    outs[run.index] = await run.next()
                except StopAsyncIteration:
                    outs[run.index] = None
        if job.include_usage:
            yield event([], usage=usage(runs))
        yield "data: [DONE]\n\n"
    finally:
        for run in runs:
            await run.close("disconnected")


__all__ = ["CLIENT_CLOSED", "InFlight", "Job", "Logprobs", "json_response", "respond", "until_disconnect", "usage"]
