"""`POST /v1/rag/chat`: answers from a RAG index, with citations, behind the same guards as the other routes.

Also at `POST /v1/rag/chat/completions`, so any OpenAI client can call it: base URL `http://HOST/v1/rag`, the
retrieval options in `extra_body`, the `rag` object among the completion's extra fields (`model_extra`).

Mounted by `create_app` only when the server is given an index (`byollm serve CKPT --rag_index DIR`). The request
is a chat completion request (the last message is the question; earlier user/assistant turns are history) plus
the retrieval options `k`, `retriever`, `min_score` and `drop_flagged`. The answer is a chat completion with one
more field, `rag`: the numbered sources (chunk id, source, title, score, flags), the citations the answer makes,
citations of sources that were not given (removed from the text), and `not_found`. Streamed, the first chunk
carries `rag.sources` and the last (the one with `finish_reason`) the whole `rag` object.

Security:
- **Who sees what comes from the API key**, never the request: the key file's `groups=` (`ServeConfig`) are the
  caller's access groups, passed to the index's search, and every hit is checked again (`byollm.rag.answer`).
  A body field such as `groups` is ignored. Anonymous callers (no keys configured) see public chunks only.
- The same body size limit (middleware), authentication (401), validation (422/400), rate limits (a request is
  counted before retrieval, its tokens when the prompt is known: 429) and bounded queue (503) as
  /v1/chat/completions, through the same code (the server's `chat_job` and `respond`).
- With guardrails on (`byollm.serve.moderation`), the question and history pass the input policies before
  retrieval (a block: 400 `content_policy_violation`), and the answer the output policies as it is generated.
- Client system messages are refused (400): the system prompt that says retrieved text is data is the server's.
- Retrieval runs in one worker thread of its own, so the event loop keeps streaming meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from byollm.errors import ByollmError, require

require("fastapi", "serve")

from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.responses import Response, StreamingResponse  # noqa: E402
from pydantic import Field  # noqa: E402

from byollm.rag.answer import NOT_FOUND, RagPrompt, finish, prepare  # noqa: E402
from byollm.rag.prompt import special_tokens_of  # noqa: E402
from byollm.serve.moderation import screen_messages  # noqa: E402
from byollm.serve.protocol import (  # noqa: E402
    ChatCompletionRequest,
    bad_request,
    check_text,
    error_responses,
)


class RagChatRequest(ChatCompletionRequest):
    """A chat completion request whose last message is a question to answer from the index."""

    k: int = Field(5, ge=1, le=20, description="passages to retrieve")
    retriever: Literal["bm25", "dense", "hybrid"] = "hybrid"
    min_score: float | None = Field(None, description="passages scoring below this are left out, and with none "
                                    "left the answer is not found (default: calibrated per retriever, see "
                                    "byollm.rag.answer.DEFAULT_MIN_SCORE; hybrid: the passages' cosine)")
    drop_flagged: bool = Field(False, description="leave passages flagged as instruction-like out of the prompt")


class RagService:
    """The index behind the route, used from one worker thread."""

    def __init__(self, index: Any) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="byollm-rag")
        if isinstance(index, str):  # open it in the thread that will search it
            from byollm.rag.index import RagIndex

            index = self.executor.submit(RagIndex.open, index).result()
        self.index = index

    async def prepare(self, question: str, **options: Any) -> RagPrompt:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: prepare(self.index, question, **options))


def _conversation(req: RagChatRequest) -> tuple[str, list[dict[str, str]]]:
    """(question, earlier turns) of a request: the last message must be the user's, and none the system's."""
    messages = [(m.role, check_text(m.text(), f"messages[{i}].content")) for i, m in enumerate(req.messages)]
    if any(role in ("system", "developer") for role, _ in messages):
        raise bad_request("the RAG route brings its own system prompt (retrieved text is data, never instructions); "
                          "send user and assistant messages only", "messages")
    if messages[-1][0] != "user" or not messages[-1][1].strip():
        raise bad_request("the last message must be the user's question", "messages")
    return messages[-1][1], [{"role": r, "content": t} for r, t in messages[:-1]]


def add_rag_route(app: FastAPI, service: Any, index: Any, respond: Callable[..., Awaitable[Response]]) -> None:
    """Mount POST /v1/rag/chat on `app` (built by create_app around `service`), answering from `index` (an open
    index or its directory); `respond` runs a job through the engine (server.respond: this module does not
    import the server, which imports it)."""
    rag = RagService(index)
    app.state.rag = rag
    specials = special_tokens_of(service.tokenizer)

    async def identify(request: Request) -> tuple[str, frozenset[str] | None]:
        return service.auth.identify(request)

    @app.post("/v1/rag/chat", responses=error_responses(400, 401, 404, 413, 422, 429, 503))
    @app.post("/v1/rag/chat/completions", responses=error_responses(400, 401, 404, 413, 422, 429, 503),
              include_in_schema=False)  # the same route where an OpenAI client with base_url .../v1/rag posts
    async def rag_chat(body: RagChatRequest, request: Request,
                       who: tuple[str, frozenset[str] | None] = Depends(identify)) -> Response:
        key, groups = who
        arrived = time.perf_counter()
        service.check_capacity()
        service.limits.check_model(body.model)
        if service.chat is None:
            raise bad_request(f"{service.chat_unavailable}; the RAG route needs a chat model", "messages")
        question, history = _conversation(body)
        # Guardrails on what the caller wrote, before retrieval (retrieved passages are scanned by byollm.rag.safety)
        checked = await screen_messages(service.guardrails, service.metrics, key,
                                        [*history, {"role": "user", "content": question}])
        question, history = checked[-1]["content"], checked[:-1]
        service.limits.check_size([question, *(m["content"] for m in history)], "messages")
        service.limiter.acquire(key, 0)  # count the request before retrieval costs anything
        want = body.max_completion_tokens or body.max_tokens or service.settings.default_max_tokens
        chat, context = service.chat, service.context

        def fits(messages: list[dict[str, str]]) -> bool:
            return len(chat.encode_prompt(messages)) + min(want, context // 2) <= context

        try:
            prompt = await rag.prepare(question, k=body.k, retriever=body.retriever, groups=groups,
                                       min_score=body.min_score, drop_flagged=body.drop_flagged, specials=specials,
                                       history=history, fits=fits)
        except ByollmError as e:
            raise bad_request(str(e), "messages") from None
        if prompt.not_found:
            return _not_found(service, body, prompt)
        job = await service.chat_job(prompt.messages, body, key, arrived, count_request=False)
        response = await respond(service, job, request)
        if isinstance(response, StreamingResponse):
            return StreamingResponse(_with_rag(response.body_iterator, prompt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        data = json.loads(response.body)
        choice = data["choices"][0]
        answer = finish(prompt, choice["message"]["content"], choice["finish_reason"])
        choice["message"]["content"] = answer.text
        data["rag"] = answer.to_dict()
        return Response(json.dumps(data), media_type="application/json")


async def _with_rag(events: AsyncIterator[str | bytes], prompt: RagPrompt) -> AsyncIterator[str]:
    """The chat stream with `rag.sources` on its first chunk and the whole `rag` object on its last."""
    pieces: list[str] = []
    first = True
    try:
        async for event in events:
            text = event.decode() if isinstance(event, bytes) else event
            if not text.startswith("data: {"):
                yield text
                continue
            chunk = json.loads(text[len("data: "):])
            choice = chunk["choices"][0] if chunk.get("choices") else None
            if first:
                chunk["rag"] = {"sources": [s.to_dict() for s in prompt.sources]}
                first = False
            if choice is not None and choice["delta"].get("content"):
                pieces.append(choice["delta"]["content"])
            if choice is not None and choice.get("finish_reason"):
                chunk["rag"] = finish(prompt, "".join(pieces), choice["finish_reason"]).to_dict()
            yield f"data: {json.dumps(chunk)}\n\n"
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _not_found(service: Any, body: RagChatRequest, prompt: RagPrompt) -> Response:
    """The answer when nothing relevant was retrieved: said, not guessed (the model is not asked)."""
    answer = finish(prompt, "").to_dict()
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": service.model_name}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not body.stream:
        message = {"role": "assistant", "content": NOT_FOUND}
        data = {**head, "object": "chat.completion", "usage": usage, "rag": answer,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}
        return Response(json.dumps(data), media_type="application/json")
    head["object"] = "chat.completion.chunk"

    def event(delta: dict[str, str], finish_reason: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

    events = [event({"role": "assistant", "content": ""}, rag={"sources": []}), event({"content": NOT_FOUND}),
              event({}, "stop", rag=answer)]
    if body.stream_options and body.stream_options.include_usage:
        events.append(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n")

    async def stream() -> AsyncIterator[str]:
        for e in [*events, "data: [DONE]\n\n"]:
            yield e

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["RagChatRequest", "RagService", "add_rag_route"]
