"""Load test of `byollm serve`: streaming clients at several concurrencies, as vLLM's serving benchmark does.

Starts `byollm serve` on a random model of a small preset on 127.0.0.1 (or uses a running server with --url),
then for each concurrency C runs C asyncio clients for --duration seconds, each sending streaming
/v1/completions requests back to back (a fixed prompt length, `ignore_eos` so every request produces exactly
--max-tokens tokens), and reports per concurrency:

    TTFT    time to first token: request sent -> first chunk with text (median, p99)
    TPOT    time per output token, vLLM's definition: (e2e latency - TTFT) / (output tokens - 1) (median, p99)
    ITL     inter-token latency: time between consecutive chunks (median, p99)
    req/s   completed requests per second; tok/s output tokens per second (over the whole window, the last
            requests included)
    errors  failed requests (any non-200, a connection error), of which 5xx; dropped: a 200 stream that did not
            end with `data: [DONE]` or gave fewer tokens than asked

Targets (issue 7): output tok/s at 16 concurrent >= 4x the single client; zero 5xx and zero dropped at 32
concurrent for 60 s.

    .venv/bin/python benchmarks/bench_serve.py                              # llama-tiny, 1/4/16/32 x 20 s
    .venv/bin/python benchmarks/bench_serve.py --concurrency 1 16 --rounds 3 --duration 10   # the 16/1 ratio
    .venv/bin/python benchmarks/bench_serve.py --concurrency 32 --duration 60   # the 60 s soak
    .venv/bin/python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model NAME   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly mix bread flour water salt "
         "and yeast then knead it let it rise and bake").split()


# --------------------------------------------------------------------------------------------------
# The server
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(ckpt: Path, extra: list[str], log_path: Path, env: dict[str, str] | None = None):
    """`byollm serve CKPT` in a subprocess on a free port; yields its base URL; SIGINT (graceful) at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "byollm.cli", "serve", str(ckpt), "--port", str(port), *extra]
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"byollm serve exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"byollm serve did not become healthy in 120 s; see {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], expected_tokens: int) -> Result:
    """One streaming request. The client must stay light (it shares the CPU with the server): events are
    found by their bytes, and only the last one (usage) is parsed as JSON."""
    start = time.perf_counter()
    ttft, last, itl, done, tokens, usage, buffer = 0.0, start, [], False, 0, None, b""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(False, response.status_code, error=response.text[:200])
            async for data in response.aiter_raw():
                now = time.perf_counter()
                *events, buffer = (buffer + data).split(b"\n\n")
                texts = 0
                for event in events:
                    if event == b"data: [DONE]":
                        done = True
                    elif b'"usage":{' in event:
                        usage = json.loads(event[6:])["usage"]
                    elif event.startswith(b"data: ") and b'"text":""' not in event:
                        texts += 1
                if texts:  # several events in one read: the latency spreads over them
                    if ttft == 0.0:
                        ttft = now - start
                        itl += [0.0] * (texts - 1)
                    else:
                        itl += [(now - last) / texts] * texts
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(False, 0, error=f"{type(e).__name__}: {e}"[:200])
    e2e = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else 0
    dropped = not done or tokens != expected_tokens
    return Result(not dropped, 200, ttft, e2e, tokens, itl, dropped)


