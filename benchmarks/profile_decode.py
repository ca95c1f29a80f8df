"""Where the time of one batch-1 decode step goes: torch.profiler over engine steps, per op, and a figure.

    python benchmarks/profile_decode.py                        # the real SmolLM2-135M-Instruct, 2 threads
    python benchmarks/profile_decode.py --steps 32 --figure docs/figures/decode_profile.png

One request (a real chat prompt) is prefilled, then --steps engine steps (each one decode forward and the
sampling of one token) run under torch.profiler, for the engine's default path (`GPT.forward`, transposed weights)
and for its fast path (`Engine(fast_decode=True)`, byollm.serve.fast_decode). The table gives each op's self CPU
time per step and its calls per step; the figure shows the largest ops of both paths side by side. Self times
under the profiler are a little longer than unprofiled ones (each op is recorded); compare paths in one run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))

from common import load_average, machine_info  # noqa: E402

from byollm.sampling import SamplingParams  # noqa: E402
from byollm.serve.engine import Engine  # noqa: E402

PATHS = {"default (GPT.forward, transposed weights)": dict(transpose_weights=True),
         "fast_decode": dict(fast_decode=True)}


def profile_path(model: Any, prompt: list[int], steps: int, **engine_kwargs: Any) -> dict[str, Any]:
    engine = Engine(copy.deepcopy(model), max_batch_size=1, **engine_kwargs)
    engine.add_request(prompt, SamplingParams(max_new_tokens=steps + 8, temperature=0, stop_token_ids=()))
    engine.step()  # prefill: the first token
    for _ in range(3):  # warm-up decode steps
        engine.step()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    started = time.perf_counter()
    for _ in range(4):  # unprofiled, for the step time
        engine.step()
    step_ms = (time.perf_counter() - started) / 4 * 1e3
    ops = []
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("mkl"):
            ops.append({"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                        "calls_per_step": e.count / steps})
    ops.sort(key=lambda o: -o["ms_per_step"])
    profiled_ms = sum(o["ms_per_step"] for o in ops)
    return {"ops": ops, "step_ms": step_ms, "profiled_ms": profiled_ms, "weight_bytes": engine.weight_bytes,
            "calls_per_step": sum(o["calls_per_step"] for o in ops)}


def figure(results: dict[str, dict[str, Any]], path: Path, top: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), sharex=True)
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        ops = r["ops"][:top][::-1]
        ax.barh([f"{o['op'].removeprefix('aten::')} ({o['calls_per_step']:.0f}x)" for o in ops],
                [o["ms_per_step"] for o in ops], color="tab:blue")
        ax.set_title(f"{name}\n{r['profiled_ms']:.1f} ms/step in {r['calls_per_step']:.0f} op calls (profiled)",
                     fontsize=9)
        ax.set_xlabel("self CPU ms per decode step")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("SmolLM2-135M, one batch-1 decode step, per op (calls per step in brackets)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m-instruct", help="a packaged real model")
    p.add_argument("--steps", type=int, default=16, help="profiled decode steps per path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", help="save the per-op figure here (e.g. docs/figures/decode_profile.png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench_decode import real_model

    model, _, prompt, _ = real_model(args.preset)
    m = machine_info()
    print(f"{m['cpu']}, {args.threads} threads, torch {m['torch']}; load {load_average()}")
    results = {name: profile_path(model, prompt, args.steps, **kw) for name, kw in PATHS.items()}
    for name, r in results.items():
        print(f"\n{name}: {r['step_ms']:.1f} ms/step unprofiled, {r['profiled_ms']:.1f} ms of ops profiled, "
              f"{r['calls_per_step']:.0f} op calls/step, {r['weight_bytes'] / 1e6:.0f} MB of weights/step")
        for o in r["ops"][:12]:
            print(f"  {o['op']:<32} {o['ms_per_step']:7.2f} ms  {o['calls_per_step']:6.0f} calls")
    if args.figure:
        figure(results, Path(args.figure))
    return results


if __name__ == "__main__":
    main()
