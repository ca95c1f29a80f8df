#!/usr/bin/env python
"""Section 5 project: deploy a chat model: export it for llama.cpp, serve it with an OpenAI-compatible API, query
it with the official `openai` client, load-test it and read its metrics, all on a CPU.

    python projects/section_5_deployment.py --out out/section5-deploy --threads 2     # about a minute
    python projects/section_5_deployment.py --ckpt out/section2-align/runs/sft        # a checkpoint of your own
    python projects/section_5_deployment.py --quick                                   # tiny, under a minute

1. model     the chat model to deploy: --ckpt, by default the section 2 project's SFT model
             (out/section2-align/runs/sft) when it exists, else a small Llama-style model trained here for a few
             seconds (the chat tokens added to its tokenizer)
2. gguf      `byollm export gguf` (f32); llama-cpp-python loads the file and its greedy tokens are compared with
             our engine's (byollm.serve.engine.Engine), token for token
3. serve     `byollm serve` in a subprocess on a free port of 127.0.0.1, with an API key file (a fresh random key)
4. client    the official `openai` client: a completion, the same chat non-streamed and streamed (greedy: the same
             text), a wrong key (401) and a prompt longer than the context (400)
5. load      streaming clients at concurrency 1 and 8 for a few seconds each (benchmarks/bench_serve.py's clients)
6. metrics   /metrics scraped: the time-to-first-token histogram's count and sum, request counters by status;
             then SIGINT: the server finishes what it runs and exits

OUT/report.json holds every number; the checks are printed (exit 0 either way: a missed target is a finding).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_serve import prompt_of, run_level, running_server  # noqa: E402 - the load-test clients, reused

from byollm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from byollm.errors import require  # noqa: E402
from byollm.interop.gguf import export_checkpoint_to_gguf  # noqa: E402
from byollm.model import GPT, preset  # noqa: E402
from byollm.sampling import SamplingParams  # noqa: E402
from byollm.serve.engine import Engine  # noqa: E402
from byollm.tokenizer import train_bpe_fast  # noqa: E402
from byollm.tokenizer.chat_template import add_chat_tokens  # noqa: E402

SECTION_2_SFT = Path("out") / "section2-align" / "runs" / "sft"  # where the section 2 project leaves its chat model
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Give me three tips for staying healthy."}]
COMPLETION_PROMPT = "First Citizen:\nBefore we proceed any further, hear me"


@dataclasses.dataclass
class Sizes:
    """Everything --quick shrinks."""

    train_steps: int = 200  # of the stand-in model, when there is no section 2 checkpoint
    parity_tokens: int = 32
    answer_tokens: int = 48
    load_seconds: float = 15.0
    load_tokens: int = 32


SMALL = Sizes(train_steps=100, parity_tokens=16, answer_tokens=16, load_seconds=2.0, load_tokens=8)


def training_text() -> str:
    """Tiny Shakespeare from the data mirror when it is there; else text every Python has (pydoc's topics)."""
    mirror = Path(os.environ.get("BYOLLM_DATA_MIRROR", ROOT.parent / "shared" / "data")) / "tinyshakespeare.txt"
    if mirror.is_file():
        return mirror.read_text(encoding="utf-8")[:40_000]
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:40_000]


def train_stand_in(directory: Path, steps: int) -> Path:
    """A llama-tiny model with a 512-id BPE tokenizer (plus the chat tokens), trained for `steps` steps so that its
    greedy continuations are confident (a random model's near-ties could flip between two runtimes)."""
    text = training_text()
    tok = train_bpe_fast(text, vocab_size=512)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, block_size=256))
    data = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(model.eval(), directory, tok)


def gguf_parity(ckpt: Path, out: Path, s: Sizes) -> dict[str, Any]:
    """Export f32 GGUF; greedy tokens of llama.cpp vs our engine on the same prompt ids."""
    llama_cpp = require("llama_cpp", "llama-cpp-python")
    t0 = time.perf_counter()
    path = export_checkpoint_to_gguf(ckpt, out / "model-f32.gguf", dtype="f32")
    export_s = time.perf_counter() - t0
    loaded = load_checkpoint(ckpt)
    prompt = loaded.tokenizer.encode(COMPLETION_PROMPT)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=1)
    ours = engine.generate([prompt], SamplingParams(max_new_tokens=s.parity_tokens, temperature=0,
                                                    stop_token_ids=()))[0]
    # An f32 KV cache (type 0): llama.cpp's default f16 cache rounds the keys and values.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=loaded.model.config.block_size, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    theirs: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(int(token))
        if len(theirs) == s.parity_tokens:
            break
    return {"path": str(path), "bytes": path.stat().st_size, "export_s": round(export_s, 2), "prompt": prompt,
            "ours": ours, "llama_cpp": theirs, "match": ours == theirs,
            "text": loaded.tokenizer.decode(ours), "block_size": loaded.model.config.block_size}


