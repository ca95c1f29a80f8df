"""Load test of `byollm serve`, alone or against llama-cpp-python's server: streaming clients at several
concurrencies, as vLLM's serving benchmark does.

Starts each contender's server on 127.0.0.1 (or uses a running server with --url), then for each concurrency C
runs C asyncio clients for --duration seconds, each sending streaming requests back to back (the same prompts
and max_tokens for every server, end of sequence suppressed so every request produces exactly --max-tokens
tokens), and reports per contender and concurrency:

    TTFT    time to first token: request sent -> first chunk with text (median, p99)
    TPOT    time per output token, vLLM's definition: (e2e latency - TTFT) / (output tokens - 1) (median, p99)
    ITL     inter-token latency: time between consecutive chunks (median, p99)
    req/s   completed requests per second; tok/s output tokens per second (over the whole window, the last
            requests included)
    errors  failed requests (any non-200, a connection error), of which 5xx; dropped: a 200 stream that did not
            end with `data: [DONE]` or gave fewer tokens than asked

Contenders (--contenders; all their servers run at once, and each round visits them in turn, the order flipped
every round, so a busy spell on a shared machine hits all of them alike):

    byollm          `byollm serve CKPT --max_batch_size N` (continuous batching; fp32 on a CPU)
    byollm-NAME     the same with more serve options: --byollm-variant NAME="--int8 true" (any `byollm serve` flag)
    llama.cpp-orig  `python -m llama_cpp.server` on the GGUF file the real model came in (Q4_1 for SmolLM2)
    llama.cpp-f16   the same on our `byollm export gguf` of the checkpoint, f16 (llama.cpp-f32: f32)

llama-cpp-python's server decodes one request at a time per model (a lock around the model; no batching across
requests): it is started with --interrupt_requests false (its default true ends the running stream with [DONE]
as soon as another request waits, which would drop streams under load), --logits_all false (its default keeps
the logits of every prompt position), n_threads = n_threads_batch = --threads, n_ctx 2048. It ignores
`ignore_eos`; its requests get a -100 logit bias on every special token instead (the same effect: no end of
turn before max_tokens; adding `min_tokens` made it stop early again, llama-cpp-python 0.3.36). Both servers
get OMP_NUM_THREADS = --threads and OMP_WAIT_POLICY=PASSIVE (with spinning OpenMP threads llama.cpp ran 5-10x
slower on the shared machine here).

Targets: output tok/s at 16 concurrent >= 4x the single client (llama-tiny); zero 5xx and zero dropped at 32
concurrent for 60 s; on the real model, byollm's output tok/s at 16 concurrent >= 3x llama.cpp's server.

    .venv/bin/python benchmarks/bench_serve.py                              # llama-tiny, 1/4/16/32 x 20 s
    .venv/bin/python benchmarks/bench_serve.py --concurrency 1 16 --rounds 3 --duration 10   # the 16/1 ratio
    .venv/bin/python benchmarks/bench_serve.py --concurrency 32 --duration 60   # the 60 s soak
    .venv/bin/python benchmarks/bench_serve.py --real --rounds 2             # SmolLM2: byollm vs llama.cpp, 1/4/16
    .venv/bin/python benchmarks/bench_serve.py --real --engine-steps         # + decode step time at batch 1 vs 16
    .venv/bin/python benchmarks/bench_serve.py --quick --contenders byollm llama.cpp-f16   # smoke test, seconds
    .venv/bin/python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model NAME   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported from the tests
from common import cpu_flags, cpu_model, interleaved, load_average, write_json  # noqa: E402

from byollm.child_server import child_server, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly mix bread flour water salt "
         "and yeast then knead it let it rise and bake").split()
REAL_MODEL = "smollm2-135m-instruct"
# The chat prompts of --endpoint chat: request i asks QUESTIONS[i % 16] (a different user turn for consecutive
# requests, so no server gets to reuse the previous request's whole prompt from its cache).
QUESTIONS = [f"{q} Answer in a few sentences." for q in (
    "Why is the sky blue?", "How do plants make food from sunlight?", "What causes the seasons on Earth?",
    "How does a refrigerator keep food cold?", "Why does bread rise when it bakes?", "What is a black hole?",
    "How do vaccines train the immune system?", "Why do cats purr?", "How does a rainbow form?",
    "What makes the ocean salty?", "How do bees make honey?", "Why do leaves change colour in autumn?",
    "How does a compass find north?", "What is the water cycle?", "Why is the Moon visible during the day?",
    "How do airplanes stay in the air?")]


# --------------------------------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------------------------------


def make_checkpoint(preset_name: str, directory: Path, vocab_size: int = 512, block_size: int = 512) -> Path:
    """A randomly initialised checkpoint of `preset_name` with a small byte-level BPE tokenizer that has the
    chat tokens (so /v1/chat/completions works too)."""
    import dataclasses

    import torch

    from byollm.checkpoint import save_checkpoint
    from byollm.model import GPT, preset
    from byollm.tokenizer import train_bpe_fast
    from byollm.tokenizer.chat_template import add_chat_tokens

    text = " ".join(random.Random(0).choice(WORDS) for _ in range(20_000))
    tok = train_bpe_fast(text, vocab_size=vocab_size)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    config = dataclasses.replace(preset(preset_name), vocab_size=tok.vocab_size, block_size=block_size)
    return save_checkpoint(GPT(config), directory / preset_name, tok)


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment both kinds of server run in: `threads` OpenMP threads that sleep when idle."""
    return {"OMP_WAIT_POLICY": "PASSIVE", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


@contextmanager
def running_server(ckpt: Path, extra: list[str], log_path: Path, env: dict[str, str] | None = None,
                   model_name: str | None = None):
    """`byollm serve CKPT` in a subprocess on a free port; yields its base URL; SIGINT (graceful) at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "byollm.cli", "serve", str(ckpt), "--port", str(port),
           *(["--model_name", model_name] if model_name else []), *extra]
    url = f"http://127.0.0.1:{port}"
    with child_server(cmd, url + "/health", log_path, env={**os.environ, **(env or {})}, cwd=ROOT, stop=signal.SIGINT,
                      poll_s=0.3):
        yield url


# Started through this, llama-cpp-python loads models with llama.cpp's plain CPU buffers (what
# byollm.interop.gguf.load_llama_cpp does): its repacked AMX buffers segfault on Q4_1 files on AMX Xeons.
PLAIN_BUFFERS_LAUNCHER = """import runpy, sys
import llama_cpp.llama_cpp as c
defaults = c.llama_model_default_params
def plain():
    p = defaults()
    p.use_extra_bufts = False
    return p
c.llama_model_default_params = plain
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


@contextmanager
def llama_cpp_server(gguf: Path, name: str, threads: int, log_path: Path, extra: list[str],
                     plain_buffers: bool = False):
    """`python -m llama_cpp.server` on `gguf` (model id `name`) on a free port; yields its base URL."""
    port = free_port()
    head = [sys.executable, "-c", PLAIN_BUFFERS_LAUNCHER] if plain_buffers else [sys.executable, "-m",
                                                                                  "llama_cpp.server"]
    cmd = [*head, "--model", str(gguf), "--model_alias", name, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
           "--interrupt_requests", "false", "--logits_all", "false", "--verbose", "false", *extra]
    url = f"http://127.0.0.1:{port}"
    with child_server(cmd, url + "/v1/models", log_path, env={**os.environ, **thread_env(threads)},
                      stop=signal.SIGINT, poll_s=0.3):
        yield url


@dataclass
class Contender:
    name: str
    kind: str  # "byollm" or "llama.cpp"
    model: Path  # a checkpoint (byollm) or a GGUF file (llama.cpp)
    extra: list[str] = field(default_factory=list)  # more command-line options of its server
    url: str = ""
    no_stop: dict[str, Any] = field(default_factory=dict)  # request fields that keep it from stopping early


def contenders_of(args: argparse.Namespace, ckpt: Path, tmp: Path) -> list[Contender]:
    from byollm.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(ckpt).tokenizer if any(n.startswith("llama.cpp") for n in args.contenders) else None
    specials = sorted(set(getattr(tokenizer, "special_tokens", {}).values())) if tokenizer else []
    llama_no_stop = {"logit_bias": {str(i): -100 for i in specials}}  # (with min_tokens too it stops early)
    byollm_extra = ["--max_batch_size", str(args.max_batch_size), "--max_waiting", "256", *args.serve_args.split()]
    variants = dict(v.split("=", 1) for v in args.byollm_variant)
    out = []
    for name in args.contenders:
        if name == "byollm" or name.removeprefix("byollm-") in variants:
            more = variants.get(name.removeprefix("byollm-"), "") if name != "byollm" else ""
            out.append(Contender(name, "byollm", ckpt, byollm_extra + more.split(), no_stop={"ignore_eos": True}))
        elif name == "llama.cpp-orig":
            if not args.real:
                raise SystemExit("llama.cpp-orig is the file a packaged model came in: give --real")
            from byollm.interop.pretrained import packaged_gguf

            out.append(Contender(name, "llama.cpp", packaged_gguf(REAL_MODEL), args.llama_cpp_args.split(),
                                 no_stop=llama_no_stop))
        elif name in ("llama.cpp-f16", "llama.cpp-f32"):
            from byollm.interop.gguf import export_checkpoint_to_gguf

            dtype = name.rsplit("-", 1)[1]
            gguf = export_checkpoint_to_gguf(ckpt, tmp / f"model-{dtype}.gguf", dtype)  # type: ignore[arg-type]
            out.append(Contender(name, "llama.cpp", gguf, args.llama_cpp_args.split(), no_stop=llama_no_stop))
        else:
            raise SystemExit(f"unknown contender {name!r}: byollm, byollm-NAME (with --byollm-variant "
                             "NAME='serve options'), llama.cpp-orig, llama.cpp-f16, llama.cpp-f32")
    return out


# --------------------------------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool
    status: int
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    dropped: bool = False
    error: str = ""


FINISH = re.compile(rb'"finish_reason": ?"(\w+)"')
EMPTY_TEXT = re.compile(rb'"text": ?""')


def _chat_event(event: bytes) -> tuple[int, str | None, dict | None]:
    """(1 if it carries text, its finish_reason, its usage) of one chat-completion stream event."""
    obj = json.loads(event[6:])
    choice = (obj.get("choices") or [{}])[0]
    return int(bool((choice.get("delta") or {}).get("content"))), choice.get("finish_reason"), obj.get("usage")


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], expected_tokens: int,
                      path: str = "/v1/completions") -> Result:
    """One streaming request. The client must stay light (it shares the CPU with the server): completion
    events are found by their bytes, and only the last one (usage) is parsed as JSON; chat events are parsed
    (a few hundred a second). A server that sends no usage has its tokens counted from its finish_reason."""
    chat = path.endswith("/chat/completions")
    start = time.perf_counter()
    ttft, last, itl, done, usage, buffer, finish, chunks = 0.0, start, [], False, None, b"", None, 0
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(False, response.status_code, error=response.text[:200])
            async for data in response.aiter_raw():
                now = time.perf_counter()
                *events, buffer = (buffer + data).replace(b"\r\n", b"\n").split(b"\n\n")
                texts = 0
                for event in events:
                    event = event.strip()
                    if event == b"data: [DONE]":
                        done = True
                    elif not event.startswith(b"data: "):
                        continue  # an SSE comment or ping
                    elif chat:
                        text, reason, used = _chat_event(event)
                        texts, finish, usage = texts + text, reason or finish, used or usage
                    elif b'"usage":{' in event:
                        usage = json.loads(event[6:])["usage"]
                    elif (reason := FINISH.search(event)) is not None:
                        finish = reason[1].decode()  # llama-cpp-python: text and finish in one event, no usage
                        texts += not EMPTY_TEXT.search(event)
                    elif not EMPTY_TEXT.search(event):
                        texts += 1
                if texts:  # several events in one read: the latency spreads over them
                    if ttft == 0.0:
                        ttft = now - start
                        itl += [0.0] * (texts - 1)
                    else:
                        itl += [(now - last) / texts] * texts
                    last = now
                    chunks += texts
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(False, 0, error=f"{type(e).__name__}: {e}"[:200])
    e2e = time.perf_counter() - start
    if usage:
        tokens = usage["completion_tokens"]
    else:  # no usage (llama-cpp-python): "length" means exactly max_tokens tokens were generated
        tokens = expected_tokens if finish == "length" else chunks
    dropped = not done or tokens != expected_tokens
    return Result(not dropped, 200, ttft, e2e, tokens, itl, dropped)


def ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 2)


async def run_level(url: str, model: str, concurrency: int, duration: float, prompt: str, max_tokens: int,
                    headers: dict[str, str], *, chat: bool = False, extra_body: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """`concurrency` clients sending requests back to back for `duration` s. Completions send `prompt`; chat
    (`chat=True`) sends QUESTIONS in turn (`prompt` unused). `extra_body`: the server's no-early-stop fields."""
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}, **(extra_body if extra_body is not None else
                                                             {"ignore_eos": True})}
    counter = iter(range(10**9))

    def body() -> dict[str, Any]:
        if chat:
            return {**common, "messages": [{"role": "user", "content": QUESTIONS[next(counter) % len(QUESTIONS)]}]}
        return {**common, "prompt": prompt}

    path = "/v1/chat/completions" if chat else "/v1/completions"
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits,
                                 headers=headers) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                results.append(await one_request(client, body(), max_tokens, path))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1]
    itl = [x for r in good for x in r.itl]
    out_tokens = sum(r.tokens for r in good)
    return {
        "concurrency": concurrency, "seconds": round(elapsed, 2), "requests": len(results), "completed": len(good),
        "errors": sum(not r.ok for r in results), "5xx": sum(r.status >= 500 for r in results),
        "dropped": sum(r.dropped for r in results), "first_error": next((r.error for r in results if r.error), ""),
        "req_per_s": round(len(good) / elapsed, 2), "out_tok_per_s": round(out_tokens / elapsed, 1),
        "ttft_ms_median": ms([r.ttft for r in good], 0.5), "ttft_ms_p99": ms([r.ttft for r in good], 0.99),
        "tpot_ms_median": ms(tpot, 0.5), "tpot_ms_p99": ms(tpot, 0.99),
        "itl_ms_median": ms(itl, 0.5), "itl_ms_p99": ms(itl, 0.99),
        "e2e_ms_median": round(1000 * statistics.median([r.e2e for r in good]), 1) if good else None,
    }


