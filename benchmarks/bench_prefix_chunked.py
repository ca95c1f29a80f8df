"""Prefix caching and chunked prefill in the serving engine, on the real SmolLM2-135M-Instruct (fp32, CPU).

    python benchmarks/bench_prefix_chunked.py                  # ~3-5 minutes on 2 cores
    python benchmarks/bench_prefix_chunked.py --quick          # smoke run: a random llama-tiny, a few seconds
    python benchmarks/bench_prefix_chunked.py --reps 5 --out prefix_chunked.json
    python benchmarks/bench_prefix_chunked.py --parts chunked --chunk 64 --reps 1   # another chunk size

(a) Prefix caching. 8 requests with one ~400-token system prompt and a different short question each, all
    submitted at once, max_new_tokens=1: the time until every request has its first token (what prefill costs
    them), with prefix caching on and off, in a fresh engine each time (no prefix cached before). With the cache
    the first request computes the system prompt and the other 7 copy it (one tensor copy per layer) and compute
    their question only. Also: the same 8 one after another (a chat server seeing one system prompt again and
    again), where each request reuses the row the previous one left. The first tokens must be the same.
(b) Chunked prefill. 4 streams decode (short prompts, --stream-tokens tokens each); after --arrive-after steps a
    2,000-token prompt arrives. Inter-token latency (the gaps between consecutive tokens of each of the 4
    streams, the whole run) p50 / p99 / max, and the long prompt's time to first token, with
    prefill_chunk_tokens=256 against whole-prompt prefill. All 5 requests must get the same tokens either way.

Timing alternates the two settings (A B, B A, ...) so that a slow spell of a shared machine hits both alike;
medians over --reps. The prompts are real text (CPython's pydoc topics, present wherever Python is).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported from the tests
sys.path.append(str(Path(__file__).resolve().parents[1]))  # byollm from this checkout when it is not installed

from common import load_average, machine_info, median, table, warn_if_busy, write_json  # noqa: E402

from byollm.sampling import SamplingParams  # noqa: E402
from byollm.serve.engine import Engine  # noqa: E402

REAL = "smollm2-135m-instruct"


def text_tokens(encode: Any, n: int, offset: int = 0) -> list[int]:
    """`n` token ids of real English text (pydoc topics), from the `offset`-th topic on."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[offset:])
    ids = encode(text[:n * 8])
    assert len(ids) >= n, "not enough text"
    return ids[:n]


def load(quick: bool) -> tuple[torch.nn.Module, Any]:
    if quick:
        from byollm.model import GPT, preset

        torch.manual_seed(0)
        model = GPT(preset("llama-tiny", vocab_size=256, block_size=2048, init_std=0.2)).eval()
        return model, lambda s: [b for b in s.encode("utf-8")]
    from byollm.checkpoint import load_checkpoint
    from byollm.interop.pretrained import packaged_checkpoint

    loaded = load_checkpoint(packaged_checkpoint(REAL))
    return loaded.model.eval(), loaded.tokenizer.encode


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


# --------------------------------------------------------------------------------------------------
# (a) prefix caching
# --------------------------------------------------------------------------------------------------


def prefix_run(model: torch.nn.Module, prompts: list[list[int]], caching: bool, together: bool) -> dict[str, Any]:
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=max(map(len, prompts)) + 8,
                    prefix_caching=caching, prefill_chunk_tokens=None)
    first = SamplingParams(max_new_tokens=1, temperature=0, stop_token_ids=())
    start = time.perf_counter()
    if together:
        tokens = engine.generate(prompts, first)
    else:
        tokens = [engine.generate([p], first)[0] for p in prompts]
    seconds = time.perf_counter() - start
    stats = engine.prefill_stats
    return {"seconds": seconds, "tokens": tokens, "computed": stats.computed_tokens, "hits": stats.prefix_hits}


