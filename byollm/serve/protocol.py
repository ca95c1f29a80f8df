"""The OpenAI API as this server speaks it: request, response, stream-chunk and error shapes, and the checks.

Every body the server sends is one of these pydantic models serialised with `.model_dump_json()`, and the
same models generate the OpenAPI schema (/openapi.json): what is documented is what is sent.

What a request may contain is decided here, in two layers:
- the request models' field types and ranges (strict JSON types: no 0 for false, no "1" for 1). A body
  that breaks them is answered 422 by FastAPI;
- `RequestLimits`: what this server and its model can do: the one model name (404 otherwise), n = 1, at most
  max_stop_sequences stop strings, prompt + max_tokens within the context, token ids in the vocabulary,
  valid UTF-8, unsupported options off. Answered 400 with a message that says what to change. The same
  object narrows the published schema to these limits (`narrow_schema`), so clients and fuzzers reading
  /openapi.json see what is accepted.
Request shapes are OpenAI's, plus vLLM's sampling extensions top_k, min_p, repetition_penalty and
ignore_eos. Unknown fields are ignored, as OpenAI's own client may send newer ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from byollm.errors import require

require("fastapi", "serve")

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.responses import Response  # noqa: E402

INT64 = 2**63

# --------------------------------------------------------------------------------------------------
# Errors: {"error": {"message", "type", "param", "code"}}
# --------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> bytes:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump_json().encode()

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, headers=self.headers, media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: the request is well-formed but asks for what this server or model cannot do."""
    return APIError(400, message, param=param, code=code)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route may give, for its OpenAPI description."""
    what = {400: "invalid request for this model", 401: "missing or wrong API key", 404: "unknown model",
            413: "request body too large", 422: "request does not match the schema", 429: "rate limit exceeded",
            503: "queue full or shutting down"}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


# --------------------------------------------------------------------------------------------------
# Requests
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

    def text(self) -> str:
        """The content as one string (text parts joined; none: empty)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class CommonRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: model, sampling, stopping, streaming."""

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


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool | None = Field(None, description="not supported: false only")


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, or a list of token ids (a list of one string or of one id list also works)")
    echo: bool | None = Field(None, description="not supported: false only")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, description="must be 1")
    logprobs: int | None = Field(None, ge=0, description="not supported")


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


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


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    running: int
    waiting: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: str | None


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
    logprobs: None = None
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# Stream chunks. They are serialised with exclude_unset=True, because OpenAI's chunks leave fields out rather
# than send null: a delta carries only what it adds ({"content": "..."}; {} on the last chunk), and `usage`
# is there (null, then the counts in a chunk of its own) only when the client asked for it. So the fields on
# the wire are required here, and set explicitly where a chunk is built (`server._stream`), nulls included.


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # left out unless the client asked for usage


class TextCompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]  # (logprobs set explicitly: it has a default for the non-streamed answer)
    usage: Usage | None = None  # left out unless the client asked for usage


# --------------------------------------------------------------------------------------------------
# What this server accepts: checked (400) and published in the schema from the same rules
# --------------------------------------------------------------------------------------------------


class _Only(NamedTuple):
    """A request field that OpenAI's clients may send but that this server supports with one value only."""

    allowed: Callable[[Any], bool]
    schema: dict[str, dict[str, Any] | None]  # JSON type -> keywords narrowing its schema branch; None: drop it
    message: str  # formatted with the field's name and the value given


_COMMON_ONLY = {
    "n": _Only(lambda v: v in (None, 1), {"integer": {"maximum": 1}},
               "n={value} is not supported: this server returns one choice per request (n must be 1); send several "
               "requests instead"),
    **{name: _Only(lambda v: not v, {"number": {"minimum": 0, "maximum": 0}},
                   "{name} is not supported (only 0); use repetition_penalty (> 1 discourages repeats)")
       for name in ("presence_penalty", "frequency_penalty")},
}
_UNSUPPORTED = "{name} is not supported by this server"
ONLY: dict[type[CommonRequest], dict[str, _Only]] = {
    ChatCompletionRequest: {
        **_COMMON_ONLY,
        "logprobs": _Only(lambda v: not v, {"boolean": {"enum": [False]}}, "logprobs are not supported by this server"),
    },
    CompletionRequest: {
        **_COMMON_ONLY,
        "echo": _Only(lambda v: not v, {"boolean": {"enum": [False]}}, _UNSUPPORTED),
        "suffix": _Only(lambda v: v is None, {"string": None}, _UNSUPPORTED),
        "best_of": _Only(lambda v: v in (None, 1), {"integer": {"maximum": 1}}, _UNSUPPORTED),
        "logprobs": _Only(lambda v: v is None, {"integer": None}, _UNSUPPORTED),
    },
}


