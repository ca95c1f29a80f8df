"""The OpenAI API as this server speaks it: request, response, stream-chunk and error shapes, and the checks.

Every body the server sends is one of these pydantic models serialised with `.model_dump_json()`, and the
same models generate the OpenAPI schema (/openapi.json): what is documented is what is sent.

What a request may contain is decided here, in two layers:
- the request models' field types and ranges (strict JSON types: no 0 for false, no "1" for 1). A body
  that breaks them is answered 422 by FastAPI;
- `RequestLimits`: what this server and its model can do: the one model name (404 otherwise), n up to max_n, at
  most max_stop_sequences stop strings, prompt + max_tokens within the context, token ids in the vocabulary,
  valid UTF-8, unsupported options off (`ONLY`: tools, logit_bias, audio, ... each refused by name when set to
  anything but its default). Answered 400 with a message that says what to change. The same object narrows the
  published schema to these limits (`narrow_schema`), so clients and fuzzers reading /openapi.json see what is
  accepted.
Request shapes are OpenAI's, plus vLLM's sampling extensions top_k, min_p, repetition_penalty and
ignore_eos. A field that is none of these is refused by name (400), as OpenAI does ("unrecognized request
argument"): a misspelt option fails loudly instead of being ignored. OpenAI's own client sends only the fields
its caller gave. (The RAG route, built on chat, ignores unknown fields: see byollm.serve.rag_route.)
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


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema the reply must validate against")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """text (the default), json_object (any JSON object) or json_schema (an object valid against the schema):
    both JSON kinds by constrained decoding, so the reply always parses (byollm.serve.constrained)."""

    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description="with type json_schema: the schema")


class CommonRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: model, sampling, stopping, streaming."""

    # extra: kept (in model_extra) so that an unknown field is refused by name (RequestLimits.check_unknown)
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_tokens, capped by "
                                   "what the context leaves after the prompt")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, description="choices to generate (up to the server's max_n); with a seed, "
                          "choice i is sampled with seed + i")
    stop: str | list[str] | None = Field(None, description="stop strings (the reply is cut before one)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    user: str | None = Field(None, description="an id of the end user (logged hashed, with log_prompts only)")
    logit_bias: dict[str, int | float] | None = Field(None, description="not supported: empty only")
    top_k: int | None = Field(None, ge=-1, lt=INT64, description="extension: sample among the k most likely "
                              "(0 or -1: off)")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="extension: > 1 discourages repeats")
    ignore_eos: bool = Field(False, description="extension: do not stop at the end token (benchmarks)")


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool | None = Field(None, description="return each reply token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: also the most "
                                     "likely alternatives at each position")
    response_format: ResponseFormat | None = None
    # OpenAI's fields for features this server does not have: accepted only at their defaults (see ONLY)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: empty only")
    tool_choice: str | dict[str, Any] | None = Field(None, description="not supported: 'none' only")
    parallel_tool_calls: bool | None = Field(None, description="ignored (no tools)")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: empty only")
    function_call: str | dict[str, Any] | None = Field(None, description="not supported: 'none' only")
    modalities: list[str] | None = Field(None, description="['text'] only")
    audio: dict[str, Any] | None = Field(None, description="not supported")
    prediction: dict[str, Any] | None = Field(None, description="not supported")
    service_tier: str | None = Field(None, description="'auto' or 'default' only")
    store: bool | None = Field(None, description="not supported: false only")
    metadata: dict[str, str] | None = Field(None, description="not supported: empty only")
    reasoning_effort: str | None = Field(None, description="not supported")
    verbosity: str | None = Field(None, description="not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported")
    prompt_cache_key: str | None = Field(None, description="accepted and ignored (a cache hint)")
    safety_identifier: str | None = Field(None, description="as user")


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, or a list of token ids (a list of one string or of one id list also works)")
    echo: bool | None = Field(None, description="put the prompt's text before the completion")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, description="must be 1")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="return each token's log-probability "
                                 "and the this many most likely alternatives")


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat: one entry per reply token, its log-probability under the model (log-softmax of its logits, before
    temperature and filters) and the top_logprobs most likely tokens at that position."""

    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """Completions (the legacy shape): parallel lists per token; text_offset: where the token starts in the text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: ChoiceLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChoiceLogprobs | None
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


_OFF = "{name} is not supported by this server; leave it out"
_NO_TOOLS = ("{name} is not supported: this server has no tool or function calling; send the request without "
             "{name} (describe the wanted output with response_format json_schema instead)")
