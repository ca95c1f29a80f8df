"""An OpenAI-compatible HTTP server (`byollm serve CKPT`): FastAPI in front of the batching engine.

Endpoints (the shapes of OpenAI's API, so the official `openai` client and tools built on it just work):

    GET  /v1/models             the one model this server serves
    POST /v1/completions        text in, text out (`prompt`: a string or a list of token ids)
    POST /v1/chat/completions   messages in, the assistant's reply out, rendered with byollm's chat template
    GET  /health                200 while the engine runs (no key needed: for load balancers)
    GET  /metrics               Prometheus: requests by endpoint and status, tokens, time to first token,
                                inter-token latency, running and waiting requests (no key needed)

`"stream": true` answers with server-sent events, one `data: {json}\\n\\n` chunk per piece of text and a
last `data: [DONE]\\n\\n`. Every answer carries `usage` (prompt and completion tokens) and a `finish_reason`
("stop": a stop token or string, "length": max_tokens or the context was reached).

What keeps it safe under load, in the order a request meets it:
1. body size: a body over `max_body_bytes` is answered 413 before it is parsed;
2. API keys: when configured, every /v1 endpoint needs `Authorization: Bearer KEY` (401 otherwise); keys
   are compared in constant time and never logged (a short hash names a key in logs and limits);
3. validation: the JSON schema (422), then what the model can do (400): `n` must be 1, at most
   `max_stop_sequences` stop strings, prompt + max_tokens within the context, valid UTF-8, token ids in the
   vocabulary, chat control tokens refused inside messages (they would forge turns);
4. rate limits: per key (or per client address without keys), token buckets of requests per minute and
   tokens per minute (prompt + max_tokens, the unused part refunded), 429 with `Retry-After`;
5. the engine's bounded waiting queue: full -> 503 with `Retry-After`, instead of unbounded memory;
6. a client that disconnects cancels its request, which frees its batch slot at once.
Errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}}. CORS is off unless origins are
configured. Logs name requests, keys (hashed) and token counts, never prompts or replies unless
`log_prompts` is set. On shutdown, in-flight requests get `shutdown_timeout` seconds to finish.

Build the app in Python with `create_app(model_or_engine, tokenizer, ServeConfig(...))`; run it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from byollm.errors import ByollmError, require

require("fastapi", "serve")
require("prometheus_client", "serve")
uvicorn = require("uvicorn", "serve")

from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from byollm.generate import SamplingParams  # noqa: E402
from byollm.serve.settings import ServeConfig  # noqa: E402

log = logging.getLogger("byollm.serve")

INT64 = 2**63
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy
CLIENT_CLOSED = 499


# --------------------------------------------------------------------------------------------------
# Errors: OpenAI's JSON shape
# --------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------
# Request and response shapes (OpenAI's, plus vLLM's sampling extensions top_k, min_p, repetition_penalty,
# ignore_eos). Unknown fields are ignored, as OpenAI's own client may send newer ones.
# --------------------------------------------------------------------------------------------------


# strict: JSON types as declared (no 0 for false, no "1" for 1), so the published schema is what is accepted
STRICT = ConfigDict(strict=True)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is treated as 'system'")
    content: str | list[TextPart] | None = Field(description="the text, or a list of text parts (joined)")
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_tokens, capped by "
                                   "what the context leaves after the prompt")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, description="must be 1: one choice per request")
    stop: str | list[str] | None = Field(None, description="stop strings (the reply is cut before one)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    user: str | None = None
    top_k: int | None = Field(None, ge=-1, lt=INT64, description="extension: sample among the k most likely "
                              "(0 or -1: off)")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="extension: > 1 discourages repeats")
    ignore_eos: bool = Field(False, description="extension: do not stop at the end token (benchmarks)")


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool | None = Field(None, description="not supported: false only")


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, or a list of token ids (a list of one string or of one id list also works)")
    echo: bool | None = Field(None, description="not supported: false only")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, description="must be 1")
    logprobs: int | None = Field(None, ge=0, description="not supported")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "invalid request for this model", 401: "missing or wrong API key", 404: "unknown model",
            413: "request body too large", 422: "request does not match the schema", 429: "rate limit exceeded",
            503: "queue full or shutting down"}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


# --------------------------------------------------------------------------------------------------
# Rate limiting: token buckets per key
# --------------------------------------------------------------------------------------------------


class TokenBucket:
    """`capacity` units that refill at `capacity` per minute; taking more than is there gives the wait."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # units per second
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, n: float) -> float:
        """Seconds until `n` units are there (0: now)."""
        self._refill()
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + n)