def query(url: str, key: str, model: str, block_size: int, s: Sizes) -> dict[str, Any]:
    """The official client: a completion, a chat (non-streamed and streamed), a wrong key, an over-long prompt."""
    openai = require("openai", "openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
    r: dict[str, Any] = {"models": [m.id for m in client.models.list()]}
    completion = client.completions.create(model=model, prompt=COMPLETION_PROMPT, max_tokens=s.answer_tokens,
                                           temperature=0)
    r["completion"] = {"text": completion.choices[0].text, "finish_reason": completion.choices[0].finish_reason,
                       "usage": completion.usage.model_dump()}
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=s.answer_tokens, temperature=0)
    r["chat"] = {"text": chat.choices[0].message.content, "finish_reason": chat.choices[0].finish_reason,
                 "usage": chat.usage.model_dump()}
    pieces = []
    t0 = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=s.answer_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
    r["stream"] = {"chunks": len(pieces), "text": "".join(pieces), "ttft_ms": round(1000 * (first or 0), 1),
                   "same_as_non_streamed": "".join(pieces) == chat.choices[0].message.content}
    try:
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong-key-0000", max_retries=0).completions.create(
            model=model, prompt="hi", max_tokens=1)
        r["wrong_key"] = {"status": 200}
    except openai.APIStatusError as e:
        r["wrong_key"] = {"status": e.status_code, "message": e.message}
    too_long = " ".join(["word"] * (2 * block_size))
    try:
        client.completions.create(model=model, prompt=too_long, max_tokens=4)
        r["too_long"] = {"status": 200}
    except openai.APIStatusError as e:
        r["too_long"] = {"status": e.status_code, "code": e.code, "message": e.message}
    return r


def load_test(url: str, key: str, model: str, s: Sizes) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    prompt = prompt_of(16)
    asyncio.run(run_level(url, model, 1, 1.0, prompt, 4, headers))  # warm-up
    return [asyncio.run(run_level(url, model, c, s.load_seconds, prompt, s.load_tokens, headers)) for c in (1, 8)]