def prompt_of(n_words: int) -> str:
    rng = random.Random(1)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    cols = cols or ["round", "concurrency", "seconds", "completed", "errors", "5xx", "dropped", "req_per_s",
                    "out_tok_per_s", "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median", "tpot_ms_p99",
                    "itl_ms_median", "itl_ms_p99"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The engine alone: decode step time by batch size (what bounds the server's throughput)
# --------------------------------------------------------------------------------------------------


def engine_variants() -> dict[str, dict[str, Any]]:
    """The engine's default decode path, and its faster one where this checkout's Engine has it."""
    import inspect

    from byollm.serve.engine import Engine

    fast = "fast_decode" in inspect.signature(Engine).parameters
    return {"default": {}, **({"fast_decode": {"fast_decode": True}} if fast else {})}


def engine_step_ms(ckpt: Path, batches: list[int], threads: int, steps: int = 12,
                   variants: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Median wall time (ms) of one `Engine.step()` with `b` requests all decoding, for each b in `batches` and
    each engine variant (name: more Engine options; default {"default": {}}: transposed weights, as `byollm serve`
    runs on a CPU), no HTTP. One engine per (variant, b), their steps interleaved
    (common.interleaved), so a busy spell of a shared machine hits all of them. Keys: "VARIANT bB"."""
    import torch

    from byollm.checkpoint import load_checkpoint
    from byollm.sampling import SamplingParams
    from byollm.serve.engine import Engine
    from byollm.tokenizer import chat_format

    torch.set_num_threads(threads)
    engines = {}
    for name, options in (variants or {"default": {}}).items():
        for b in batches:
            loaded = load_checkpoint(ckpt)  # an engine changes its model's weights in place: one model each
            engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=b, max_seq_len=256,
                            transpose_weights=True, **options)
            fmt = chat_format(loaded.tokenizer)
            params = SamplingParams(max_new_tokens=2 * steps + 32, temperature=0, stop_token_ids=())
            ids = {engine.add_request(fmt.encode_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]),
                                      params) for i in range(b)}
            started: set[str] = set()
            while started != ids:  # admission and prefill: every request has its first token
                started |= {o.request_id for o in engine.step() if o.token_id >= 0}
            engines[f"{name} b{b}"] = engine
    times = interleaved({k: e.step for k, e in engines.items()}, reps=steps, warmup=1)
    out = {k: round(1000 * statistics.median(t), 1) for k, t in times.items()}
    for k, v in out.items():
        b = int(k.rsplit(" b", 1)[1])
        print(f"engine decode step, {k}: {v} ms ({b / v * 1000:.1f} tok/s)", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def prompt_tokens(url: str, model: str, chat: bool, prompt: str, headers: dict[str, str]) -> int | None:
    """The prompt length the server reports for the first request (a check that both render the same chat)."""
    body: dict[str, Any] = {"model": model, "max_tokens": 1, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": QUESTIONS[0]}]
    else:
        body["prompt"] = prompt
    r = httpx.post(url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, headers=headers,
                   timeout=120)
    return (r.json().get("usage") or {}).get("prompt_tokens") if r.status_code == 200 else None


def source_state() -> str:
    """The commit byollm ran from, and whether byollm/serve had uncommitted changes (they ran too)."""
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return git("rev-parse", "--short", "HEAD") + (" + uncommitted byollm/serve" if git("status", "--porcelain",
                                                                                       "byollm/serve") else "")


def median_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (server, concurrency): the round with the median output throughput; errors summed over rounds."""
    out = {}
    for key in dict.fromkeys((r["server"], r["concurrency"]) for r in rows):
        mine = sorted((r for r in rows if (r["server"], r["concurrency"]) == key), key=lambda r: r["out_tok_per_s"])
        out[key] = {**mine[len(mine) // 2], **{k: sum(r[k] for r in mine) for k in ("errors", "5xx", "dropped")},
                    "seconds": round(sum(r["seconds"] for r in mine), 2)}
    return out


def paired_ratio(rows: list[dict[str, Any]], a: tuple[str, int], b: tuple[str, int]) -> tuple[float, list[float]]:
    """Median over rounds of tok/s(a) / tok/s(b), each round's pair measured back to back."""
    def of(key: tuple[str, int]) -> list[float]:
        return [r["out_tok_per_s"] for r in rows if (r["server"], r["concurrency"]) == key]

    ratios = sorted(x / y for x, y in zip(of(a), of(b), strict=True) if y)
    return (round(statistics.median(ratios), 2) if ratios else float("nan")), [round(x, 2) for x in ratios]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start each contender's server)")
    ap.add_argument("--model", default=None, help="with --url: model id to send (default: its first /v1/models)")
    ap.add_argument("--real", action="store_true", help=f"the real model {REAL_MODEL} (the `real` extra): chat "
                    "requests, contenders byollm, llama.cpp-orig, llama.cpp-f16, 1/4/16 clients")
    ap.add_argument("--ckpt", help="checkpoint to serve (default: a random --preset model, or --real's)")
    ap.add_argument("--preset", default="llama-tiny")
    ap.add_argument("--contenders", nargs="+", help="byollm, byollm-NAME, llama.cpp-orig, llama.cpp-f16, "
                    "llama.cpp-f32 (default: byollm; with --real: byollm llama.cpp-orig llama.cpp-f16)")
    ap.add_argument("--byollm-variant", action="append", default=[], metavar="NAME=OPTIONS",
                    help="another byollm contender, byollm-NAME, with more `byollm serve` options, e.g. "
                    "int8='--int8 true' (repeatable; add byollm-NAME to --contenders, or it is appended)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], help="default: chat with --real, else completions")
    ap.add_argument("--concurrency", type=int, nargs="+", help="default: 1 4 16 32 (--real: 1 4 16)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per concurrency")
    ap.add_argument("--prompt-words", type=int, default=16, help="completions: prompt length in words (~4 tokens)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the concurrency list; medians per level")
    ap.add_argument("--threads", type=int, default=2, help="threads of every server (OMP_NUM_THREADS, n_threads)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="byollm's running batch")
    ap.add_argument("--serve-args", default="", help="more options for every byollm contender, e.g. '--int8 true'")
    ap.add_argument("--llama-cpp-args", default="", help="more `python -m llama_cpp.server` options")
    ap.add_argument("--llama-cpp-plain-buffers", action="store_true", help="load GGUFs with llama.cpp's plain CPU "
                    "buffers (needed on AMX CPUs, where its repacked buffers segfault on Q4_1)")
    ap.add_argument("--engine-steps", action="store_true", help="first time byollm's engine alone: one decode "
                    "step at batch 1 and at the largest concurrency, default and fast_decode path")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 1 and 4 clients, 2 s, 8 tokens")
    ap.add_argument("--api-key", default=os.environ.get("BYOLLM_API_KEY"), help="Bearer key (default: env "
                    "BYOLLM_API_KEY)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.max_tokens, args.rounds, args.concurrency = 2.0, 8, 1, args.concurrency or [1, 4]
    args.concurrency = args.concurrency or ([1, 4, 16] if args.real else [1, 4, 16, 32])
    args.contenders = args.contenders or (["byollm", "llama.cpp-orig", "llama.cpp-f16"] if args.real else ["byollm"])
    args.contenders += [f"byollm-{v.split('=', 1)[0]}" for v in args.byollm_variant
                        if f"byollm-{v.split('=', 1)[0]}" not in args.contenders]
    chat = (args.endpoint or ("chat" if args.real else "completions")) == "chat"

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    load_before = load_average()
    prompt = prompt_of(args.prompt_words)
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        engine_ms = None
        if args.url:
            contenders = [Contender("server", "byollm", Path(), url=args.url, no_stop={"ignore_eos": True})]
        else:
            if args.ckpt:
                ckpt = Path(args.ckpt)
            elif args.real:
                from byollm.interop.pretrained import packaged_checkpoint

                ckpt = packaged_checkpoint(REAL_MODEL)
            else:
                ckpt = make_checkpoint(args.preset, tmp)
            if args.engine_steps:
                engine_ms = engine_step_ms(ckpt, sorted({1, max(args.concurrency)}), args.threads, steps=16,
                                           variants=engine_variants())
            contenders = contenders_of(args, ckpt, tmp)
            for c in contenders:  # all servers run from here on; only the one under load works
                log = tmp / f"{c.name}.log"
                if c.kind == "byollm":
                    c.url = stack.enter_context(running_server(c.model, c.extra, log, thread_env(args.threads),
                                                               model_name=c.name))
                else:
                    c.url = stack.enter_context(llama_cpp_server(c.model, c.name, args.threads, log, c.extra,
                                                                 args.llama_cpp_plain_buffers))
                print(f"{c.name}: {c.url} serving {c.model}", flush=True)
        models = {c.name: args.model or (httpx.get(c.url + "/v1/models", headers=headers).json()["data"][0]["id"])
                  for c in contenders}
        prompt_lens = {}
        for c in contenders:  # warm-up, and the prompt length each server counts
            asyncio.run(run_level(c.url, models[c.name], 1, 2.0, prompt, 8, headers, chat=chat, extra_body=c.no_stop))
            prompt_lens[c.name] = prompt_tokens(c.url, models[c.name], chat, prompt, headers)
        print(f"prompt tokens of the first request: {prompt_lens}", flush=True)
        rows = []
        for round_ in range(args.rounds):  # rounds alternate the levels and servers, so drifting load hits all
            order = contenders if round_ % 2 == 0 else contenders[::-1]
            for conc in args.concurrency:
                for c in order:
                    row = {"server": c.name, **asyncio.run(run_level(
                        c.url, models[c.name], conc, args.duration, prompt, args.max_tokens, headers, chat=chat,
                        extra_body=c.no_stop))}
                    row["round"], row["load_avg_1m"] = round_, load_average()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        server_5xx = {}
        for c in contenders:
            if c.kind == "byollm":
                metrics = httpx.get(c.url + "/metrics").text
                server_5xx[c.name] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                         if line.startswith("byollm_requests_total{") and 'status="5' in line)
    return report(args, chat, contenders, rows, load_before, prompt_lens, server_5xx,
                  engine_ms)


def report(args: argparse.Namespace, chat: bool, contenders: list[Contender], rows: list[dict[str, Any]],
           load_before: float | None, prompt_lens: dict[str, int | None], server_5xx: dict[str, float],
           engine_ms: dict[str, float] | None) -> int:
    print(table(rows, ["server", "round", "concurrency", "seconds", "completed", "errors", "5xx", "dropped",
                       "req_per_s", "out_tok_per_s", "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median",
                       "itl_ms_median", "itl_ms_p99", "load_avg_1m"]))
    by = median_rows(rows)
    flags = cpu_flags()
    summary: dict[str, Any] = {
        "model": REAL_MODEL if args.real else (args.ckpt or (None if args.url else args.preset)),
        "endpoint": "chat" if chat else "completions",
        "contenders": {c.name: {"kind": c.kind, "model": str(c.model), "options": c.extra} for c in contenders},
        "max_tokens": args.max_tokens, "duration_s": args.duration, "rounds": args.rounds, "threads": args.threads,
        "max_batch_size": args.max_batch_size, "prompt_tokens": prompt_lens, "cpu": cpu_model(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2"))),
        "load_avg_1m_before": load_before, "load_avg_1m_after": load_average(), "cpus": os.cpu_count(),
        "server_5xx_total": server_5xx, "engine_decode_step_ms": engine_ms, "byollm_source": source_state()}
    lines = []
    for (name, conc), r in by.items():
        lines.append({"server": name, "clients": conc, "tok/s": r["out_tok_per_s"], "TTFT p50 ms": r["ttft_ms_median"],
                      "TTFT p99 ms": r["ttft_ms_p99"], "ITL p50 ms": r["itl_ms_median"], "ITL p99 ms": r["itl_ms_p99"],
                      "completed": r["completed"], "errors": r["errors"], "dropped": r["dropped"]})
    print(f"\nmedian of {args.rounds} round(s) per server and concurrency:")
    print(table(lines, list(lines[0])))
    ratios: dict[str, dict[int, Any]] = {}
    ours = [c.name for c in contenders if c.kind == "byollm"]
    peers = [c.name for c in contenders if c.kind == "llama.cpp"]
    for a in ours:
        for b in peers:
            ratios[f"{a} / {b}"] = {conc: paired_ratio(rows, (a, conc), (b, conc)) for conc in args.concurrency}
    if ratios:
        ratio_rows = [{"clients": conc, **{k: v[conc][0] for k, v in ratios.items()}} for conc in args.concurrency]
        print("\noutput tok/s, ours / llama.cpp's server (median over rounds of paired ratios):")
        print(table(ratio_rows, list(ratio_rows[0])))
        top = max(args.concurrency)
        for k, v in ratios.items():
            print(f"{k} at {top} clients: {v[top][0]}x (rounds {v[top][1]}; the target: >= 3x at 16 clients)")
    summary["ratios"] = {k: {str(conc): {"median": m, "rounds": rs} for conc, (m, rs) in v.items()}
                         for k, v in ratios.items()}
    for a in ours:
        if 1 in args.concurrency and 16 in args.concurrency:
            m, rs = paired_ratio(rows, (a, 16), (a, 1))
            summary.setdefault("tok_per_s_16_over_1", {})[a] = {"median": m, "rounds": rs}
            print(f"{a}: output tok/s at 16 concurrent / 1 client: {m}x, the rounds' ratios {rs}")
        if 32 in args.concurrency:
            r = by[(a, 32)]
            print(f"{a}, 32 concurrent for {r['seconds']} s: {r['5xx']} 5xx, {r['dropped']} dropped, {r['errors']} "
                  "errors (target: 0 5xx, 0 dropped over 60 s)")
        if a in server_5xx:
            print(f"{a}: server-side 5xx responses (from /metrics): {server_5xx[a]:.0f}")
    summary["levels"] = {f"{name} x{conc}": {k: r[k] for k in ("out_tok_per_s", "req_per_s", "ttft_ms_median",
                                                               "ttft_ms_p99", "tpot_ms_median", "itl_ms_median",
                                                               "itl_ms_p99", "errors", "5xx", "dropped")}
                         for (name, conc), r in by.items()}
    print(json.dumps({k: summary[k] for k in ("max_tokens", "threads", "prompt_tokens", "load_avg_1m_before",
                                              "load_avg_1m_after", "engine_decode_step_ms")}))
    if args.json:
        write_json(args.json, {"summary": summary, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
