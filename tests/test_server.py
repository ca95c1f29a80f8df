"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server on
127.0.0.1: the answers are checked against single-request generation (byollm.generate, a separate code path
from the batching engine), and the security model (keys, rate limits, body size, validation, bounded
queue, disconnects) by the status codes and error shapes OpenAI's client understands."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from byollm.errors import ByollmError  # noqa: E402
from byollm.generate import generate  # noqa: E402
from byollm.model import GPT, preset  # noqa: E402
from byollm.sampling import SamplingParams  # noqa: E402
from byollm.serve.engine import AsyncEngine, Engine  # noqa: E402
from byollm.serve.guards import RateLimiter, TokenBucket  # noqa: E402
from byollm.serve.server import GracefulServer, create_app  # noqa: E402
from byollm.serve.settings import ServeConfig  # noqa: E402
from byollm.tokenizer import BPETokenizer  # noqa: E402
from byollm.tokenizer.chat_template import add_chat_tokens, encode_prompt, end_id  # noqa: E402

TEXT = ("You are a terse assistant. Hi there! Hello, how can I help?  What is 2+2?\n4, of course.\n\n"
        "Tell me a joke. Why did the chicken cross the road? To get to the other side.  Thanks!")
KEY = "sk-test-0123456789"
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def model_and_tok() -> tuple[GPT, BPETokenizer]:
    tok = BPETokenizer.train(TEXT * 3, vocab_size=280)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", vocab_size=tok.vocab_size, block_size=96, n_layer=1)).eval()
    return model, tok


class Server:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = GracefulServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def client(self, key: str | None = "none", **kw) -> openai.OpenAI:  # noqa: ANN003
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def server(model_and_tok: tuple[GPT, BPETokenizer]) -> Iterator[Server]:
    model, tok = model_and_tok
    s = Server(create_app(model, tok, ServeConfig(model_name="tiny", max_body_bytes=50_000, default_max_tokens=12)))
    yield s
    s.stop()


def _reference(model: GPT, tok: BPETokenizer, ids: list[int], n: int, stop: tuple[int, ...]):  # noqa: ANN202
    return generate(model, [ids], SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=stop),
                    tokenizer=tok)[0]