def scrape(url: str) -> dict[str, Any]:
    """The numbers of /metrics (Prometheus text format) that the guide reads."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    requests = {name: v for name, v in values.items() if name.startswith("byollm_requests_total{")}
    by_status: dict[str, float] = {}
    for name, v in requests.items():
        status = re.search(r'status="(\d+)"', name)
        if status:
            by_status[status.group(1)] = by_status.get(status.group(1), 0) + v
    return {"ttft_count": values.get("byollm_time_to_first_token_seconds_count", 0),
            "ttft_sum_s": round(values.get("byollm_time_to_first_token_seconds_sum", 0), 3),
            "completion_tokens": values.get("byollm_completion_tokens_total", 0),
            "prompt_tokens": values.get("byollm_prompt_tokens_total", 0),
            "requests_by_status": by_status, "requests": requests,
            "finished": {k: v for k, v in values.items() if k.startswith("byollm_requests_finished_total{")}}


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (under a minute; the tests)")
    parser.add_argument("--small", dest="quick", action="store_true", help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--ckpt", type=Path, default=None, help="the chat checkpoint to deploy (default: the section "
                        "2 project's SFT model when it exists, else a small model trained here)")
    parser.add_argument("--out", type=Path, default=Path("out/section5-deploy"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in the server")
    args = parser.parse_args(argv)
    s = SMALL if args.quick else Sizes()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"quick": args.quick}
    t_start = time.perf_counter()

    print("== 1. Model", flush=True)
    ckpt = args.ckpt
    if ckpt is None and not args.quick and (SECTION_2_SFT / "checkpoints").is_dir():
        ckpt = SECTION_2_SFT
    if ckpt is None:
        t0 = time.perf_counter()
        ckpt = train_stand_in(args.out / "model", s.train_steps)
        print(f"trained a llama-tiny stand-in for {s.train_steps} steps in {time.perf_counter() - t0:.1f} s: {ckpt}")
    loaded = load_checkpoint(ckpt)
    model_name = "byollm"
    report["model"] = {"ckpt": str(ckpt), "describe": loaded.describe(), "block_size": loaded.model.config.block_size}
    print(f"{ckpt}: {loaded.describe()}")
    del loaded

    print("\n== 2. GGUF for llama.cpp (f32) vs our engine, greedy", flush=True)
    g = report["gguf"] = gguf_parity(ckpt, args.out, s)
    print(f"wrote {g['path']} ({g['bytes'] / 1e6:.1f} MB) in {g['export_s']} s")
    print(f"ours:      {g['ours']}\nllama.cpp: {g['llama_cpp']}\n-> {'the same' if g['match'] else 'DIFFERENT'} "
          f"({len(g['ours'])} tokens): {g['text']!r}")

    print("\n== 3. byollm serve (127.0.0.1, an API key file)", flush=True)
    key = "sk-" + secrets.token_urlsafe(24)
    keys_file = args.out / "api_keys.txt"
    keys_file.write_text(f"# one key a line\n{key}\n")
    keys_file.chmod(0o600)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    log_path = args.out / "server.log"
    serve_args = ["--api_keys_file", str(keys_file), "--model_name", model_name, "--max_batch_size", "8",
                  "--max_waiting", "64", "--default_max_tokens", str(s.answer_tokens)]
    with running_server(ckpt.resolve(), serve_args, log_path, env) as url:
        print(f"serving on {url} (log: {log_path})")
        print("\n== 4. The openai client", flush=True)
        q = report["client"] = query(url, key, model_name, report["model"]["block_size"], s)
        print(f"/v1/models: {q['models']}")
        print(f"completion ({q['completion']['finish_reason']}, {q['completion']['usage']['completion_tokens']} "
              f"tokens): {COMPLETION_PROMPT!r} -> {q['completion']['text']!r}")
        print(f"chat ({q['chat']['finish_reason']}): {q['chat']['text']!r}")
        print(f"streamed: {q['stream']['chunks']} chunks, first after {q['stream']['ttft_ms']} ms, same text: "
              f"{q['stream']['same_as_non_streamed']}")
        print(f"wrong key -> {q['wrong_key']['status']}: {q['wrong_key'].get('message')}")
        print(f"prompt of {2 * report['model']['block_size']} words -> {q['too_long']['status']} "
              f"({q['too_long'].get('code')})")

        print(f"\n== 5. Load test: streaming clients, {s.load_tokens} tokens a request, {s.load_seconds} s a level",
              flush=True)
        levels = report["load"] = load_test(url, key, model_name, s)
        cols = ["concurrency", "completed", "errors", "5xx", "dropped", "req_per_s", "out_tok_per_s",
                "ttft_ms_median", "tpot_ms_median", "itl_ms_p99"]
        print(table([cols] + [[str(r[c]) for c in cols] for r in levels]))
        ratio = levels[1]["out_tok_per_s"] / levels[0]["out_tok_per_s"] if levels[0]["out_tok_per_s"] else 0.0
        report["tok_per_s_8_over_1"] = round(ratio, 2)
        report["load_avg_1m"] = round(os.getloadavg()[0], 2)
        print(f"output tok/s, 8 clients / 1 client: {ratio:.2f}x (1-minute load average {report['load_avg_1m']})")

        print("\n== 6. /metrics", flush=True)
        m = report["metrics"] = scrape(url)
        mean = m["ttft_sum_s"] / m["ttft_count"] if m["ttft_count"] else 0.0
        print(f"byollm_time_to_first_token_seconds: count {m['ttft_count']:.0f}, sum {m['ttft_sum_s']} s "
              f"(mean {1000 * mean:.1f} ms)")
        print(f"byollm_completion_tokens_total {m['completion_tokens']:.0f}, byollm_prompt_tokens_total "
              f"{m['prompt_tokens']:.0f}")
        print("byollm_requests_total by status: " + ", ".join(f"{k}: {v:.0f}" for k, v in
                                                               sorted(m["requests_by_status"].items())))
        print("shutting down (SIGINT: running requests finish, then the server exits)")
    server_log = log_path.read_text()
    report["server_log_has_key"] = key in server_log
    report["server_log_has_prompt"] = "tips for staying" in server_log  # a word of the chat prompt (log_prompts is off)

    checks = {
        "gguf greedy tokens == our engine's": g["match"],
        "stream text == non-stream text (greedy)": q["stream"]["same_as_non_streamed"] and bool(q["chat"]["text"]),
        "wrong key -> 401": q["wrong_key"]["status"] == 401,
        "over-long prompt -> 400": q["too_long"]["status"] == 400,
        "load test: no errors, none dropped": all(r["errors"] == 0 and r["dropped"] == 0 and r["completed"] > 0
                                                  for r in levels),
        "metrics: TTFT observed, 200s counted": m["ttft_count"] > 0 and m["requests_by_status"].get("200", 0) > 0,
        "metrics: the 401 and the 400 counted": m["requests_by_status"].get("401", 0) > 0
        and m["requests_by_status"].get("400", 0) > 0,
        "no 5xx": not any(k.startswith("5") for k in m["requests_by_status"]),
        "neither the key nor the prompt in the server log": not report["server_log_has_key"]
        and not report["server_log_has_prompt"],
    }
    report["checks"] = checks
    report["failed"] = [name for name, ok in checks.items() if not ok]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print("\n== Results")
    rows = [["check", "result"]] + [[name, "ok" if ok else "FAILED"] for name, ok in checks.items()]
    print(table(rows))
    met = sum(checks.values())
    print(f"{met}/{len(checks)} checks met in {report['seconds']} s; report: {args.out / 'report.json'}")
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