def bench_prefix(model: torch.nn.Module, encode: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    system = text_tokens(encode, args.system_tokens)
    questions = [text_tokens(encode, args.question_tokens, offset=10 + 7 * i) for i in range(args.requests)]
    prompts = [system + q for q in questions]
    rows = []
    for together in (True, False):
        runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        prefix_run(model, prompts[:2], True, together)  # warm-up
        for rep in range(args.reps):
            for caching in ((True, False) if rep % 2 == 0 else (False, True)):
                runs[caching].append(prefix_run(model, prompts, caching, together))
        on, off = (median([r["seconds"] for r in runs[c]]) for c in (True, False))
        rows.append({"case": f"{args.requests} requests {'at once' if together else 'one after another'}",
                     "prompt_tokens": sum(map(len, prompts)),
                     "computed_on": runs[True][0]["computed"], "computed_off": runs[False][0]["computed"],
                     "hits_on": runs[True][0]["hits"], "prefill_s_on": on, "prefill_s_off": off,
                     "speedup": off / on, "same_tokens": runs[True][0]["tokens"] == runs[False][0]["tokens"]})
    return rows


# --------------------------------------------------------------------------------------------------
# (b) chunked prefill
# --------------------------------------------------------------------------------------------------


def chunked_run(model: torch.nn.Module, streams: list[list[int]], long: list[int], chunk: int | None,
                args: argparse.Namespace) -> dict[str, Any]:
    engine = Engine(model, max_batch_size=len(streams) + 1, max_seq_len=len(long) + args.long_tokens + 8,
                    prefill_chunk_tokens=chunk)
    params = SamplingParams(max_new_tokens=args.stream_tokens, temperature=0, stop_token_ids=())
    ids = [engine.add_request(p, params) for p in streams]
    arrived_at, long_id, step = None, None, 0
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_work() or long_id is None:
        if step == args.arrive_after:
            long_id = engine.add_request(long, SamplingParams(max_new_tokens=args.long_tokens, temperature=0,
                                                               stop_token_ids=()))
            arrived_at = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            times.setdefault(out.request_id, []).append(now)
            tokens.setdefault(out.request_id, []).append(out.token_id)
        step += 1
    gaps = [b - a for i in ids for a, b in zip(times[i], times[i][1:], strict=False)]
    return {"gaps": gaps, "ttft_long": times[long_id][0] - arrived_at, "tokens": [tokens[i] for i in ids + [long_id]]}


def bench_chunked(model: torch.nn.Module, encode: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    streams = [text_tokens(encode, 32, offset=40 + 5 * i) for i in range(4)]
    long = text_tokens(encode, args.long_prompt, offset=3)
    settings = {f"chunked ({args.chunk})": args.chunk, "whole prompt": None}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for rep in range(args.reps):
        for name in (list(settings) if rep % 2 == 0 else list(settings)[::-1]):
            runs[name].append(chunked_run(model, streams, long, settings[name], args))
    rows = []
    for name, rs in runs.items():
        p50 = median([statistics.median(r["gaps"]) for r in rs])
        p99 = median([percentile(r["gaps"], 99) for r in rs])
        rows.append({"prefill": name, "itl_p50_ms": 1000 * p50, "itl_p99_ms": 1000 * p99,
                     "itl_max_ms": 1000 * median([max(r["gaps"]) for r in rs]),
                     "long_ttft_s": median([r["ttft_long"] for r in rs]),
                     "same_tokens": rs[0]["tokens"] == runs["whole prompt"][0]["tokens"]})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on a random llama-tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=400)
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--long-prompt", type=int, default=2000)
    parser.add_argument("--long-tokens", type=int, default=4, help="tokens the long request generates")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens each of the 4 streams generates")
    parser.add_argument("--arrive-after", type=int, default=8, help="decode steps before the long prompt arrives")
    parser.add_argument("--chunk", type=int, default=256, help="prefill_chunk_tokens of the chunked engine")
    parser.add_argument("--parts", nargs="+", choices=["prefix", "chunked"], default=["prefix", "chunked"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.stream_tokens, args.long_prompt, args.system_tokens = 1, 16, 400, 100
    torch.set_num_threads(args.threads)
    warn_if_busy(args.threads)
    model, encode = load(args.quick)
    results: dict[str, Any] = {"machine": machine_info(), "model": "llama-tiny (random)" if args.quick else REAL,
                               "args": vars(args)}
    with torch.inference_mode():
        if "prefix" in args.parts:
            results["prefix_caching"] = bench_prefix(model, encode, args)
            print(table(results["prefix_caching"]))
        if "chunked" in args.parts:
            results["chunked_prefill"] = bench_chunked(model, encode, args)
            print(table(results["chunked_prefill"]))
    results["load_average_1min_at_end"] = load_average()
    print(f"load average (1 min): {results['machine']['load_average_1min_at_start']} at start, "
          f"{results['load_average_1min_at_end']} at end")
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
