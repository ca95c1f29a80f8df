"""An OpenAI-compatible HTTP server (`byollm serve CKPT`): FastAPI in front of the batching engine.

Endpoints (the shapes of OpenAI's API, so the official `openai` client and tools built on it just work):

    GET  /v1/models             the one model this server serves
    POST /v1/completions        text in, text out (`prompt`: a string or a list of token ids)
    POST /v1/chat/completions   messages in, the assistant's reply out, rendered with the model's chat format
                                (byollm's template, or an imported model's own Jinja template, e.g. ChatML)
    GET  /health                200 while the engine runs (no key needed: for load balancers)
    GET  /metrics               Prometheus: requests by endpoint and status, tokens, time to first token,
                                inter-token latency, running and waiting requests (no key needed)

`"stream": true` answers with server-sent events, one `data: {json}\\n\\n` chunk per piece of text and a
last `data: [DONE]\\n\\n`. Every answer carries `usage` (prompt and completion tokens) and a `finish_reason`
("stop": a stop token or string, "length": max_tokens or the context was reached). Also OpenAI's `n` (several
choices), `logprobs` (`top_logprobs` in chat), `seed`, `stop`, `echo` (completions) and `response_format`
json_object / json_schema (chat: JSON by constrained decoding, `byollm.serve.constrained`).

What keeps it safe under load, in the order a request meets it:
1. body size: a body over `max_body_bytes` is answered 413 before it is parsed;
2. API keys: when configured, every /v1 endpoint needs `Authorization: Bearer KEY` (401 otherwise); keys
   are compared in constant time and never logged (a short hash names a key in logs and limits);
3. validation: the JSON schema (422), then what the model can do (400): unknown fields and OpenAI options this
   server does not have (tools, logit_bias, ...) refused by name, `n` up to `max_n`, at most
   `max_stop_sequences` stop strings, prompt + max_tokens within the context, valid UTF-8, token ids in the
   vocabulary, chat control tokens (any special token of an imported template) refused inside messages
   (they would forge turns);
4. rate limits: per key (or per client address without keys), token buckets of requests per minute and
   tokens per minute (prompt + max_tokens, the unused part refunded), 429 with `Retry-After`;
5. the engine's bounded waiting queue: full -> 503 with `Retry-After`, instead of unbounded memory;
6. a client that disconnects cancels its request, which frees its batch slot at once;
7. guardrails, when switched on (`guardrails: on|log`, byollm.serve.moderation): the input policies (PII
   redaction, prompt injection, blocked topics, toxicity) before tokenisation (a block: 400
   `content_policy_violation`), the output policies on the text before each piece is sent (a block: the
   generation stops, `finish_reason: "content_filter"`).
Errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}}. CORS is off unless origins are
configured. Logs name requests, keys (hashed) and token counts, never prompts or replies unless
`log_prompts` is set, and those are PII-redacted. On shutdown, in-flight requests get `shutdown_timeout`
seconds to finish.

The pieces: `protocol.py` has every request, response and chunk shape (pydantic: the bodies sent and the
OpenAPI schema both come from them) and the request checks (`RequestLimits`); `guards.py` has keys, rate
limits, the body size limit and metrics; `responses.py` runs a request through the engine (one JSON answer or
a stream); `moderation.py` applies the guardrails; this module has the routes, `create_app` and `serve`.

Build the app in Python with `create_app(model_or_engine, tokenizer, ServeConfig(...))` and run it with
uvicorn, or `serve(ckpt, ServeConfig(...))` as `byollm serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from byollm.errors import ByollmError, require

require("fastapi", "serve")
uvicorn = require("uvicorn", "serve")

from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from byollm.sampling import SamplingParams, TokenConstraint  # noqa: E402
from byollm.serve.constrained import GrammarError, Grammars  # noqa: E402
from byollm.serve.engine import AsyncEngine, Engine  # noqa: E402
from byollm.serve.guards import APIKeys, GuardMiddleware, Metrics, RateLimiter  # noqa: E402
from byollm.serve.moderation import (  # noqa: E402
    log_safe,
    log_safe_messages,
    make_guardrails,
    screen_messages,
    screen_prompt,
)
from byollm.serve.protocol import (  # noqa: E402
    SINGLE_ANSWER_ONLY,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    HealthStatus,
    ModelCard,
    ModelList,
    RequestLimits,
    ResponseFormat,
    TextCompletion,
    bad_request,
    check_text,
    error_responses,
)
from byollm.serve.responses import Job, json_response, respond  # noqa: E402
from byollm.serve.settings import ServeConfig  # noqa: E402
from byollm.tokenizer.base import Tokenizer  # noqa: E402
from byollm.tokenizer.chat_format import ChatFormat, chat_format  # noqa: E402

log = logging.getLogger("byollm.serve")

# --------------------------------------------------------------------------------------------------
# Turning requests into engine requests
# --------------------------------------------------------------------------------------------------


def _max_token_bytes(tokenizer: Tokenizer) -> int:
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

    def __init__(self, engine: Engine, async_engine: AsyncEngine, tokenizer: Tokenizer, settings: ServeConfig,
                 model_name: str, context: int, vocab_size: int) -> None:
        self.engine, self.async_engine, self.tokenizer, self.settings = engine, async_engine, tokenizer, settings
        self.model_name, self.context = model_name, context
        self.auth = APIKeys(settings.load_key_groups())
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self.limits = RequestLimits(model_name, context, vocab_size, settings.max_stop_sequences,
                                    _max_token_bytes(tokenizer), settings.max_n)
        self.grammars: Grammars | None = None  # response_format's grammar compiler, made at the first use
        self.metrics = Metrics(async_engine)
        self.guardrails = make_guardrails(settings.guardrails, settings.guardrails_config)
        self.created = int(time.time())
        self.accepting = False
        self.shutdown_task: asyncio.Future | None = None
        # The chat format (byollm's, or the tokenizer's own template); without one, chat requests get a 400.
        self.chat: ChatFormat | None = None
        self.chat_unavailable = ""
        try:
            self.chat = chat_format(tokenizer)
        except ByollmError as e:
            self.chat_unavailable = str(e)

    # -- validation ---------------------------------------------------------------------------------------

    def _params(self, req: CommonRequest, prompt_len: int, max_tokens: int | None,
                stop_ids: tuple[int, ...] | None, prompt_param: str, logprobs: int | None = None,
                constraint: Callable[[], TokenConstraint] | None = None) -> tuple[SamplingParams, int]:
        limits = self.limits
        limits.choices(req)
        stops = limits.stop_strings(req)
        max_tokens = limits.max_tokens(prompt_len, max_tokens, self.settings.default_max_tokens, prompt_param)
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        stop_ids = () if req.ignore_eos else stop_ids
        # A tiny temperature is passed on as it is: SamplingParams treats any below MIN_TEMPERATURE as greedy.
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=None if top_k is None else min(top_k, limits.vocab_size), top_p=req.top_p, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed, stop_strings=stops,
            stop_token_ids=stop_ids, logprobs=logprobs is not None, top_logprobs=logprobs or 0,
            constraint=constraint)
        return params, max_tokens

    async def _tokenize(self, fn: Callable[[], list[int]], texts: list[str]) -> list[int]:
        """Run `fn` (a tokenizer call); long texts in a worker thread, so the event loop keeps streaming."""
        if sum(len(t) for t in texts) > 4096:
            return await asyncio.to_thread(fn)
        return fn()

    async def _constraint(self, fmt: ResponseFormat | None, stop_ids: tuple[int, ...]
                          ) -> Callable[[], TokenConstraint] | None:
        """The grammar constraint of a JSON response_format (None for text); compiled in a worker thread."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise bad_request("response_format of type json_schema needs json_schema: {\"name\": ..., \"schema\": "
                              "{...}}", "response_format.json_schema")
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema is not None else None
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.limits.vocab_size)
        try:
            return await asyncio.to_thread(self.grammars.constraint, schema, stop_ids)
        except GrammarError as e:
            raise bad_request(str(e), "response_format.json_schema.schema", "invalid_json_schema") from None

    async def prepare_chat(self, req: ChatCompletionRequest, key: str, arrived: float) -> Job:
        self.limits.check_model(req.model)
        self.limits.check_unknown(req)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": check_text(m.text(), f"messages[{i}].content")} for i, m in enumerate(req.messages)]
        messages = await screen_messages(self.guardrails, self.metrics, key, messages)  # 400 when a policy blocks
        return await self.chat_job(messages, req, key, arrived)

    async def chat_job(self, messages: list[dict[str, str]], req: ChatCompletionRequest, key: str, arrived: float,
                       count_request: bool = True) -> Job:
        """The job of a chat request whose `messages` are checked text (the RAG route builds its own)."""
        chat = self.chat
        if chat is None:
            raise bad_request(f"{self.chat_unavailable}; or use /v1/completions", "messages", "chat_not_supported")
        limits = self.limits
        limits.check_only(req)  # OpenAI's options this server does not have, at their defaults
        if type(req) is not ChatCompletionRequest:  # a route built on chat (RAG) post-processes one text answer
            limits.check_only(req, rules=SINGLE_ANSWER_ONLY)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        texts = [m["content"] for m in messages]
        self.limits.check_size(texts, "messages")
        try:
            ids = await self._tokenize(lambda: chat.encode_prompt(messages), texts)
        except ByollmError as e:  # a control token inside a message, ...
            raise bad_request(str(e), "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        constraint = await self._constraint(req.response_format, () if req.ignore_eos else tuple(chat.stop_ids))
        params, max_tokens = self._params(req, len(ids), max_tokens, chat.stop_ids, "messages",
                                          (req.top_logprobs or 0) if req.logprobs else None, constraint)
        log_text = log_safe_messages(messages)[:2000] if self.settings.log_prompts else None
        return self._job("chat", ids, params, req, key, max_tokens, arrived, log_text, count_request)

    async def prepare_completion(self, req: CompletionRequest, key: str, arrived: float) -> Job:
        self.limits.check_model(req.model)
        self.limits.check_unknown(req)
        self.limits.check_only(req)  # OpenAI's options this server does not have, at their defaults
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported (the prompt's logprobs would need a "
                              "scoring pass of their own); ask for one of them", "echo")
        prompt = self.limits.completion_prompt(req)
        if self.guardrails is not None:  # token ids are judged as the text they stand for
            text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
            checked = await screen_prompt(self.guardrails, self.metrics, key, text)  # 400 when a policy blocks
            prompt = checked if checked != text else prompt
        if isinstance(prompt, str):
            # Special tokens in a user's text stay text: a prompt cannot forge an end-of-text or a chat turn.
            ids = await self._tokenize(lambda: self.tokenizer.encode(prompt, allowed_special=False), [prompt])
        else:
            ids = prompt
        if not ids:
            raise bad_request("the prompt is empty; give at least one token", "prompt")
        eos = self.tokenizer.eos_id
        params, max_tokens = self._params(req, len(ids), req.max_tokens, () if eos is None else (eos,), "prompt",
                                          req.logprobs)
        log_text = None
        if self.settings.log_prompts:  # redacted: the logs never hold PII
            log_text = log_safe(prompt if isinstance(prompt, str) else str(ids))[:2000]
        job = self._job("completion", ids, params, req, key, max_tokens, arrived, log_text)
        if req.echo:
            job.echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        return job

    def _job(self, kind: Literal["chat", "completion"], ids: list[int], params: SamplingParams, req: CommonRequest,
             key: str, max_tokens: int, arrived: float, log_text: str | None, count_request: bool = True) -> Job:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n = req.n or 1
        reserved = len(ids) + n * max_tokens  # the prompt once (its prefill is shared), each choice's reply
        self.limiter.acquire(key, reserved, count_request)
        logprobs = params.top_logprobs if params.logprobs else None
        return Job(kind, ids, params, bool(req.stream), include_usage, key, reserved, arrived, log_text=log_text,
                   n=n, logprobs=logprobs, user=req.user or getattr(req, "safety_identifier", None))

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


def _engine_parts(model_or_engine: nn.Module | Engine | AsyncEngine, tokenizer: Tokenizer,
                  settings: ServeConfig) -> tuple[Engine, AsyncEngine]:
    """(engine, async engine) from a model, an Engine or an AsyncEngine."""
    if isinstance(model_or_engine, AsyncEngine):
        return model_or_engine.engine, model_or_engine
    if isinstance(model_or_engine, Engine):
        return model_or_engine, AsyncEngine(model_or_engine)
    from byollm.serve.fast_decode import supports_fast_decode

    on_cpu = next(model_or_engine.parameters()).device.type == "cpu"
    fast = settings.fast_decode and not settings.int8 and supports_fast_decode(model_or_engine)
    engine = Engine(model_or_engine, tokenizer, max_batch_size=settings.max_batch_size,
                    max_waiting=settings.max_waiting, int8=settings.int8,
                    transpose_weights=settings.transpose_weights and on_cpu, prefix_caching=settings.prefix_caching,
                    prefill_chunk_tokens=settings.prefill_chunk_tokens, fast_decode=fast)
    return engine, AsyncEngine(engine)


def create_app(model_or_engine: nn.Module | Engine | AsyncEngine, tokenizer: Tokenizer | None,
               settings: ServeConfig | None = None, *, rag_index: Any = None) -> FastAPI:
    """The FastAPI app serving `model_or_engine` (a GPT, an Engine or an AsyncEngine) with `tokenizer`; with a RAG
    index (`rag_index`: an open index, else `settings.rag_index`: its directory) also POST /v1/rag/chat.

    The engine loop starts with the app (its lifespan) and stops with it: in-flight requests get
    `settings.shutdown_timeout` seconds to finish, then are cancelled.
    """
    settings = settings or ServeConfig()
    if tokenizer is None:
        raise ByollmError("serve: the model has no tokenizer; train one with `byollm tokenizer train` or serve a "
                          "checkpoint that carries one")
    engine, async_engine = _engine_parts(model_or_engine, tokenizer, settings)
    config = engine.model.config
    context = int(getattr(engine, "max_seq_len", None) or config.block_size)
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    service = _Service(engine, async_engine, tokenizer, settings, settings.model_name or "byollm", context, vocab)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        service.accepting = True
        log.info("serving %s (context %d tokens, %s)", service.model_name, context,
                 "API keys required" if service.auth.enabled else "no API keys: open to anyone who can connect")
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
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return APIError(422, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error")
        return APIError(500, "internal server error", type="server_error").response()

    async def caller(request: Request) -> str:  # async: a plain def would run in a thread pool per request
        return service.auth.caller(request)

    @app.get("/health", response_model=HealthStatus,
             responses={503: {"model": HealthStatus, "description": "starting or shutting down"}})
    async def health() -> Response:
        body = HealthStatus(status="ok" if service.accepting else "unavailable", model=service.model_name,
                            running=async_engine.num_running, waiting=async_engine.num_waiting)
        return json_response(body, 200 if service.accepting else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    async def models(key: str = Depends(caller)) -> Response:
        card = ModelCard(id=service.model_name, created=service.created, owned_by="byollm", max_model_len=context)
        return json_response(ModelList(data=[card]))

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses=error_responses(400, 401, 404, 413, 422, 429, 503))
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               key: str = Depends(caller)) -> Response:
        arrived = time.perf_counter()
        service.check_capacity()
        return await respond(service, await service.prepare_chat(body, key, arrived), request)

    @app.post("/v1/completions", response_model=TextCompletion,
              responses=error_responses(400, 401, 404, 413, 422, 429, 503))
    async def completions(body: CompletionRequest, request: Request, key: str = Depends(caller)) -> Response:
        arrived = time.perf_counter()
        service.check_capacity()
        return await respond(service, await service.prepare_completion(body, key, arrived), request)

    def openapi() -> dict[str, Any]:
        # The schema says what this server accepts (its one model, n = 1, ...), so clients and fuzzers see it.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            service.limits.narrow_schema(schema["components"]["schemas"])
            app.openapi_schema = schema
        return app.openapi_schema

    if rag_index is not None or settings.rag_index:
        from byollm.serve.rag_route import add_rag_route

        add_rag_route(app, service, rag_index if rag_index is not None else settings.rag_index, respond)
    if settings.chat_page:
        from byollm.serve.chat_page import add_chat_page

        add_chat_page(app, model_name=service.model_name, rag=rag_index is not None or bool(settings.rag_index),
                      auth=service.auth.enabled)
    app.openapi = openapi  # type: ignore[method-assign]
    return app


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


def serve(ckpt: str, settings: ServeConfig, *, dtype: torch.dtype | None = None) -> None:
    """Load `ckpt` and serve it with uvicorn until SIGINT/SIGTERM (then shut down gracefully).
    dtype: the model's dtype (None: as saved)."""
    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, device=settings.device, dtype=dtype)
    if not settings.model_name:
        settings.model_name = Path(ckpt).resolve().name
    app = create_app(loaded.model, loaded.tokenizer, settings)
    service: _Service = app.state.service
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"[byollm] serving {loaded.describe()} as '{service.model_name}' on http://{settings.host}:{settings.port}"
          f"/v1 ({'API keys required' if service.auth.enabled else 'no API keys'})", flush=True)

    server = GracefulServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           access_log=False, limit_concurrency=settings.max_connections,
                                           timeout_graceful_shutdown=settings.shutdown_timeout + 5))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: not an error (as uvicorn.run)
        server.run()


__all__ = ["GracefulServer", "create_app", "respond", "serve"]
