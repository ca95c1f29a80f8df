"""Generation: one request through the engine, as one JSON answer or a stream of server-sent events.

`respond(service, job, request)` is what every generation route ends with (chat, completions, RAG): it starts the
request in the engine, waits for its first output (so errors such as a full queue still get a status code), then
either collects the whole answer or streams OpenAI's chunk objects. With guardrails on (`byollm.serve.moderation`)
every piece of text passes the output chain before it is sent; a block ends the answer with
`finish_reason: "content_filter"` and cancels the rest of the generation.

`service` is the server's state (`byollm.serve.server`): it has `async_engine`, `limiter`, `metrics`, `model_name`
and `guardrails`.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    CompletionChoice,
    TextCompletion,
    TextCompletionChunk,
    Usage,
    bad_request,
)

log = logging.getLogger("byollm.serve")

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but the metrics count it


def json_response(body: BaseModel, status: int = 200) -> Response:
    """A JSON answer serialised by its model (the same shape the OpenAPI schema documents)."""
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


@dataclass
class Job:
    """A validated request, ready for the engine. `log_text` (only with log_prompts) is already PII-redacted."""

    kind: Literal["chat", "completion"]
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    key: str
    reserved: int  # tokens charged to the rate limiter (prompt + max_tokens)
    arrived: float
    request_id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    log_text: str | None = None

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id


class InFlight:
    """One request in the engine: its outputs, timing and accounting, released exactly once."""

    def __init__(self, service: Any, job: Job) -> None:
        self.service, self.job = service, job
        self.outputs = service.async_engine.generate(job.prompt_ids, job.params, request_id=job.request_id)
        self.last = job.arrived
        self.first = True
        self.prompt_tokens = len(job.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.closed = False
        self.sent: list[str] = []  # the text the client was given (for the log, with log_prompts)
        guardrails = service.guardrails
        self.guard = (OutputGuard(guardrails, service.metrics, self.job.response_id)
                      if guardrails is not None and guardrails.output.active else None)

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
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
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
        service.limiter.refund(job.key, job.reserved - self.prompt_tokens - self.completion_tokens)
        service.metrics.prompt_tokens.inc(self.prompt_tokens)
        service.metrics.completion_tokens.inc(self.completion_tokens)
        service.metrics.finished.labels(self.finish_reason or status).inc()
        log.info("%s %s %s: %s, %d prompt + %d completion tokens, %.3f s", job.response_id, job.kind, log_name(job.key),
                 self.finish_reason or status, self.prompt_tokens, self.completion_tokens,
                 time.perf_counter() - job.arrived)
        if job.log_text is not None:
            log.info("%s prompt: %s", job.response_id, job.log_text)
            log.info("%s reply: %s", job.response_id, log_safe("".join(self.sent))[:2000])

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


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
    try:
        run = InFlight(service, job)
    except BaseException as e:
        service.limiter.refund(job.key, job.reserved)
        if isinstance(e, ByollmError):  # the engine's own checks (the server's come first and say more)
            raise bad_request(str(e)) from None
        raise
    try:
        first = await until_disconnect(request, run.next())  # errors (queue full) still get a status
    except StopAsyncIteration:
        first = None
    except BaseException as e:
        if isinstance(e, APIError):  # not served (queue full, client gone): close() refunds all its tokens
            run.prompt_tokens = 0
        gone = isinstance(e, asyncio.CancelledError) or getattr(e, "status", None) == CLIENT_CLOSED
        await run.close("disconnected" if gone else "error")
        raise
    if job.stream:
        return StreamingResponse(_stream(service, job, run, first, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        pieces: list[str] = []
        out = first
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
    finally:
        await run.close("disconnected")
    if run.finish_reason == "cancelled":
        raise APIError(503, "the server cancelled the request (it is shutting down, or a step failed); retry",
                       type="server_error", code="cancelled", headers={"Retry-After": "1"})
    text = "".join(pieces)
    common = {"id": job.response_id, "created": job.created, "model": service.model_name, "usage": run.usage()}
    if job.kind == "chat":
        message = ChatChoiceMessage(role="assistant", content=text)
        choice = ChatChoice(index=0, message=message, finish_reason=run.finish_reason)
        return json_response(ChatCompletion(**common, object="chat.completion", choices=[choice]))
    choice = CompletionChoice(index=0, text=text, finish_reason=run.finish_reason)
    return json_response(TextCompletion(**common, object="text_completion", choices=[choice]))


async def _stream(service: Any, job: Job, run: InFlight, first: StepOutput | None,
                  request: Request) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`.

    A client that disconnects stops the stream: Starlette cancels this generator (ASGI servers of spec < 2.4,
    such as uvicorn, report the disconnect while we stream), and it is checked here too every half second;
    `finally` then cancels the request in the engine. Each piece passes the output guardrails before it is
    sent; when they block, the piece is withheld and the last chunk says "content_filter"."""
    chat = job.kind == "chat"
    head = {"id": job.response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created, "model": service.model_name}
    usage_null = {"usage": None} if job.include_usage else {}  # null in every chunk, when usage was asked for

    def event(choices: list[ChatChunkChoice] | list[CompletionChoice], **usage: Usage | None) -> str:
        # exclude_unset: a chunk has exactly the fields set here (see protocol's note on stream chunks)
        chunk = (ChatCompletionChunk if chat else TextCompletionChunk)(**head, choices=choices, **usage)
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"

    def choice(text: str | None, finish_reason: str | None = None) -> ChatChunkChoice | CompletionChoice:
        """The one choice of a chunk, carrying `text` (None: no text, as in the last chunk)."""
        if chat:
            delta = ChatDelta() if text is None else ChatDelta(content=text)
            return ChatChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)
        return CompletionChoice(index=0, text=text or "", logprobs=None, finish_reason=finish_reason)

    try:
        if chat:  # the first chunk says who speaks
            role = ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                   finish_reason=None)
            yield event([role], **usage_null)
        out, checked = first, time.perf_counter()
        while True:
            piece = await run.text_of(out)
            if piece is None:  # blocked by the output guardrails: withheld, and the generation stops
                break
            if piece:
                yield event([choice(piece)], **usage_null)
            if out is None or out.finish_reason is not None:
                break
            if run.last - checked > 0.5:
                checked = run.last
                if await request.is_disconnected():
                    return
            try:
                out = await run.next()
            except StopAsyncIteration:
                out = None
        if run.finish_reason == CONTENT_FILTER:
            await run.close(CONTENT_FILTER)  # free the batch slot now, before the last chunks are written
        yield event([choice(None, run.finish_reason or "stop")], **usage_null)
        if job.include_usage:
            yield event([], usage=run.usage())
        yield "data: [DONE]\n\n"
    finally:
        await run.close("disconnected")


__all__ = ["CLIENT_CLOSED", "InFlight", "Job", "json_response", "respond", "until_disconnect"]