_COMMON_ONLY = {
    **{name: _Only(lambda v: not v, {"number": {"minimum": 0, "maximum": 0}},
                   "{name} is not supported (only 0); use repetition_penalty (> 1 discourages repeats)")
       for name in ("presence_penalty", "frequency_penalty")},
    "logit_bias": _Only(lambda v: not v, {"object": {"maxProperties": 0}},
                        "logit_bias is not supported by this server (only an empty object); leave it out"),
}
_UNSUPPORTED = "{name} is not supported by this server"
ONLY: dict[type[CommonRequest], dict[str, _Only]] = {
    ChatCompletionRequest: {
        **_COMMON_ONLY,
        **{name: _Only(lambda v: not v, {"array": {"maxItems": 0}}, _NO_TOOLS) for name in ("tools", "functions")},
        **{name: _Only(lambda v: v in (None, "none"), {"string": {"enum": ["none"]}, "object": None}, _NO_TOOLS)
           for name in ("tool_choice", "function_call")},
        "modalities": _Only(lambda v: v is None or set(v) <= {"text"},
                            {"array": {"maxItems": 1, "items": {"type": "string", "enum": ["text"]}}},
                            "modalities={value} is not supported: this server answers with text only (['text'])"),
        **{name: _Only(lambda v: v is None, {"object": None}, _OFF)
           for name in ("audio", "prediction", "web_search_options")},
        **{name: _Only(lambda v: v is None, {"string": None}, _OFF) for name in ("reasoning_effort", "verbosity")},
        "service_tier": _Only(lambda v: v in (None, "auto", "default"), {"string": {"enum": ["auto", "default"]}},
                              "service_tier={value} is not supported: this server has one tier ('auto' or 'default')"),
        "store": _Only(lambda v: not v, {"boolean": {"enum": [False]}},
                       "store is not supported: this server keeps no completions (false only)"),
        "metadata": _Only(lambda v: not v, {"object": {"maxProperties": 0}},
                          "metadata is not supported: this server stores no completions to tag; leave it out"),
    },
    CompletionRequest: {
        **_COMMON_ONLY,
        "suffix": _Only(lambda v: v is None, {"string": None}, _UNSUPPORTED),
        "best_of": _Only(lambda v: v in (None, 1), {"integer": {"maximum": 1}},
                         "best_of={value} is not supported (only 1); use n for several completions"),
    },
}
# Routes built on chat that post-process one plain-text answer (the RAG route) take one choice of text only.
SINGLE_ANSWER_ONLY = {
    "n": _Only(lambda v: v in (None, 1), {}, "n={value} is not supported on this route (one answer per request)"),
    "logprobs": _Only(lambda v: not v, {}, "logprobs are not supported on this route"),
    "response_format": _Only(lambda v: v is None or v.type == "text", {},
                             "response_format is not supported on this route (its answer is text with citations)"),
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
    bytes of text one token stands for, which bounds a text's token count before it is tokenised. max_n:
    choices per request.
    """

    model_name: str
    context: int
    vocab_size: int
    max_stop_sequences: int
    max_token_bytes: int = 1
    max_n: int = 1

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def check_only(self, req: CommonRequest, *fields: str, rules: dict[str, _Only] | None = None) -> None:
        """Refuse an option this server supports with one value only (see ONLY), naming it; no fields: all of
        the request's rules."""
        if rules is None:
            rules = next(ONLY[c] for c in type(req).__mro__ if c in ONLY)  # a subclass (the RAG route's) inherits
        for name in fields or rules:
            value = getattr(req, name)
            if not rules[name].allowed(value):
                raise bad_request(rules[name].message.format(name=name, value=value), name)

    def check_unknown(self, req: CommonRequest) -> None:
        """Refuse a field that is not part of the request's shape, naming it (as OpenAI does)."""
        if req.model_extra:
            name = next(iter(req.model_extra))[:100]
            raise bad_request(f"unrecognized request field '{name}'; this server takes OpenAI's fields (and the "
                              "extensions top_k, min_p, repetition_penalty, ignore_eos), listed in /openapi.json", name)

    def choices(self, req: CommonRequest) -> int:
        """How many choices the request asks for (n), at most max_n."""
        n = req.n or 1
        if n > self.max_n:
            raise bad_request(f"n={n} choices were asked for; this server returns at most {self.max_n} per request "
                              "(its max_n); send several requests instead", "n")
        return n

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
            schemas[model.__name__]["additionalProperties"] = False  # check_unknown
            props = schemas[model.__name__]["properties"]
            props["model"] = {"type": "string", "enum": [self.model_name], "title": "Model"}  # check_model
            for b in branches(props["n"], "integer"):  # choices
                b["maximum"] = self.max_n
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
    "ChatCompletionRequest", "ChatDelta", "ChatMessage", "ChoiceLogprobs", "CommonRequest", "CompletionChoice",
    "CompletionLogprobs", "CompletionRequest", "ErrorDetail", "ErrorResponse", "HealthStatus", "JSONSchemaFormat",
    "MAX_TOP_LOGPROBS", "ModelCard", "ModelList", "RequestLimits", "ResponseFormat", "SINGLE_ANSWER_ONLY",
    "StreamOptions", "TextCompletion", "TextCompletionChunk", "TextPart", "TokenLogprob", "TopLogprob", "Usage",
    "bad_request", "check_text", "error_responses",
]