def test_models_completion_and_chat_match_single_request_generation(server: Server, model_and_tok) -> None:  # noqa: ANN001
    model, tok = model_and_tok
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]

    out = client.completions.create(model="tiny", prompt="Hello, how", max_tokens=10, temperature=0)
    ids = tok.encode("Hello, how", allowed_special=False)
    ref = _reference(model, tok, ids, 10, (tok.eos_id,))
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), ref.completion_tokens)
    assert out.usage.total_tokens == len(ids) + ref.completion_tokens

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    ids = encode_prompt(tok, MESSAGES)
    ref = _reference(model, tok, ids, 10, (end_id(tok),))
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == ref.text
    assert chat.choices[0].finish_reason == ref.finish_reason
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), ref.completion_tokens)

    # A temperature too small to divide by is greedy (1/1e-30 would overflow the logits and fail the batch).
    tiny = client.completions.create(model="tiny", prompt="Hello, how", max_tokens=10, temperature=1e-30)
    assert tiny.choices[0].text == out.choices[0].text

    # No max_tokens: the server's default (12), capped by the context; prompt as token ids.
    out = client.completions.create(model="tiny", prompt=[5, 6, 7], temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


def test_streaming_chat_is_the_same_text_and_ends_with_done(server: Server) -> None:
    client = server.client()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # The wire format: `data: {json}` events, the last one `data: [DONE]`.
    body = {"model": "tiny", "prompt": "Hi there", "max_tokens": 5, "temperature": 0, "stream": True}
    lines = [ln for ln in httpx.post(server.url + "/v1/completions", json=body).text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_invalid_requests_are_clear_openai_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 96 tokens") as e:
        client.completions.create(model="tiny", prompt="Hello " * 200, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 96 tokens"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1000)
    start = time.monotonic()  # far too long to fit: refused by its size, before the tokenizer spends time on it
    with pytest.raises(openai.BadRequestError, match=r"at least \d+ tokens long \(40000 bytes\)"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ab" * 20_000}])
    assert time.monotonic() - start < 1
    with pytest.raises(openai.BadRequestError, match="at most 8 per request"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=9)
    with pytest.raises(openai.BadRequestError, match="at most 4 are allowed"):
        client.completions.create(model="tiny", prompt="Hi", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError, match="control token <|end|>"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi<|end|>"}])
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'"):
        client.completions.create(model="gpt-4o", prompt="Hi")
    with pytest.raises(openai.UnprocessableEntityError, match="temperature") as e:
        client.completions.create(model="tiny", prompt="Hi", temperature=5)
    assert set(e.value.body) == {"message", "type", "param", "code"}

    response = httpx.post(server.url + "/v1/completions", content=b"x" * 60_000,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit of 50000 bytes" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics_expose_requests_tokens_and_latency_histograms(server: Server) -> None:
    server.client().completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("byollm_time_to_first_token_seconds_bucket", "byollm_inter_token_latency_seconds_bucket",
                 "byollm_request_latency_seconds_count", "byollm_num_requests_running",
                 "byollm_num_requests_waiting", "byollm_prompt_tokens_total", "byollm_completion_tokens_total"):
        assert name in text, name
    assert 'byollm_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_api_keys_and_rate_limits(model_and_tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    caplog.set_level("DEBUG")
    model, tok = model_and_tok
    keys = tmp_path / "keys"
    keys.write_text(f"# one key a line\n{KEY}\n")
    s = Server(create_app(model, tok, ServeConfig(model_name="tiny", api_keys_file=str(keys), api_keys_env="",
                                                  requests_per_minute=3, tokens_per_minute=50)))
    try:
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            s.client("sk-wrong-key-000").models.list()
        no_key = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key

        client = s.client(KEY)
        with pytest.raises(openai.RateLimitError, match="50 tokens per minute"):  # can never fit
            client.completions.create(model="tiny", prompt="Hi", max_tokens=60)
        for _ in range(3):
            client.completions.create(model="tiny", prompt="Hi, the secret plan", max_tokens=2)
        with pytest.raises(openai.RateLimitError, match="3 requests per minute") as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
    finally:
        s.stop()
    assert "completion" in caplog.text  # requests are logged, but neither keys nor prompts are
    assert KEY not in caplog.text and "sk-wrong-key" not in caplog.text and "secret plan" not in caplog.text


def test_full_queue_answers_503_and_disconnects_free_the_slot(model_and_tok) -> None:  # noqa: ANN001
    model, tok = model_and_tok
    engine = Engine(model, tok, max_batch_size=1, max_waiting=1)
    step = engine.step

    def slow_step():  # noqa: ANN202 - 20 ms a step, so requests stay in flight while we look
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    s = Server(create_app(AsyncEngine(engine), tok, ServeConfig(model_name="tiny")))
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 90, "stream": True, "ignore_eos": True}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=s.url, timeout=20) as client:
            async def listen() -> None:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        pass

            async def until(condition) -> None:  # noqa: ANN001
                deadline = time.monotonic() + 5
                while not condition():
                    assert time.monotonic() < deadline, (engine.num_running, engine.num_waiting)
                    await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(listen())]
            await until(lambda: engine.num_running == 1)
            tasks.append(asyncio.create_task(listen()))  # the batch (1) is full: it waits
            await until(lambda: engine.num_waiting == 1)
            full = await client.post("/v1/completions", json=body)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert "queue is full" in full.json()["error"]["message"]
            for task in tasks:  # the clients go away: both requests must leave the engine
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            start = time.monotonic()
            await until(lambda: engine.num_running + engine.num_waiting == 0)
            assert time.monotonic() - start < 1.0, "a disconnected request kept its slot"  # 90 steps: > 1.8 s

    try:
        asyncio.run(scenario())
    finally:
        s.stop()


def test_load_generator_measures_a_real_server(server: Server) -> None:
    """benchmarks/bench_serve.py's client, briefly (speed is never asserted in tests)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # (dataclasses look their module up there)
    spec.loader.exec_module(bench)
    row = asyncio.run(bench.run_level(server.url, "tiny", 2, 0.3, "Hello there", 6, {}))
    assert row["completed"] >= 2 and row["errors"] == row["dropped"] == row["5xx"] == 0
    assert row["out_tok_per_s"] > 0 and 0 < row["ttft_ms_median"] and row["tpot_ms_median"] > 0
    bad = asyncio.run(bench.run_level(server.url, "not-the-model", 1, 0.1, "Hi", 6, {}))
    assert bad["errors"] >= 1 and bad["5xx"] == 0 and bad["completed"] == 0


def test_shutdown_ends_running_streams_cleanly(model_and_tok) -> None:  # noqa: ANN001
    model, tok = model_and_tok
    engine = Engine(model, tok, max_batch_size=2)
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]  # 60 tokens: > 1.2 s
    s = Server(create_app(AsyncEngine(engine), tok, ServeConfig(model_name="tiny", shutdown_timeout=0.3)))
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, "stream": True, "ignore_eos": True}
    events = []
    start = time.monotonic()
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=20) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:  # streaming: now stop the server (as SIGTERM does)
                    threading.Thread(target=s.stop).start()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "cancelled"
    assert time.monotonic() - start < 1.0 and len(events) < 40
    s.thread.join(timeout=10)
    assert not s.thread.is_alive() and engine.num_running == 0


def test_token_bucket_against_hand_computed_waits() -> None:
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # 60 a minute = 1 a second
    bucket.take(60)
    assert bucket.wait(1) == pytest.approx(1.0)
    now[0] = 0.25
    assert bucket.wait(1) == pytest.approx(0.75) and bucket.wait(0.25) == 0
    bucket.give_back(100)
    assert bucket.level == 60  # never above capacity

    limiter = RateLimiter(None, 120, clock=lambda: now[0])  # 2 tokens a second
    limiter.acquire("a", 100)
    limiter.acquire("b", 120)  # each key has its own bucket
    with pytest.raises(Exception, match="retry in 31 s") as e:  # b is empty: 61 tokens take 30.5 s
        limiter.acquire("b", 61)
    assert e.value.headers["Retry-After"] == "31"


def test_settings_read_keys_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEYS", "sk-env-00000001, sk-env-00000002")
    (tmp_path / "k").write_text("sk-file-0000001\n\n# comment\n")
    assert ServeConfig(api_keys_file=str(tmp_path / "k"), api_keys_env="MY_KEYS").load_api_keys() == {
        "sk-file-0000001", "sk-env-00000001", "sk-env-00000002"}
    assert ServeConfig(api_keys_env="NOT_SET_HERE").load_api_keys() == frozenset()
    with pytest.raises(ByollmError, match="too easy to guess"):
        ServeConfig(api_keys=["short"]).load_api_keys()
    with pytest.raises(ByollmError, match="does not exist"):
        ServeConfig(api_keys_file=str(tmp_path / "missing")).load_api_keys()
    with pytest.raises(ByollmError, match="max_waiting must be >= 1"):
        ServeConfig(max_waiting=0)


def test_serve_cli_checks_settings_before_loading(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from byollm.cli import main

    assert main(["serve", str(tmp_path / "no-such-ckpt"), "--max_waiting", "0"]) == 2
    assert "max_waiting must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "no-such-ckpt"), "--api_keys_file", str(tmp_path / "keys")]) == 2
    assert "api_keys_file" in capsys.readouterr().err
    assert main(["serve", "ckpt", "--api_keys", "sk-on-the-command-line"]) == 2  # keys never on the command line