def check_text(text: str, param: str) -> str:
    """`text`, if it can be encoded as UTF-8 (JSON allows lone surrogates, a tokenizer does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode text ({e.reason} at character {e.start})", param) from None
    return text


@dataclass
class RequestLimits:
    """What one server accepts beyond the request models' own types and ranges.

    model_name: the one model it serves. context: prompt + completion tokens per request. vocab_size: valid
    token ids are 0..vocab_size-1. max_stop_sequences: stop strings per request. max_token_bytes: the most
    bytes of text one token stands for, which bounds a text's token count before it is tokenised.
    """

    model_name: str
    context: int
    vocab_size: int
    max_stop_sequences: int
    max_token_bytes: int = 1

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def check_only(self, req: CommonRequest, *fields: str) -> None:
        """Refuse an option this server supports with one value only (see ONLY), naming it."""
        rules = next(ONLY[c] for c in type(req).__mro__ if c in ONLY)  # a subclass (the RAG route's) inherits
        for name in fields:
            value = getattr(req, name)
            if not rules[name].allowed(value):
                raise bad_request(rules[name].message.format(name=name, value=value), name)

    def stop_strings(self, req: CommonRequest) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.max_stop_sequences:
            raise bad_request(f"{len(stops)} stop sequences given; at most {self.max_stop_sequences} are allowed",
                              "stop")
        if any(not s for s in stops):
            raise bad_request("stop sequences must be non-empty strings", "stop")
        for s in stops:
            check_text(s, "stop")
        return stops

    def max_tokens(self, prompt_len: int, requested: int | None, default: int, param: str) -> int:
        """The completion's token budget: `requested`, or `default` capped by what the context leaves."""
        room = self.context - prompt_len
        if room < 1:
            raise bad_request(f"the prompt is {prompt_len} tokens long, but this model's maximum context length is "
                              f"{self.context} tokens, which leaves no room for a reply; shorten the prompt",
                              param, "context_length_exceeded")
        if requested is None:
            return min(default, room)
        if prompt_len + requested > self.context:
            raise bad_request(f"this model's maximum context length is {self.context} tokens, but you requested "
                              f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                              "completion); shorten the prompt or lower max_tokens",
                              param, "context_length_exceeded")
        return requested

    def check_size(self, texts: list[str], param: str) -> None:
        """Refuse, without tokenising, a text that cannot fit: every token covers at most max_token_bytes
        bytes, so n bytes are at least n / max_token_bytes tokens. (Tokenising 1 MB takes seconds.)"""
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        at_least = -(-n_bytes // self.max_token_bytes)
        if at_least >= self.context:
            raise bad_request(f"the prompt is at least {at_least} tokens long ({n_bytes} bytes), but this model's "
                              f"maximum context length is {self.context} tokens; shorten the prompt", param,
                              "context_length_exceeded")

    def completion_prompt(self, req: CompletionRequest) -> str | list[int]:
        """The one prompt of a completion request: a checked string, or token ids in the vocabulary."""
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(f"a batch of {len(prompt)} prompts was given; this server takes one prompt per "
                                  "request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            text = check_text(prompt, "prompt")
            self.check_size([text], "prompt")
            return text
        if bad := [t for t in prompt if not 0 <= t < self.vocab_size]:
            raise bad_request(f"token id {bad[0]} is outside this model's vocabulary 0..{self.vocab_size - 1}",
                              "prompt")
        return list(prompt)

    def narrow_schema(self, schemas: dict[str, Any]) -> None:
        """Make the published request schemas (OpenAPI components) say what the checks above accept."""

        def branches(prop: dict[str, Any], type_: str) -> list[dict[str, Any]]:
            return [b for b in prop.get("anyOf", [prop]) if b.get("type") == type_]

        for model, rules in ONLY.items():
            props = schemas[model.__name__]["properties"]
            props["model"] = {"type": "string", "enum": [self.model_name], "title": "Model"}  # check_model
            for name, rule in rules.items():
                for type_, keywords in rule.schema.items():
                    if keywords is None:
                        props[name]["anyOf"] = [b for b in props[name]["anyOf"] if b.get("type") != type_]
                    for b in branches(props[name], type_):
                        b.update(keywords)
            for key in ("max_tokens", "max_completion_tokens"):  # max_tokens: at least one prompt token
                for b in branches(props.get(key, {}), "integer"):
                    b["maximum"] = self.context - 1
            for b in branches(props["stop"], "array"):  # stop_strings
                b["maxItems"] = self.max_stop_sequences
                b["items"]["minLength"] = 1
            for b in branches(props["stop"], "string"):
                b["minLength"] = 1
        prompt = schemas["CompletionRequest"]["properties"]["prompt"]  # completion_prompt, and not empty
        for b in branches(prompt, "string"):
            b["minLength"] = 1
        for b in branches(prompt, "array"):
            b["minItems"] = 1
            items = b["items"]
            if items.get("type") == "integer":
                items.update(minimum=0, maximum=self.vocab_size - 1)
            else:  # one string, or one list of ids
                b["maxItems"] = 1
                if items.get("type") == "string":
                    items["minLength"] = 1
                if items.get("type") == "array":
                    items["minItems"] = 1
                    items["items"].update(minimum=0, maximum=self.vocab_size - 1)


__all__ = [
    "APIError", "ChatChoice", "ChatChoiceMessage", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk",
    "ChatCompletionRequest", "ChatDelta", "ChatMessage", "CommonRequest", "CompletionChoice", "CompletionRequest",
    "ErrorDetail", "ErrorResponse", "HealthStatus", "ModelCard", "ModelList", "RequestLimits", "StreamOptions",
    "TextCompletion", "TextCompletionChunk", "TextPart", "Usage", "bad_request", "check_text", "error_responses",
]
