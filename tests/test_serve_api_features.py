"""OpenAI API features of `byollm serve`: n choices, logprobs, response_format (constrained decoding), echo,
seed, stop and the refusal of unsupported or unknown fields.

References: logprobs against log_softmax of the model's own logits over the same prefix (a plain forward pass,
not the engine); generated ids against byollm.generate (single-request generation); structured replies against
`jsonschema.validate` (the reference validator) and `json.loads`; the wire shapes through the official `openai`
client's models."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from fastapi.testclient import TestClient  # noqa: E402

from byollm.generate import generate  # noqa: E402
from byollm.model import GPT, preset  # noqa: E402
from byollm.sampling import SamplingParams  # noqa: E402
from byollm.serve.server import create_app  # noqa: E402
from byollm.serve.settings import ServeConfig  # noqa: E402
from byollm.tokenizer import BPETokenizer  # noqa: E402
from byollm.tokenizer.chat_template import add_chat_tokens, encode_prompt  # noqa: E402

TEXT = ("You are a terse assistant. Hi there! Hello, how can I help?  What is 2+2?\n4, of course.\n\n"
        'Tell me a joke. {"name": "Ann", "age": 31, "ok": true, "tags": ["a", "b"]} Thanks!')
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def tiny() -> tuple[GPT, BPETokenizer]:
    tok = BPETokenizer.train(TEXT * 3, vocab_size=300)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", vocab_size=tok.vocab_size, block_size=160, n_layer=1)).eval()
    return model, tok


@pytest.fixture(scope="module")
def client(tiny: tuple[GPT, BPETokenizer]) -> Iterator[TestClient]:
    model, tok = tiny
    app = create_app(model, tok, ServeConfig(model_name="tiny", max_batch_size=16, max_n=4))
    with TestClient(app) as c:
        yield c


def post(client: TestClient, route: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/v1/{route}", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def refused(client: TestClient, route: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/v1/{route}", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    return r.json()["error"]


def events(client: TestClient, route: str, **body: Any) -> list[dict[str, Any]]:
    with client.stream("POST", f"/v1/{route}", json={"model": "tiny", "stream": True, **body}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_n_choices_are_seeded_reproducible_and_equal_when_greedy(client: TestClient, tiny) -> None:  # noqa: ANN001
    model, tok = tiny
    body = {"prompt": "Hello, how", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    out = post(client, "completions", n=3, seed=7, **body)
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert [c["text"] for c in post(client, "completions", n=3, seed=7, **body)["choices"]] == texts
    assert post(client, "completions", seed=8, **body)["choices"][0]["text"] == texts[1]  # choice i: seed + i
    prompt_len = len(tok.encode("Hello, how", allowed_special=False))
    assert out["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 24, "total_tokens": prompt_len + 24}

    greedy = post(client, "chat/completions", messages=MESSAGES, n=3, max_tokens=6, temperature=0)
    ids = encode_prompt(tok, MESSAGES)
    ref = generate(model, [ids], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=()), tokenizer=tok)[0]
    assert {c["message"]["content"] for c in greedy["choices"]} == {ref.text}

    # streamed: every chunk names its choice; each choice's pieces join to the non-streamed text
    chunks = events(client, "completions", n=3, seed=7, **body)
    joined = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
              for i in range(3)]
    assert joined == texts
    finals = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finals) == [0, 1, 2]

    error = refused(client, "completions", n=5, **body)
    assert error["param"] == "n" and "at most 4" in error["message"]


def _reference_logprobs(model: GPT, ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the model's own logits at each generated position (one forward over the whole sequence)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1].float()
    return F.log_softmax(logits, dim=-1)


def test_logprobs_are_log_softmax_of_the_models_logits(client: TestClient, tiny) -> None:  # noqa: ANN001
    model, tok = tiny
    prompt = "Hello, how"
    ids = tok.encode(prompt, allowed_special=False)
    out = post(client, "completions", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    lp = out["choices"][0]["logprobs"]
    gen = generate(model, [ids], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=()), tokenizer=tok)[0]
    ref = _reference_logprobs(model, ids, gen.token_ids)
    for text, t in zip(lp["tokens"], gen.token_ids, strict=True):  # text, or OpenAI's bytes:\x.. for a partial one
        raw = tok.decode_bytes([t])
        assert text.encode() == raw or text == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), ref.gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0],
                          atol=1e-5)
    top = ref.topk(3)
    for position, alternatives in enumerate(lp["top_logprobs"]):
        assert len(alternatives) == 3
        assert sorted(alternatives.values(), reverse=True) == pytest.approx(top.values[position].tolist(), abs=1e-5)
    # where each token starts in the completion's text: the characters the tokens before it complete
    assert lp["text_offset"] == [len(tok.decode_bytes(gen.token_ids[:i]).decode("utf-8", "ignore"))
                                 for i in range(len(gen.token_ids))]

    # Chat, sampled at temperature 1.5: the logprobs are still those of the model's raw logits.
    chat = post(client, "chat/completions", messages=MESSAGES, max_tokens=6, temperature=1.5, seed=3,
                logprobs=True, top_logprobs=2, ignore_eos=True)
    content = chat["choices"][0]["logprobs"]["content"]
    chat_ids = encode_prompt(tok, MESSAGES)
    vocab = {tok.decode_bytes([t]): t for t in range(tok.vocab_size)}
    generated = [vocab[bytes(entry["bytes"])] for entry in content]
    ref = _reference_logprobs(model, chat_ids, generated)
    assert torch.allclose(torch.tensor([e["logprob"] for e in content]),
                          ref.gather(1, torch.tensor(generated)[:, None])[:, 0], atol=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in content)
    assert [e["top_logprobs"][0]["logprob"] for e in content] == pytest.approx(ref.max(-1).values.tolist(), abs=1e-5)

    # Streamed: the chunks' entries together are the same.
    chunks = events(client, "chat/completions", messages=MESSAGES, max_tokens=6, temperature=1.5, seed=3,
                    logprobs=True, top_logprobs=2, ignore_eos=True)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content

    assert refused(client, "chat/completions", messages=MESSAGES, top_logprobs=2)["param"] == "top_logprobs"


def test_echo_seed_stop_and_user(client: TestClient) -> None:
    body = {"prompt": "Hello, how", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = post(client, "completions", **body)["choices"][0]["text"]
    assert post(client, "completions", echo=True, **body)["choices"][0]["text"] == "Hello, how" + plain
    chunks = events(client, "completions", echo=True, **body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, how" + plain
    assert refused(client, "completions", echo=True, logprobs=1, **body)["param"] == "echo"

    sampled = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "seed": 11, "ignore_eos": True, "user": "u-1"}
    texts = {post(client, "completions", **sampled)["choices"][0]["text"] for _ in range(2)}
    assert len(texts) == 1  # a seed makes sampling reproducible
    assert post(client, "completions", **{**sampled, "seed": 12})["choices"][0]["text"] not in texts

    assert refused(client, "completions", stop=["a", "b", "c", "d", "e"], **body)["param"] == "stop"
    out = post(client, "completions", stop=["a", "b", "c", "d"], **body)
    assert not any(s in out["choices"][0]["text"] for s in "abcd")


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("logit_bias", {"5": 10}),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "x"}), ("prediction", {"type": "content"}),
    ("service_tier", "flex"), ("store", True), ("metadata", {"a": "b"}), ("presence_penalty", 0.5),
    ("reasoning_effort", "low"), ("frobnicate", 1)])
def test_unsupported_and_unknown_fields_are_refused_by_name(client: TestClient, field: str, value: Any) -> None:
    error = refused(client, "chat/completions", messages=MESSAGES, max_tokens=2, **{field: value})
    assert error["param"] == field and field in error["message"]


def test_default_values_of_unsupported_fields_are_accepted_and_the_schema_says_so(client: TestClient) -> None:
    post(client, "chat/completions", messages=MESSAGES, max_tokens=2, tools=[], tool_choice="none", store=False,
         logit_bias={}, modalities=["text"], service_tier="auto", parallel_tool_calls=False, n=1, user="x")
    assert refused(client, "completions", prompt="Hi", suffix="x")["param"] == "suffix"
    assert refused(client, "completions", prompt="Hi", best_of=2)["param"] == "best_of"
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert {"type": "integer", "minimum": 1, "maximum": 4} in chat["properties"]["n"]["anyOf"]
    assert {"type": "array", "items": {"type": "object", "additionalProperties": True}, "maxItems": 0} in \
        chat["properties"]["tools"]["anyOf"]
    assert "ResponseFormat" in schemas and schemas["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0][
        "maximum"] == 20


# Ten schemas of different kinds. The random tiny model writes garbage: only the grammar makes its replies valid
# (bounded strings and numbers, so that garbage ends); the real model gets the open-ended ones.
TINY_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]}},
     "required": ["ok", "level"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                               "minItems": 2, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                      "note": {"type": "string", "maxLength": 4}}, "required": ["id"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}, "maxItems": 4},
                                      "flag": {"type": "null"}}, "required": ["scores", "flag"]},
    {"type": "object", "properties": {"kind": {"const": "user"}, "active": {"type": "boolean"}},
     "required": ["kind", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "boolean"}]},
                                      "label": {"type": "string", "maxLength": 3}}, "required": ["value"]},
]
REAL_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer", "maximum": 10**9},
                                      "capital": {"type": "boolean"}}, "required": ["city", "population", "capital"]},
]


def _structured(client: TestClient, schemas: list[dict[str, Any] | None], model: str, question: str,
                **body: Any) -> list[dict[str, Any]]:
    """Ask for each schema at once (they decode in one batch; None: json_object); return each reply's choice."""
    def ask(schema: dict[str, Any] | None) -> dict[str, Any]:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}} \
            if schema is not None else {"type": "json_object"}
        r = client.post("/v1/chat/completions", json={"model": model, "messages": [
            {"role": "user", "content": question}], "response_format": fmt, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(len(schemas)) as pool:
        return list(pool.map(ask, schemas))


def test_json_schema_replies_of_a_random_model_parse_and_validate(client: TestClient) -> None:
    for schema, choice in zip(TINY_SCHEMAS, _structured(client, TINY_SCHEMAS, "tiny", "Hi", max_tokens=120,
                                                        temperature=1.0, seed=0), strict=True):
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "minLength": 5, "maxLength": 2}}, "required": ["a"]}}}
    error = refused(client, "chat/completions", messages=MESSAGES, response_format=bad)
    assert error["param"] == "response_format.json_schema.schema" and "cannot be compiled" in error["message"]