async def run_level(url: str, model: str, concurrency: int, duration: float, prompt: str, max_tokens: int,
                    headers: dict[str, str]) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits,
                                 headers=headers) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                results.append(await one_request(client, body, max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1]
    itl = [x for r in good for x in r.itl]
    out_tokens = sum(r.tokens for r in good)

    def ms(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 2)

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


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["round", "concurrency", "seconds", "completed", "errors", "5xx", "dropped", "req_per_s", "out_tok_per_s",
            "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median", "tpot_ms_p99", "itl_ms_median", "itl_ms_p99"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `byollm serve` on a random model)")
    ap.add_argument("--model", default=None, help="model id to send (default: the server's first /v1/models)")
    ap.add_argument("--ckpt", help="checkpoint to serve (default: a random --preset model)")
    ap.add_argument("--preset", default="llama-tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per concurrency")
    ap.add_argument("--prompt-words", type=int, default=16, help="prompt length in words (~4 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the concurrency list; medians per level")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the server's running batch")
    ap.add_argument("--serve-args", default="", help="more `byollm serve` options, e.g. '--int8 true'")
    ap.add_argument("--api-key", default=os.environ.get("BYOLLM_API_KEY"), help="Bearer key (default: env "
                    "BYOLLM_API_KEY)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, nullcontext(args.url) if args.url else \
            running_server(Path(args.ckpt) if args.ckpt else make_checkpoint(args.preset, Path(tmp)),
                           ["--max_batch_size", str(args.max_batch_size), "--max_waiting", "256",
                            *args.serve_args.split()], Path(tmp) / "server.log") as url:
        model = args.model or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        prompt = prompt_of(args.prompt_words)
        asyncio.run(run_level(url, model, 1, 2.0, prompt, 8, headers))  # warm-up
        rows = []
        for round_ in range(args.rounds):  # rounds alternate the levels, so drifting machine load hits all
            for c in args.concurrency:
                row = asyncio.run(run_level(url, model, c, args.duration, prompt, args.max_tokens, headers))
                row["round"], row["load_avg_1m"] = round_, round(os.getloadavg()[0], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        metrics = httpx.get(url + "/metrics").text
    print(table(rows))
    # per concurrency: the round with the median output throughput; errors summed over rounds
    by_c = {}
    for c in args.concurrency:
        mine = sorted((r for r in rows if r["concurrency"] == c), key=lambda r: r["out_tok_per_s"])
        by_c[c] = {**mine[len(mine) // 2], **{k: sum(r[k] for r in mine) for k in ("errors", "5xx", "dropped")},
                   "seconds": round(sum(r["seconds"] for r in mine), 2)}
    summary: dict[str, Any] = {"preset": None if args.url or args.ckpt else args.preset,
                               "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
                               "duration_s": args.duration, "rounds": args.rounds,
                               "max_batch_size": args.max_batch_size,
                               "load_avg_1m_before": round(load_before, 2), "cpus": os.cpu_count()}
    if 1 in by_c and 16 in by_c and by_c[1]["out_tok_per_s"]:
        # paired by round (each round runs both levels back to back, under the same machine load)
        ratios = sorted(r16["out_tok_per_s"] / r1["out_tok_per_s"] for r1, r16 in
                        zip([r for r in rows if r["concurrency"] == 1], [r for r in rows if r["concurrency"] == 16],
                            strict=True) if r1["out_tok_per_s"])
        summary["tok_per_s_16_over_1"] = round(statistics.median(ratios), 2)
        summary["tok_per_s_16_over_1_rounds"] = [round(x, 2) for x in ratios]
        print(f"output tok/s at 16 concurrent / 1 client: {summary['tok_per_s_16_over_1']}x, median of the rounds' "
              f"ratios {summary['tok_per_s_16_over_1_rounds']} (target >= 4x)")
    if 32 in by_c:
        r = by_c[32]
        print(f"32 concurrent for {r['seconds']} s: {r['5xx']} 5xx, {r['dropped']} dropped, {r['errors']} errors "
              "(target: 0 5xx, 0 dropped over 60 s)")
    server_5xx = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("byollm_requests_total{") and 'status="5' in line)
    summary["server_5xx_total"] = server_5xx
    print(f"server-side 5xx responses (from /metrics): {server_5xx:.0f}")
    print(json.dumps(summary))
    summary["levels"] = {c: {k: r[k] for k in ("out_tok_per_s", "req_per_s", "ttft_ms_median", "tpot_ms_median",
                                               "errors", "5xx", "dropped")} for c, r in by_c.items()}
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
