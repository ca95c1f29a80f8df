"""Quickstart vs nanoGPT's CPU recipe: how long each takes to reach a validation loss, same machine, same run.

    python benchmarks/bench_quickstart.py                 # time to val 1.88, ratio quickstart / nanoGPT recipe
    python benchmarks/bench_quickstart.py --full          # also the whole quickstart: steps, training time, val
    python benchmarks/bench_quickstart.py --only-full     # only the whole quickstart

The reference is `configs/nanogpt-shakespeare-char-cpu.yaml` (nanoGPT's published CPU recipe: 4 x 128 GPT,
block 64, batch 12, 2,000 iterations, which ends near val 1.88-1.89) run to its end. The challenger is
`configs/quickstart.yaml` with its max_steps schedule (its time budget off, so the race does not depend on the
machine's speed) evaluated every --eval-every steps and stopped at the first evaluation at or below --target.
The full quickstart runs exactly as configured: its time budget decides its steps on this machine. Race times
are training seconds (forward, backward, optimizer; evaluations excluded for both sides), plus wall-clock.
All runs use the same data split (nanoGPT's first 90% / last 10%) and the same threads, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see Makefile)

import torch  # noqa: E402

from byollm.train.config import load_config  # noqa: E402
from byollm.train.pretrain import pretrain  # noqa: E402


def run(config: str, overrides: dict, out_dir: str, name: str) -> dict:
    """Train one config; return its evaluations [(step, val, train_seconds)], final val, seconds."""
    cfg = load_config(ROOT / config, {"out_dir": out_dir, "name": name, "sample_tokens": 50, **overrides})
    t0 = time.perf_counter()
    result = pretrain(cfg, progress=False)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(e["step"], e["val_loss"], e["train_seconds"]) for e in events if e.get("event") == "eval"]
    train = [e for e in events if e.get("event") == "train"]
    budget = next((e for e in events if e.get("event") == "time_budget"), None)
    return {"config": config, "steps": result.steps, "val": result.val.get("loss"), "evals": evals,
            "train_seconds": train[-1]["train_seconds"] if train else 0.0, "fit_seconds": result.train_seconds,
            "wall_seconds": wall, "tokens_per_s": result.tokens_per_s, "time_budget": budget}


def run_full(out: str) -> dict:
    """The whole quickstart as configured (its sample too): steps done, training time, final val loss."""
    full = run("configs/quickstart.yaml", {"sample_tokens": 300}, out, "full")
    b = full["time_budget"]
    fitted = (f" (time budget {b['budget_s']:g} s: {b['steps_fit']:,} steps fit at {b['seconds_per_step']:.3f} s/step)"
              if b else "")
    print(f"full quickstart: {full['steps']} steps{fitted}, val {full['val']:.4f}, {full['fit_seconds']:.1f} s "
          f"training with evaluations ({full['train_seconds']:.1f} s of steps, {full['tokens_per_s']:,.0f} tokens/s), "
          f"{full['wall_seconds']:.1f} s wall (target: val <= 1.55, training <= 300 s)", flush=True)
    return full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=1.88, help="validation loss to reach")
    ap.add_argument("--eval-every", type=int, default=25, help="quickstart evaluations while racing to the target")
    ap.add_argument("--full", action="store_true", help="also run the whole quickstart and report its final val")
    ap.add_argument("--only-full", action="store_true", help="only the whole quickstart (no race, no reference)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="bench-quickstart-")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; runs in {out}", flush=True)

    if args.only_full:
        full = run_full(out)
        print(json.dumps({k: full[k] for k in ("steps", "val", "fit_seconds", "train_seconds", "wall_seconds",
                                                "tokens_per_s", "time_budget")}))
        if args.json:
            Path(args.json).write_text(json.dumps(full, indent=1))
        return
    ref = run("configs/nanogpt-shakespeare-char-cpu.yaml", {}, out, "nanogpt")
    print(f"nanoGPT recipe: {ref['steps']} steps, val {ref['val']:.4f}, {ref['train_seconds']:.1f} s training "
          f"({ref['wall_seconds']:.1f} s wall, {ref['tokens_per_s']:,.0f} tokens/s)", flush=True)

    # log_interval must divide eval_every so train_seconds is up to date at every evaluation.
    race = run("configs/quickstart.yaml", {"eval_interval": args.eval_every, "log_interval": args.eval_every,
                                           "stop_at_val_loss": args.target, "checkpoint_interval": 0,
                                           "time_budget_s": None}, out, "race")
    hit = next(((s, v, t) for s, v, t in race["evals"] if v <= args.target), None)
    if hit is None:
        print(f"quickstart never reached val {args.target} (last {race['val']:.4f} at step {race['steps']})")
        ratio = None
    else:
        ratio = hit[2] / ref["train_seconds"]
        print(f"quickstart: val {hit[1]:.4f} <= {args.target} at step {hit[0]} after {hit[2]:.1f} s training "
              f"({race['tokens_per_s']:,.0f} tokens/s)")
        print(f"time to val {args.target}, quickstart / nanoGPT recipe: {ratio:.3f}  (target <= 0.6)")
    results = {"target": args.target, "nanogpt": ref, "quickstart_race": race, "ratio": ratio,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    if args.full:
        results["quickstart_full"] = run_full(out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("target", "ratio", "threads", "torch", "date")}
                     | {"nanogpt_train_s": ref["train_seconds"], "nanogpt_val": ref["val"],
                        "quickstart_s_to_target": hit[2] if hit else None,
                        "quickstart_full_val": results.get("quickstart_full", {}).get("val"),
                        "quickstart_full_steps": results.get("quickstart_full", {}).get("steps"),
                        "quickstart_full_train_s": results.get("quickstart_full", {}).get("fit_seconds"),
                        "quickstart_full_wall_s": results.get("quickstart_full", {}).get("wall_seconds")}))


if __name__ == "__main__":
    main()