def test_json_schema_replies_of_the_real_model(smollm2_ckpt) -> None:  # noqa: ANN001
    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(str(smollm2_ckpt))
    app = create_app(loaded.model, loaded.tokenizer, ServeConfig(model_name="smol", max_batch_size=4))
    with TestClient(app) as c:
        choices = _structured(c, [*REAL_SCHEMAS, None], "smol", "Reply in JSON: a city you like.", max_tokens=48,
                              temperature=0)
    for schema, choice in zip(REAL_SCHEMAS, choices[:-1], strict=True):
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert choices[-1]["finish_reason"] == "stop" and isinstance(json.loads(choices[-1]["message"]["content"]), dict)


def test_openai_client_round_trip(client: TestClient) -> None:
    openai = pytest.importorskip("openai")

    api = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0,
                        http_client=client)  # TestClient is an httpx.Client
    schema = TINY_SCHEMAS[1]
    out = api.chat.completions.create(
        model="tiny", messages=MESSAGES, n=2, seed=1, max_tokens=40, logprobs=True, top_logprobs=1,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
        assert c.logprobs.content and all(len(t.top_logprobs) == 1 for t in c.logprobs.content)
    legacy = api.completions.create(model="tiny", prompt="Hi", max_tokens=3, logprobs=2, echo=False)
    assert len(legacy.choices[0].logprobs.token_logprobs) == len(legacy.choices[0].logprobs.tokens)
    with pytest.raises(openai.BadRequestError, match="tools"):
        api.chat.completions.create(model="tiny", messages=MESSAGES,
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
