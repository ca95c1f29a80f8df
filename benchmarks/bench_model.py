"""Model speed on the CPU: our GPT against transformers, what torch.compile adds, and naive vs SDPA attention.

    python benchmarks/bench_model.py                 # everything, ~5 minutes on 2 cores
    python benchmarks/bench_model.py --quick         # smoke run, ~1 minute
    python benchmarks/bench_model.py --sections train --presets llama-13m --batch 8 --seq 128 --out r.json

Three sections, each measured in one process with the contenders interleaved step by step (a shared
machine's noise hits both alike), reported as medians and ratios:

  train      a training step (forward, cross-entropy over the vocabulary, backward; no optimizer step, for
             either side) of our model and of the transformers model with the same weights
             (`byollm.interop.hf.to_hf_model`), fp32 eager, transformers' default attention (sdpa).
  compile    our model eager vs `torch.compile`d, fp32 and bf16 autocast; tokens/s and MFU against a
             matmul peak measured in the same run, fp32 and bf16. Compile time is reported, not counted.
  attention  the explicit softmax(QK^T/sqrt(D))V against F.scaled_dot_product_attention: the function
             alone (forward, forward+backward) and a whole-model forward, over sequence lengths.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

import common
import torch
import torch.nn.functional as F
from common import (
    DTYPES,
    interleaved,
    load_average,
    machine_info,
    matmul_peak,
    median,
    reps_for,
    table,
    warn_if_busy,
    write_json,
)

from byollm.model import GPT, preset
from byollm.model.model import naive_attention

# Batch x sequence length per preset for the training sections: big enough to keep the matmuls busy,
# small enough that the 124M-135M models take a few seconds a step on 2 cores.
DEFAULT_SHAPES = {
    "gpt-nano": (16, 64), "llama-nano": (16, 64),
    "gpt2-d6": (2, 256), "llama-13m": (4, 256),
    "gpt2-124m": (1, 256), "smollm2-135m": (1, 256),
}
FULL = dict(presets=list(DEFAULT_SHAPES), compile_presets=["llama-nano"], attn_seqs=[64, 256, 1024], steps=5,
            budget=5.0)
QUICK = dict(presets=["gpt-nano", "llama-nano", "llama-13m"], compile_presets=["llama-nano"], attn_seqs=[64, 256],
             steps=3, budget=1.5)
QUICK_SHAPES = {"gpt-nano": (8, 64), "llama-nano": (8, 64), "llama-13m": (2, 128)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=["train", "compile", "attention"],
                   help="default: all three (without compile under --quick or --no-compile)")
    p.add_argument("--presets", nargs="+", help=f"for the train section (default: {' '.join(FULL['presets'])})")
    p.add_argument("--batch", type=int, help="batch size for train/compile (default: per preset, see DEFAULT_SHAPES)")
    p.add_argument("--seq", type=int, help="sequence length for train/compile (default: per preset)")
    p.add_argument("--steps", type=int, help="fewest timed steps per contender (default 5; --quick 3)")
    p.add_argument("--budget", type=float, help="seconds of timed steps per contender and preset: small models get "
                   "more than --steps steps, up to 100 (default 5; --quick 1.5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="'cpu' times CPU seconds of the process: with --threads 1, steady on a busy machine")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the compile section (default: yes, except with --quick)")
    p.add_argument("--cold-compile", action="store_true",
                   help="compile into a fresh Inductor cache, so compile time is a first-ever compile's")
    p.add_argument("--compile-presets", nargs="+", help="presets for the compile section (default: llama-nano)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                   help="precisions of the compile section (bf16 = autocast); the train section is fp32")
    p.add_argument("--hf-attn", default=None, help="transformers attn_implementation (default: its own, sdpa)")
    p.add_argument("--attn-seqs", nargs="+", type=int, help="sequence lengths for the attention section")
    p.add_argument("--attn-shape", nargs=3, type=int, default=[2, 8, 64], metavar=("BATCH", "HEADS", "HEAD_DIM"),
                   help="q/k/v shape for timing the attention function alone")
    p.add_argument("--attn-model", default="llama-13m", help="preset for the whole-model forward (batch 1)")
    p.add_argument("--quick", action="store_true", help="small presets, few steps, no compile: ~1 minute")
    p.add_argument("--out", help="write all results (with every step time) to this JSON file")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.presets = args.presets or mode["presets"]
    args.compile_presets = args.compile_presets or mode["compile_presets"]
    args.attn_seqs = args.attn_seqs or mode["attn_seqs"]
    args.steps = args.steps or mode["steps"]
    args.budget = args.budget if args.budget is not None else mode["budget"]
    if args.sections is None:
        compile_on = args.compile if args.compile is not None else not args.quick
        args.sections = ["train", "compile", "attention"] if compile_on else ["train", "attention"]
    elif args.compile is False and "compile" in args.sections:
        args.sections.remove("compile")
    return args


def shape_for(name: str, args: argparse.Namespace, block_size: int) -> tuple[int, int]:
    batch, seq = (QUICK_SHAPES if args.quick else DEFAULT_SHAPES).get(name, (4, 256))
    return args.batch or batch, min(args.seq or seq, block_size)


def random_batch(vocab_size: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab_size, (batch, seq), generator=g),
            torch.randint(0, vocab_size, (batch, seq), generator=g))


def train_step_fn(model: Any, x: torch.Tensor, y: torch.Tensor, *, hf: bool = False,
                  autocast: torch.dtype | None = None):
    """One training step without the optimizer: zero grads, forward, mean cross-entropy over all B*T
    positions (fp32 logits), backward. The same work for both models; transformers computes no loss itself
    (its `labels` would shift and drop a position) and keeps no KV cache (`use_cache=False`)."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
            if hf:
                logits = model(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = model(x, y).loss
        loss.backward()
        return loss.detach()

    return step


# --------------------------------------------------------------------------------------------------
# 1. ours vs transformers, training step, fp32 eager
# --------------------------------------------------------------------------------------------------


def bench_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        from byollm.interop.hf import to_hf_model
    except ImportError as e:
        print(f"train section skipped: the transformers peer needs byollm.interop.hf ({e})")
        return []
    rows = []
    for name in args.presets:
        config = preset(name)
        batch, seq = shape_for(name, args, config.block_size)
        torch.manual_seed(0)
        ours = GPT(config).train()
        theirs = to_hf_model(ours).train()  # the same weights
        if args.hf_attn:
            theirs.set_attn_implementation(args.hf_attn)
        x, y = random_batch(config.vocab_size, batch, seq)
        ours_step, hf_step = train_step_fn(ours, x, y), train_step_fn(theirs, x, y, hf=True)
        loss_diff = abs(ours_step().item() - hf_step().item())  # same weights and data: the same loss
        reps = reps_for(hf_step, args.budget, lo=args.steps, hi=100)
        times = interleaved({"ours": ours_step, "hf": hf_step}, reps, args.warmup)
        tokens = batch * seq
        ours_tps, hf_tps = tokens / median(times["ours"]), tokens / median(times["hf"])
        flops = ours.flops_per_token(seq)
        row = {
            "preset": name, "params_M": ours.num_params() / 1e6, "batch x seq": f"{batch}x{seq}",
            "ours tok/s": ours_tps, "HF tok/s": hf_tps, "ours/HF": ours_tps / hf_tps,
            "ours/HF best": min(times["hf"]) / min(times["ours"]), "|loss diff|": f"{loss_diff:.1e}",
            "hf_attn_implementation": theirs.config._attn_implementation,
            "flops_per_token": flops, "times_s": times,
        }
        rows.append(row)
        print(f"  {name}: ours {ours_tps:,.0f} tok/s, HF {hf_tps:,.0f} tok/s, ratio {ours_tps / hf_tps:.2f}",
              flush=True)
        del ours, theirs
    return rows


# --------------------------------------------------------------------------------------------------
# 2. torch.compile, fp32 and bf16 autocast
# --------------------------------------------------------------------------------------------------


def bench_compile(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.compile_presets:
        config = preset(name)
        batch, seq = shape_for(name, args, config.block_size)
        torch.manual_seed(0)
        model = GPT(config).train()
        x, y = random_batch(config.vocab_size, batch, seq)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        contenders, compile_s, errors = {}, {}, {}
        for dt in args.dtype:
            autocast = None if dt == "fp32" else DTYPES[dt]
            contenders[f"eager {dt}"] = train_step_fn(model, x, y, autocast=autocast)
            step = train_step_fn(compiled, x, y, autocast=autocast)
            start = time.perf_counter()
            try:
                step()  # the first call traces, compiles forward and backward (C++ via gcc), and runs once
            except Exception as e:  # no compiler, unsupported op...: say so and carry on with eager
                errors[dt] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                print(f"  torch.compile failed for {name} {dt}: {errors[dt]}")
                traceback.print_exc(limit=3, file=sys.stdout)
                continue
            compile_s[dt] = time.perf_counter() - start
            print(f"  {name} {dt}: compiled in {compile_s[dt]:.1f} s (first step, including one step's run)",
                  flush=True)
            contenders[f"compiled {dt}"] = step
        slowest = contenders["eager bf16" if "eager bf16" in contenders else next(iter(contenders))]
        times = interleaved(contenders, reps_for(slowest, args.budget, lo=args.steps, hi=100), args.warmup)
        tokens, flops = batch * seq, model.flops_per_token(seq)
        base = tokens / median(times["eager fp32"]) if "eager fp32" in times else None
        for mode in sorted(contenders, key=lambda m: (m.split()[1], m)):
            tps = tokens / median(times[mode])
            dt = mode.split()[1]
            rows.append({
                "preset": name, "batch x seq": f"{batch}x{seq}", "mode": mode, "tok/s": tps,
                "vs eager fp32": tps / base if base else float("nan"),
                "compile s": compile_s.get(dt, float("nan")) if mode.startswith("compiled") else float("nan"),
                "flops_per_token": flops, "times_s": times[mode],
            })
        for dt, err in errors.items():
            rows.append({"preset": name, "batch x seq": f"{batch}x{seq}", "mode": f"compiled {dt}",
                         "tok/s": float("nan"), "error": err})
        torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------------------------------
# 3. attention: naive vs SDPA
# --------------------------------------------------------------------------------------------------


def attention_contenders(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor | None):
    """Callables for naive and SDPA causal attention: forward only (no grad) or forward + backward."""

    def naive() -> torch.Tensor:
        return naive_attention(q, k, v, None, is_causal=True)[0]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def timed(fn):
        if grad is None:
            return torch.no_grad()(fn)
        return lambda: torch.autograd.grad(fn(), (q, k, v), grad)

    return {"naive": timed(naive), "sdpa": timed(sdpa)}


def no_grad_forward(model: GPT, x: torch.Tensor):
    return torch.no_grad()(lambda: model(x))


def bench_attention(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    b, h, d = args.attn_shape
    budget = 0.3 if args.quick else 1.0  # seconds of timing per contender and length
    fn_rows = []
    for t in args.attn_seqs:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, generator=g, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, t, d, generator=g)
        for direction, out_grad in (("forward", None), ("forward+backward", grad)):
            contenders = attention_contenders(q, k, v, out_grad)
            times = interleaved(contenders, reps_for(contenders["naive"], budget), warmup=1)
            naive_ms, sdpa_ms = 1e3 * median(times["naive"]), 1e3 * median(times["sdpa"])
            fn_rows.append({"B,H,T,D": f"{b},{h},{t},{d}", "pass": direction, "naive ms": naive_ms,
                            "sdpa ms": sdpa_ms, "sdpa speedup": naive_ms / sdpa_ms})
        print(f"  attention function T={t} done", flush=True)

    # The whole model, batch 1, inference: attention is one part of the work among the matmuls.
    model_rows = []
    block_size = max(args.attn_seqs + [preset(args.attn_model).block_size])
    torch.manual_seed(0)
    fast = GPT(preset(args.attn_model, block_size=block_size)).eval()
    slow = GPT(preset(args.attn_model, block_size=block_size, attention="naive")).eval()
    slow.load_state_dict(fast.state_dict())
    for t in args.attn_seqs:
        x, _ = random_batch(fast.config.vocab_size, 1, t)
        contenders = {"naive": no_grad_forward(slow, x), "sdpa": no_grad_forward(fast, x)}
        times = interleaved(contenders, reps_for(contenders["naive"], 2 * budget, hi=20), warmup=1)
        naive_tps, sdpa_tps = t / median(times["naive"]), t / median(times["sdpa"])
        model_rows.append({"model": args.attn_model, "batch x seq": f"1x{t}", "naive tok/s": naive_tps,
                           "sdpa tok/s": sdpa_tps, "sdpa speedup": sdpa_tps / naive_tps})
        print(f"  whole-model forward T={t} done", flush=True)
    return {"function": fn_rows, "model_forward": model_rows}


# --------------------------------------------------------------------------------------------------


def printable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    hidden = {"times_s", "flops_per_token", "hf_attn_implementation", "error"}
    return [{k: v for k, v in r.items() if k not in hidden} for r in rows]


def measure_peaks(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Best matmul FLOP/s per dtype so far: measured at the start and again at the end, keeping the best,
    since a busy spell during one measurement would otherwise inflate every MFU."""
    for dt in ("fp32", "bf16"):
        peak = matmul_peak(DTYPES[dt], max_n=1024 if args.quick else 2048)
        old = results["matmul_peak"].get(dt)
        if old is None or peak["flops"] > old["flops"]:
            results["matmul_peak"][dt] = peak
        print(f"matmul peak {dt}: {peak['flops'] / 1e9:,.1f} GFLOP/s ({peak['n']}^3, best of 5)", flush=True)


def add_mfu(rows: list[dict[str, Any]], peaks: dict[str, Any], dtypes: tuple[str, ...], key: str = "tok/s",
            label: str = "MFU") -> None:
    """MFU = achieved FLOP/s (tokens/s x model.flops_per_token) / measured matmul peak."""
    for r in rows:
        if "flops_per_token" in r:
            for dt in dtypes:
                r[f"{label} vs {dt} peak"] = r[key] * r["flops_per_token"] / peaks[dt]["flops"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    common.use_clock(args.clock)
    cold_cache = tempfile.mkdtemp(prefix="bench_inductor_") if args.cold_compile else None
    if cold_cache:  # read by Inductor when it first compiles, so setting it here is early enough
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache
    if args.clock == "cpu" and args.threads > 1:
        print("note: --clock cpu with several threads also counts threads waiting for each other")
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "matmul_peak": {}}
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['cpu_capability']}, bf16 hardware: "
          f"{m['bf16_hardware']}; torch {m['torch']}, transformers {m['transformers']}; {m['date']}")
    warn_if_busy(args.threads)
    needs_peak = bool({"train", "compile"} & set(args.sections))
    if needs_peak:
        measure_peaks(args, results)

    # Progress lines while measuring; the tables all at the end (MFU needs the final peaks).
    if "train" in args.sections:
        print("\n1. training step, ours vs transformers ...", flush=True)
        results["train_vs_hf"] = bench_train(args)
    if "compile" in args.sections:
        print("\n2. torch.compile ...", flush=True)
        results["compile"] = bench_compile(args)
    if "attention" in args.sections:
        print("\n3. attention, naive vs SDPA ...", flush=True)
        results["attention"] = bench_attention(args)
    if needs_peak:
        measure_peaks(args, results)
    peaks = results["matmul_peak"]

    if "train_vs_hf" in results:
        rows = results["train_vs_hf"]
        add_mfu(rows, peaks, ("fp32",), key="ours tok/s", label="ours MFU")
        print("\n== 1. training step (forward + loss + backward, no optimizer), fp32 eager: ours vs transformers ==")
        print(table(printable(rows)))
        if rows:
            print(f"transformers attn_implementation: {rows[0]['hf_attn_implementation']}. tok/s: median of "
                  f">= {args.steps} interleaved steps (--budget); 'best' ratio: fastest step of each. MFU = tok/s * "
                  "model.flops_per_token(seq) / fp32 matmul peak.")
    if "compile" in results:
        rows = results["compile"]
        add_mfu(rows, peaks, ("fp32", "bf16"))
        cache = "a fresh Inductor cache (--cold-compile)" if args.cold_compile else "Inductor's on-disk cache, if warm"
        print(f"\n== 2. torch.compile: eager vs compiled, {' and '.join(args.dtype)} (bf16 = autocast); "
              f"compile time with {cache} ==")
        print(table(printable(rows), ["preset", "batch x seq", "mode", "tok/s", "vs eager fp32",
                                      "MFU vs fp32 peak", "MFU vs bf16 peak", "compile s"]))
        for r in rows:
            if "error" in r:
                print(f"torch.compile error ({r['mode']}): {r['error']}")
    if "attention" in results:
        att = results["attention"]
        print("\n== 3. attention: naive (explicit softmax) vs F.scaled_dot_product_attention, fp32, causal ==")
        print("the attention function alone:")
        print(table(att["function"]))
        print(f"whole-model forward (inference, no grad, {args.attn_model}):")
        print(table(att["model_forward"]))
    if needs_peak:
        print("\nmatmul peaks (best of start and end): " + ", ".join(
            f"{dt} {p['flops'] / 1e9:,.1f} GFLOP/s ({p['n']}^3)" for dt, p in peaks.items()))

    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["load_average_1min_at_end"] = load_average()
    print(f"total {results['elapsed_s']:.0f} s; 1-minute load average {m['load_average_1min_at_start']} at the start, "
          f"{load_average()} at the end")
    if cold_cache:
        shutil.rmtree(cold_cache, ignore_errors=True)
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