class RateLimiter:
    """Requests per minute and tokens per minute, per key. `acquire` raises 429 with Retry-After."""

    MAX_KEYS = 10_000  # without API keys the key is the client address: forget idle ones beyond this

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self.buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _buckets(self, key: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        if key not in self.buckets:
            if len(self.buckets) >= self.MAX_KEYS:
                self.buckets.clear()
            self.buckets[key] = (TokenBucket(self.rpm, self.clock) if self.rpm else None,
                                 TokenBucket(self.tpm, self.clock) if self.tpm else None)
        return self.buckets[key]

    def acquire(self, key: str, tokens: int) -> None:
        if not self.enabled:
            return
        requests, token_bucket = self._buckets(key)
        if token_bucket is not None and tokens > token_bucket.capacity:
            raise APIError(429, f"this request needs {tokens} tokens (prompt + max_tokens), more than the limit of "
                           f"{self.tpm} tokens per minute; lower max_tokens or shorten the prompt",
                           type="tokens", param="max_tokens", code="rate_limit_exceeded")
        waits = {"requests": requests.wait(1) if requests else 0.0,
                 "tokens": token_bucket.wait(tokens) if token_bucket else 0.0}
        kind, wait = max(waits.items(), key=lambda kv: kv[1])
        if wait > 0:
            limit = f"{self.rpm} requests" if kind == "requests" else f"{self.tpm} tokens"
            retry = max(1, math.ceil(wait))
            raise APIError(429, f"rate limit reached: {limit} per minute for this key; retry in {retry} s",
                           type=kind, code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        if requests:
            requests.take(1)
        if token_bucket:
            token_bucket.take(tokens)

    def refund(self, key: str, tokens: int) -> None:
        if self.tpm and tokens > 0 and key in self.buckets:
            bucket = self.buckets[key][1]
            if bucket is not None:
                bucket.give_back(tokens)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0)


class Metrics:
    """Prometheus metrics in a registry of their own (so several apps can live in one process, as in tests)."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("byollm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("byollm_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("byollm_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("byollm_time_to_first_token_seconds", "time from a request's arrival to its first "
                              "token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("byollm_inter_token_latency_seconds", "time between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("byollm_request_latency_seconds", "time from a request's arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("byollm_requests_finished", "generation requests by finish reason", ["reason"],
                                registry=r)
        running = Gauge("byollm_num_requests_running", "requests in the running batch", registry=r)
        waiting = Gauge("byollm_num_requests_waiting", "requests waiting for a batch slot", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting.set_function(lambda: engine.num_waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------------
# ASGI middleware: request counting and the body size limit (plain ASGI: streaming responses pass through)
# --------------------------------------------------------------------------------------------------


async def _send_error(send: Callable[..., Awaitable[None]], err: APIError) -> None:
    body = json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param,
                                 "code": err.code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Counts every request by endpoint and status, and refuses bodies over `max_bytes` with 413 (by their
    Content-Length, or while reading a chunked body) before anything parses them."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values, whatever clients send
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            too_big = APIError(413, f"request body is larger than this server's limit of {self.max_bytes} bytes",
                               code="request_too_large")
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                await _send_error(counting_send, too_big)
                return
            # Read the body here (at most max_bytes), then hand it on; later receives go to the client
            # (http.disconnect), which is how a request notices its client left.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    await self.app(scope, _replay([message], receive), counting_send)
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    await _send_error(counting_send, too_big)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            await self.app(scope, _replay([body], receive), counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def _replay(messages: list[dict], receive: Callable) -> Callable:
    pending = list(messages)

    async def replay() -> dict:
        return pending.pop(0) if pending else await receive()

    return replay


# --------------------------------------------------------------------------------------------------
# Turning requests into engine requests
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """A validated request, ready for the engine."""

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


def _check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{param} is not valid Unicode text ({e.reason} at character {e.start})", param) from None
    return text


def _max_token_bytes(tokenizer: Any) -> int:
    """The most bytes of text one token stands for (special tokens included), to bound a text's token count."""
    if getattr(tokenizer, "supports_bytes", False):
        def size(i: int) -> int:
            return len(tokenizer.decode_bytes([i]))
    else:
        def size(i: int) -> int:
            return len(tokenizer.decode([i]).encode("utf-8"))
    return max(1, max(size(i) for i in range(tokenizer.vocab_size)))


class _Service:
    """The state behind the routes: engine, tokenizer, settings, keys, limits and metrics."""

    def __init__(self, engine: Any, async_engine: Any, tokenizer: Any, settings: ServeConfig,
                 model_name: str, context: int, vocab_size: int) -> None:
        self.engine, self.async_engine, self.tokenizer, self.settings = engine, async_engine, tokenizer, settings
        self.model_name, self.context, self.vocab_size = model_name, context, vocab_size
        self.keys = settings.load_api_keys()
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self.metrics = Metrics(async_engine)
        self.created = int(time.time())
        self.accepting = False
        self.shutdown_task: asyncio.Future | None = None
        self.chat_stop_ids: tuple[int, ...] | None = None
        self.max_token_bytes = _max_token_bytes(tokenizer)
        from byollm.serve.engine import QueueFull

        self.queue_full = QueueFull
        from byollm.tokenizer.chat_template import END, has_chat_tokens

        if has_chat_tokens(tokenizer):
            ids = {tokenizer.special_tokens[END]} | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
            self.chat_stop_ids = tuple(sorted(ids))

    # -- who is asking --------------------------------------------------------------------------------

    def authorize(self, request: Request) -> str:
        """The caller's rate-limit key: a hash of its API key, or its address when no keys are configured."""
        if not self.keys:
            return "ip:" + (request.client.host if request.client else "unknown")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key")
        given = token.encode()
        if not any(hmac.compare_digest(given, key.encode()) for key in self.keys):  # constant time per key
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return "key:" + hashlib.sha256(given).hexdigest()[:12]

    # -- validation ---------------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _params(self, req: _Request, prompt_len: int, max_tokens: int | None, stop_ids: tuple[int, ...] | None,
                prompt_param: str) -> tuple[SamplingParams, int]:
        if req.n not in (None, 1):
            raise _bad(f"n={req.n} is not supported: this server returns one choice per request (n must be 1); "
                       "send several requests instead", "n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.settings.max_stop_sequences:
            raise _bad(f"{len(stops)} stop sequences given; at most {self.settings.max_stop_sequences} are allowed",
                       "stop")
        if any(not s for s in stops):
            raise _bad("stop sequences must be non-empty strings", "stop")
        for s in stops:
            _check_text(s, "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise _bad(f"{name} is not supported (only 0); use repetition_penalty (> 1 discourages repeats)",
                           name)
        room = self.context - prompt_len
        if room < 1:
            raise _bad(f"the prompt is {prompt_len} tokens long, but this model's maximum context length is "
                       f"{self.context} tokens, which leaves no room for a reply; shorten the prompt",
                       prompt_param, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, room)
        elif prompt_len + max_tokens > self.context:
            raise _bad(f"this model's maximum context length is {self.context} tokens, but you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       "completion); shorten the prompt or lower max_tokens",
                       prompt_param, "context_length_exceeded")
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < MIN_TEMPERATURE:  # greedy in all but name at such temperatures: greedy, as vLLM does
            temperature = 0.0
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature,
            top_k=None if top_k is None else min(top_k, self.vocab_size), top_p=req.top_p, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed, stop_strings=stops,
            stop_token_ids=() if req.ignore_eos else stop_ids)
        return params, max_tokens

    def _check_size(self, texts: list[str], param: str) -> None:
        """Refuse, without tokenising, a text that cannot fit: every token covers at most max_token_bytes
        bytes, so n bytes are at least n / max_token_bytes tokens. (Tokenising 1 MB takes seconds.)"""
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        at_least = -(-n_bytes // self.max_token_bytes)
        if at_least >= self.context:
            raise _bad(f"the prompt is at least {at_least} tokens long ({n_bytes} bytes), but this model's maximum "
                       f"context length is {self.context} tokens; shorten the prompt", param,
                       "context_length_exceeded")

    async def _tokenize(self, fn: Callable[[], list[int]], texts: list[str]) -> list[int]:
        """Run `fn` (a tokenizer call); long texts in a worker thread, so the event loop keeps streaming."""
        if sum(len(t) for t in texts) > 4096:
            return await asyncio.to_thread(fn)
        return fn()

    async def prepare_chat(self, req: ChatCompletionRequest, key: str, arrived: float) -> _Job:
        from byollm.tokenizer.chat_template import encode_prompt

        self._check_model(req.model)
        if self.chat_stop_ids is None:
            raise _bad("this model was not trained with a chat template (its tokenizer lacks the chat tokens); use "
                       "/v1/completions, or serve a model trained with byollm sft", "messages",
                       "chat_not_supported")
        if req.logprobs:
            raise _bad("logprobs are not supported by this server", "logprobs")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(part.text for part in m.content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _check_text(content or "", f"messages[{i}].content")})
        self._check_size([m["content"] for m in messages], "messages")
        try:
            ids = await self._tokenize(lambda: encode_prompt(self.tokenizer, messages),
                                       [m["content"] for m in messages])
        except ByollmError as e:  # a control token inside a message, ...
            raise _bad(str(e), "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params, max_tokens = self._params(req, len(ids), max_tokens, self.chat_stop_ids, "messages")
        log_text = json.dumps(messages)[:2000] if self.settings.log_prompts else None
        return self._job("chat", ids, params, req, key, max_tokens, arrived, log_text)

    async def prepare_completion(self, req: CompletionRequest, key: str, arrived: float) -> _Job:
        self._check_model(req.model)
        for name, bad_value in (("echo", req.echo), ("suffix", req.suffix is not None),
                                ("best_of", req.best_of not in (None, 1)), ("logprobs", req.logprobs is not None)):
            if bad_value:
                raise _bad(f"{name} is not supported by this server", name)
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _bad(f"a batch of {len(prompt)} prompts was given; this server takes one prompt per request",
                           "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            # Special tokens in a user's text stay text: a prompt cannot forge an end-of-text or a chat turn.
            text = _check_text(prompt, "prompt")
            self._check_size([text], "prompt")
            ids = await self._tokenize(lambda: self.tokenizer.encode(text, allowed_special=False), [text])
        else:
            ids = list(prompt)
            if bad := [t for t in ids if not 0 <= t < self.vocab_size]:
                raise _bad(f"token id {bad[0]} is outside this model's vocabulary 0..{self.vocab_size - 1}", "prompt")
        if not ids:
            raise _bad("the prompt is empty; give at least one token", "prompt")
        eos = self.tokenizer.eos_id
        params, max_tokens = self._params(req, len(ids), req.max_tokens, () if eos is None else (eos,), "prompt")
        log_text = (prompt if isinstance(prompt, str) else str(ids))[:2000] if self.settings.log_prompts else None
        return self._job("completion", ids, params, req, key, max_tokens, arrived, log_text)

    def _job(self, kind: Literal["chat", "completion"], ids: list[int], params: SamplingParams, req: _Request,
             key: str, max_tokens: int, arrived: float, log_text: str | None) -> _Job:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        reserved = len(ids) + max_tokens
        self.limiter.acquire(key, reserved)
        return _Job(kind, ids, params, bool(req.stream), include_usage, key, reserved, arrived, log_text=log_text)

    # -- running --------------------------------------------------------------------------------------------

    def begin_shutdown(self) -> asyncio.Future:
        """Stop taking requests; in-flight ones get shutdown_timeout seconds, then the engine cancels them (their
        streams end with finish_reason "cancelled" and [DONE], answers without streaming get a 503)."""
        self.accepting = False
        if self.shutdown_task is None:
            timeout = self.settings.shutdown_timeout
            self.shutdown_task = asyncio.ensure_future(self.async_engine.shutdown(timeout=timeout))
        return self.shutdown_task

    def check_capacity(self) -> None:
        if not self.accepting:
            raise APIError(503, "the server is starting or shutting down; retry shortly", type="server_error",
                           code="unavailable", headers={"Retry-After": "1"})


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def _engine_parts(model_or_engine: Any, tokenizer: Any, settings: ServeConfig) -> tuple[Any, Any, Any]:
    """(engine, async engine, model) from a model, an Engine or an AsyncEngine."""
    from byollm.serve.engine import AsyncEngine, Engine

    if isinstance(model_or_engine, AsyncEngine):
        async_engine = model_or_engine
        engine = async_engine.engine
    elif isinstance(model_or_engine, Engine):
        engine, async_engine = model_or_engine, AsyncEngine(model_or_engine)
    else:
        on_cpu = next(model_or_engine.parameters()).device.type == "cpu"
        engine = Engine(model_or_engine, tokenizer, max_batch_size=settings.max_batch_size,
                        max_waiting=settings.max_waiting, int8=settings.int8,
                        transpose_weights=settings.transpose_weights and on_cpu)
        async_engine = AsyncEngine(engine)
    return engine, async_engine, engine.model


def create_app(model_or_engine: Any, tokenizer: Any, settings: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model_or_engine` (a GPT, an Engine or an AsyncEngine) with `tokenizer`.

    The engine loop starts with the app (its lifespan) and stops with it: in-flight requests get
    `settings.shutdown_timeout` seconds to finish, then are cancelled.
    """
    settings = settings or ServeConfig()
    if tokenizer is None:
        raise ByollmError("serve: the model has no tokenizer; train one with `byollm tokenizer train` or serve a "
                          "checkpoint that carries one")
    engine, async_engine, model = _engine_parts(model_or_engine, tokenizer, settings)
    config = model.config
    context = int(getattr(engine, "max_seq_len", None) or config.block_size)
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    service = _Service(engine, async_engine, tokenizer, settings, settings.model_name or "byollm", context, vocab)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        service.accepting = True
        log.info("serving %s (context %d tokens, %s)", service.model_name, context,
                 "API keys required" if service.keys else "no API keys: open to anyone who can connect")
        try:
            yield
        finally:
            await service.begin_shutdown()

    app = FastAPI(title="byollm", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API for a byollm model.")
    app.state.service = service
    app.add_middleware(GuardMiddleware, max_bytes=settings.max_body_bytes, metrics=service.metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return APIError(422, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, "internal server error", type="server_error").response()

    async def caller(request: Request) -> str:  # async: a plain def would run in a thread pool per request
        return service.authorize(request)

    @app.get("/health", responses=_error_responses(503))
    async def health() -> JSONResponse:
        body = {"status": "ok" if service.accepting else "unavailable", "model": service.model_name,
                "running": async_engine.num_running, "waiting": async_engine.num_waiting}
        return JSONResponse(body, status_code=200 if service.accepting else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_error_responses(401))
    async def models(key: str = Depends(caller)) -> dict:
        card = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "byollm",
                "max_model_len": context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses=_error_responses(400, 401, 404, 413, 422, 429, 503))
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               key: str = Depends(caller)) -> Response:
        arrived = time.perf_counter()
        service.check_capacity()
        return await _respond(service, await service.prepare_chat(body, key, arrived), request)

    @app.post("/v1/completions", response_model=Completion,
              responses=_error_responses(400, 401, 404, 413, 422, 429, 503))
    async def completions(body: CompletionRequest, request: Request, key: str = Depends(caller)) -> Response:
        arrived = time.perf_counter()
        service.check_capacity()
        return await _respond(service, await service.prepare_completion(body, key, arrived), request)

    def openapi() -> dict[str, Any]:
        # The schema says which model this server serves, so clients and fuzzers see the one valid value.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _narrow_schema(schema["components"]["schemas"], service.model_name, vocab, context,
                           settings.max_stop_sequences)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _narrow_schema(schemas: dict[str, Any], model_name: str, vocab: int, context: int, max_stop: int) -> None:
    """Make the published request schemas say what this server accepts (the checks that give clear 400s live
    in _Service): the one model, n = 1, the stop count, token ids in the vocabulary, unsupported options off."""

    def branches(prop: dict[str, Any], type_: str) -> list[dict[str, Any]]:
        return [b for b in prop.get("anyOf", [prop]) if b.get("type") == type_]

    def drop(prop: dict[str, Any], type_: str) -> None:
        prop["anyOf"] = [b for b in prop["anyOf"] if b.get("type") != type_]

    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        for b in branches(props["n"], "integer"):
            b["maximum"] = 1
        for key in ("presence_penalty", "frequency_penalty"):
            for b in branches(props[key], "number"):
                b.update(minimum=0, maximum=0)
        for key in ("max_tokens", "max_completion_tokens"):
            for b in branches(props.get(key, {}), "integer"):
                b["maximum"] = context - 1
        for b in branches(props["stop"], "array"):
            b["maxItems"] = max_stop
            b["items"]["minLength"] = 1
        for b in branches(props["stop"], "string"):
            b["minLength"] = 1
    chat, completion = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    for b in branches(chat["logprobs"], "boolean"):
        b["enum"] = [False]
    for b in branches(completion["echo"], "boolean"):
        b["enum"] = [False]
    for b in branches(completion["best_of"], "integer"):
        b["maximum"] = 1
    drop(completion["suffix"], "string")
    drop(completion["logprobs"], "integer")
    for b in branches(completion["prompt"], "string"):
        b["minLength"] = 1
    for b in branches(completion["prompt"], "array"):
        b["minItems"] = 1
        items = b["items"]
        if items.get("type") == "integer":
            items.update(minimum=0, maximum=vocab - 1)
        else:  # one string, or one list of ids
            b["maxItems"] = 1
            if items.get("type") == "string":
                items["minLength"] = 1
            if items.get("type") == "array":
                items["minItems"] = 1
                items["items"].update(minimum=0, maximum=vocab - 1)


# --------------------------------------------------------------------------------------------------
# Generation: one request through the engine, as one JSON answer or a stream of events
# --------------------------------------------------------------------------------------------------


class _Run:
    """One request in the engine: its outputs, timing and accounting, released exactly once."""

    def __init__(self, service: _Service, job: _Job) -> None:
        self.service, self.job = service, job
        self.outputs = service.async_engine.generate(job.prompt_ids, job.params, request_id=job.request_id)
        self.last = job.arrived
        self.first = True
        self.prompt_tokens = len(job.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.closed = False

    async def next(self) -> Any:
        """The next StepOutput (StopAsyncIteration at the end); records the latencies."""
        try:
            out = await self.outputs.__anext__()
        except self.service.queue_full:
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
        log.info("%s %s %s: %s, %d prompt + %d completion tokens, %.3f s", job.response_id, job.kind, job.key,
                 self.finish_reason or status, self.prompt_tokens, self.completion_tokens,
                 time.perf_counter() - job.arrived)
        if job.log_text is not None:
            log.info("%s prompt: %s", job.response_id, job.log_text)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _until_disconnect(request: Request, awaitable: Awaitable[Any], every: float = 0.1) -> Any:
    """Await `awaitable`; if the client disconnects meanwhile, cancel it and answer 499 (nginx's "client closed
    request": nobody reads it, but the metrics count it)."""
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


async def _respond(service: _Service, job: _Job, request: Request) -> Response:
    try:
        run = _Run(service, job)
    except BaseException as e:
        service.limiter.refund(job.key, job.reserved)
        if isinstance(e, ByollmError):  # the engine's own checks (the server's come first and say more)
            raise _bad(str(e)) from None
        raise
    try:
        first = await _until_disconnect(request, run.next())  # errors (queue full) still get a status
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
        pieces = [first.text] if first is not None else []
        while run.finish_reason is None and first is not None:
            try:
                out = await _until_disconnect(request, run.next())
            except StopAsyncIteration:
                break
            pieces.append(out.text)
    finally:
        await run.close("disconnected")
    if run.finish_reason == "cancelled":
        raise APIError(503, "the server cancelled the request (it is shutting down, or a step failed); retry",
                       type="server_error",
                       code="cancelled", headers={"Retry-After": "1"})
    text = "".join(pieces)
    common = {"id": job.response_id, "created": job.created, "model": service.model_name, "usage": run.usage()}
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": run.finish_reason}
        return JSONResponse({**common, "object": "chat.completion", "choices": [choice]})
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish_reason}
    return JSONResponse({**common, "object": "text_completion", "choices": [choice]})


async def _stream(service: _Service, job: _Job, run: _Run, first: Any, request: Request) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`.

    A client that disconnects stops the stream: Starlette cancels this generator (ASGI servers of spec < 2.4,
    such as uvicorn, report the disconnect while we stream), and it is checked here too every half second;
    `finally` then cancels the request in the engine. Each chunk is a template with the text filled in:
    it is the server's per-token work, so it is kept small."""
    chat = job.kind == "chat"
    head = json.dumps({"id": job.response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": job.created, "model": service.model_name}, separators=(",", ":"))[:-1]
    usage_null = ',"usage":null' if job.include_usage else ""
    if chat:
        before, after = head + ',"choices":[{"index":0,"delta":{"content":', '},"logprobs":null,"finish_reason":null}]'
    else:
        before, after = head + ',"choices":[{"index":0,"text":', ',"logprobs":null,"finish_reason":null}]'
    after += usage_null + "}\n\n"
    before = "data: " + before

    def last_chunk(finish_reason: str) -> str:
        choice = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return f"data: {head},\"choices\":[{json.dumps(choice, separators=(',', ':'))}]{usage_null}}}\n\n"

    try:
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield f"data: {head},\"choices\":[{json.dumps(role, separators=(',', ':'))}]{usage_null}}}\n\n"
        out, checked = first, time.perf_counter()
        while out is not None:
            if out.text:
                yield before + json.dumps(out.text) + after
            if out.finish_reason is not None:
                break
            if run.last - checked > 0.5:
                checked = run.last
                if await request.is_disconnected():
                    return
            try:
                out = await run.next()
            except StopAsyncIteration:
                break
        yield last_chunk(run.finish_reason or "stop")
        if job.include_usage:
            yield f"data: {head},\"choices\":[],\"usage\":{json.dumps(run.usage(), separators=(',', ':'))}}}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await run.close("disconnected")


# --------------------------------------------------------------------------------------------------
# `byollm serve CKPT`
# --------------------------------------------------------------------------------------------------


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping the way this app wants: uvicorn waits for open requests and only then runs
    the app's lifespan shutdown; this starts the engine's graceful shutdown as soon as the signal comes, so
    requests still running at shutdown_timeout end cleanly (finish_reason "cancelled", then [DONE]) instead
    of being cut by uvicorn's own timeout (give it a few seconds more, as a backstop)."""

    async def shutdown(self, sockets: Any = None) -> None:
        service = getattr(getattr(self.config.app, "state", None), "service", None)
        if isinstance(service, _Service):
            service.begin_shutdown()
        await super().shutdown(sockets)


def serve(ckpt: str, settings: ServeConfig, *, dtype: Any = None) -> None:
    """Load `ckpt` and serve it with uvicorn until SIGINT/SIGTERM (then shut down gracefully)."""
    from pathlib import Path

    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, device=settings.device, dtype=dtype)
    if not settings.model_name:
        settings.model_name = Path(ckpt).resolve().name
    app = create_app(loaded.model, loaded.tokenizer, settings)
    service: _Service = app.state.service
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"[byollm] serving {loaded.describe()} as '{service.model_name}' on http://{settings.host}:{settings.port}"
          f"/v1 ({'API keys required' if service.keys else 'no API keys'})", flush=True)

    server = GracefulServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           access_log=False, limit_concurrency=settings.max_connections,
                                           timeout_graceful_shutdown=settings.shutdown_timeout + 5))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: not an error (as uvicorn.run)
        server.run()


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "GracefulServer", "Metrics", "RateLimiter",
           "TokenBucket", "create_app", "serve"]
