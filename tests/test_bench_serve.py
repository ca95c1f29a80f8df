"""benchmarks/bench_serve.py's client on the two stream formats it meets: byollm's (usage in the last chunk)
and llama-cpp-python's (no usage; `"finish_reason": "length"` means max_tokens tokens; JSON with spaces), cut
into reads that split events, with LF and CRLF separators (SSE allows both). The streams are written by hand
here, in the shapes those servers send; speed is never asserted."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_serve_under_test", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def llama_cpp_chat_stream(pieces: list[str], finish: str) -> bytes:
    """What `python -m llama_cpp.server` streams for a chat completion (llama-cpp-python 0.3.36)."""
    chunk = {"id": "chatcmpl-1", "model": "m", "created": 1, "object": "chat.completion.chunk"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                     "finish_reason": None}]}]
    events += [{**chunk, "choices": [{"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}]}
               for p in pieces]
    events.append({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]})
    return b"".join(f"data: {json.dumps(e)}\r\n\r\n".encode() for e in events) + b"data: [DONE]\r\n\r\n"  # CRLF


def byollm_chat_stream(pieces: list[str]) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "usage": None}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    events.append({**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                      "total_tokens": 5 + len(pieces)}})
    return b"".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


class Chunked(httpx.AsyncByteStream):
    """A response body that arrives in pieces of `size` bytes (events split across reads)."""

    def __init__(self, body: bytes, size: int) -> None:
        self.body, self.size = body, size

    async def __aiter__(self):
        for i in range(0, len(self.body), self.size):
            yield self.body[i:i + self.size]


def request(body: bytes, expected: int, size: int = 37):
    b = bench()

    async def go():
        transport = httpx.MockTransport(lambda _: httpx.Response(200, stream=Chunked(body, size)))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await b.one_request(client, {}, expected, "/v1/chat/completions")

    return asyncio.run(go())


def test_llama_cpp_stream_without_usage_counts_max_tokens_on_length() -> None:
    r = request(llama_cpp_chat_stream(["The", " sky", " is", " blue"], "length"), 4)
    assert r.ok and r.tokens == 4 and len(r.itl) == 3 and r.ttft > 0
    cut = request(llama_cpp_chat_stream(["The", " sky"], "stop"), 4)  # ended early: its chunks, and dropped
    assert not cut.ok and cut.dropped and cut.tokens == 2


def test_byollm_stream_counts_from_usage() -> None:
    r = request(byollm_chat_stream(["a", "b", "c"]), 3, size=11)
    assert r.ok and r.tokens == 3 and len(r.itl) == 2
    no_done = request(byollm_chat_stream(["a", "b", "c"])[:-len(b"data: [DONE]\n\n")], 3)
    assert no_done.dropped and not no_done.ok
