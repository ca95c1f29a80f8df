"""What stands between a client and the engine: API keys, rate limits, the body size limit, and metrics.

    APIKeys          `Authorization: Bearer KEY` on every /v1 endpoint when keys are configured (401 otherwise);
                     keys compared in constant time, named in logs and limits only by a short hash
    TokenBucket      `capacity` units refilling continuously at capacity per minute
    RateLimiter      per key (or client address): requests and tokens per minute, 429 with Retry-After
    Metrics          Prometheus counters and histograms in a registry of their own
    GuardMiddleware  plain ASGI: counts every request by endpoint and status, and answers 413 to a body over
                     the limit before anything parses it

The request-level checks (the model, n, stop strings, context length) are in `byollm.serve.protocol`;
the bounded queue (503) is the engine's.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from byollm.errors import require

require("fastapi", "serve")
require("prometheus_client", "serve")

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request  # noqa: E402

from byollm.serve.protocol import APIError  # noqa: E402

# --------------------------------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------------------------------


class APIKeys:
    """The configured API keys (none: the server is open, and callers are told apart by their address), each with
    its access groups for retrieval (None: unrestricted; empty: public chunks only; see `ServeConfig`)."""

    def __init__(self, keys: frozenset[str] | Mapping[str, frozenset[str] | None]) -> None:
        self.groups: dict[str, frozenset[str] | None] = (
            dict(keys) if isinstance(keys, Mapping) else dict.fromkeys(keys, frozenset()))
        self.keys = frozenset(self.groups)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def caller(self, request: Request) -> str:
        """The caller's rate-limit key: a hash of its API key, or its address when no keys are configured.
        Raises APIError 401 when keys are configured and the request has none of them."""
        return self.identify(request)[0]

    def identify(self, request: Request) -> tuple[str, frozenset[str] | None]:
        """(the caller's rate-limit key, its access groups). Anonymous callers (no keys configured) see public
        chunks only. Raises APIError 401 as `caller` does."""
        if not self.keys:
            return "ip:" + (request.client.host if request.client else "unknown"), frozenset()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key")
        given = token.encode()
        matched = None
        for key in self.keys:  # constant time per key, and every key compared
            if hmac.compare_digest(given, key.encode()):
                matched = key
        if matched is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return "key:" + hashlib.sha256(given).hexdigest()[:12], self.groups[matched]


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

    def acquire(self, key: str, tokens: int, count_request: bool = True) -> None:
        """Take one request (unless `count_request` is False: taken already) and `tokens`, or raise 429."""
        if not self.enabled:
            return
        requests, token_bucket = self._buckets(key)
        requests = requests if count_request else None
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

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/rag/chat", "/v1/rag/chat/completions",
             "/health", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0)


class EngineLoad(Protocol):
    """What the gauges read: an Engine or an AsyncEngine."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


class Metrics:
    """Prometheus metrics in a registry of their own (so several apps can live in one process, as in tests)."""

    content_type = CONTENT_TYPE_LATEST  # of what render() returns: Prometheus' text format

    def __init__(self, engine: EngineLoad) -> None:
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
        self.guardrails = Counter("byollm_guardrail_decisions", "guardrail decisions other than allow, once per "
                                  "request, stage (input/output) and policy; mode log: what would have been done",
                                  ["stage", "policy", "action", "mode"], registry=r)
        running = Gauge("byollm_num_requests_running", "requests in the running batch", registry=r)
        waiting = Gauge("byollm_num_requests_waiting", "requests waiting for a batch slot", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting.set_function(lambda: engine.num_waiting)
        decode_bw = Gauge("byollm_decode_weight_bytes_per_second", "weight bytes read per second by the decode "
                          "steps since the start (bytes per step x steps / their seconds)", registry=r)
        inner = getattr(engine, "engine", engine)  # an AsyncEngine's Engine
        decode_bw.set_function(lambda: inner.weight_bytes * inner.decode_steps / inner.decode_seconds
                               if getattr(inner, "decode_seconds", 0) else 0.0)
        r.register(_PrefillCounters(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefillCounters:
    """The engine's prefill counters (prefix caching: `Engine.prefill_stats`), read at each scrape."""

    def __init__(self, engine: EngineLoad) -> None:
        self.engine = getattr(engine, "engine", engine)  # an AsyncEngine's Engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        stats = getattr(self.engine, "prefill_stats", None)
        if stats is None:
            return
        yield CounterMetricFamily("byollm_prefill_tokens", "prompt tokens run through the model",
                                  value=stats.computed_tokens)
        yield CounterMetricFamily("byollm_prefix_cache_hits", "requests that started from a cached prompt prefix",
                                  value=stats.prefix_hits)
        yield CounterMetricFamily("byollm_prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache "
                                  "instead of computed", value=stats.prefix_hit_tokens)


# --------------------------------------------------------------------------------------------------
# ASGI middleware: request counting and the body size limit (plain ASGI: streaming responses pass through)
# --------------------------------------------------------------------------------------------------


async def _send_error(send: Callable[..., Awaitable[None]], err: APIError) -> None:
    body = err.body()
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


__all__ = ["APIKeys", "GuardMiddleware", "Metrics", "RateLimiter", "TokenBucket"]
