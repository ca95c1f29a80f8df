"""Sweep quickstart recipe variants: the validation loss each reaches at a fixed number of steps.

Loss after N steps does not depend on the machine (up to float rounding), so the sweep can run on any
device, many variants at once; what a variant COSTS on the 2-core CPU is measured separately (its
tokens/s there, `--throughput`), and the two together say which recipe fits the 5-minute budget best.

    python benchmarks/tune_quickstart.py --device cuda --jobs 8 --out runs/tune.json     # quality
    python benchmarks/tune_quickstart.py --throughput --steps 30                          # CPU cost

Every variant is configs/quickstart.yaml plus the overrides listed in VARIANTS (edit it to try more).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MUON = {"optimizer": "muon", "lr": 3e-3, "min_lr": 3e-4, "muon_lr": 0.02}
VARIANTS: dict[str, dict] = {
    "base": {},
    "adamw-lr3e-3": {"lr": 3e-3, "min_lr": 3e-4},
    "adamw-lr4e-3": {"lr": 4e-3, "min_lr": 4e-4},
    "adamw-lr3e-3-linear0": {"lr": 3e-3, "min_lr": 0.0, "schedule": "linear"},
    "muon-0.02": _MUON,
    "muon-0.04": {**_MUON, "muon_lr": 0.04},
    "muon-0.01": {**_MUON, "muon_lr": 0.01},
    "muon-0.02-adam6e-3": {**_MUON, "lr": 6e-3, "min_lr": 6e-4},
    "muon-0.02-linear0": {**_MUON, "min_lr": 0.0, "schedule": "linear"},
    "muon-0.02-wd0": {**_MUON, "weight_decay": 0.0},
    "muon-0.02-b32-600": {**_MUON, "batch_size": 32, "max_steps": 600, "checkpoint_interval": 300},
    "adamw-b32-600": {"batch_size": 32, "max_steps": 600, "checkpoint_interval": 300, "lr": 3e-3,
                      "min_lr": 3e-4},
    "muon-0.02-192w": {**_MUON, "model.n_embd": 192, "model.n_head": 6, "model.n_kv_head": 3,
                       "model.intermediate_size": 512},
    "muon-0.02-6L": {**_MUON, "model.n_layer": 6},
    "muon-0.02-warm20": {**_MUON, "warmup_steps": 20},
    "muon-0.02-T256-b8": {**_MUON, "block_size": 256, "batch_size": 8, "model.block_size": 256},
}
# Round 2: Muon won round 1 by a wide margin; now its step budget, schedule and width, and seed noise.
_LIN = {**_MUON, "min_lr": 0.0, "schedule": "linear"}
_W192 = {"model.n_embd": 192, "model.n_head": 6, "model.n_kv_head": 3, "model.intermediate_size": 512}
VARIANTS.update({
    "r2-muon-lin-800": {**_LIN, "max_steps": 800},
    "r2-muon-lin-1000": {**_LIN, "max_steps": 1000},
    "r2-muon-lin-1000-s1": {**_LIN, "max_steps": 1000, "seed": 1},
    "r2-muon-lin-1000-s2": {**_LIN, "max_steps": 1000, "seed": 2},
    "r2-muon-cos-1000": {**_MUON, "max_steps": 1000},
    "r2-muon-lin-1000-mlr0.03": {**_LIN, "max_steps": 1000, "muon_lr": 0.03},
    "r2-muon-lin-1000-adam2e-3": {**_LIN, "max_steps": 1000, "lr": 2e-3},
    "r2-muon-lin-1000-warm20": {**_LIN, "max_steps": 1000, "warmup_steps": 20},
    "r2-muon-lin-1000-b0.95": {**_LIN, "max_steps": 1000, "betas": [0.9, 0.95]},
    "r2-muon-lin-1000-wd0.05": {**_LIN, "max_steps": 1000, "weight_decay": 0.05},
    "r2-muon-lin-192w-600": {**_LIN, **_W192, "max_steps": 600},
    "r2-muon-lin-192w-700": {**_LIN, **_W192, "max_steps": 700},
    "r2-muon-lin-6L-700": {**_LIN, "model.n_layer": 6, "max_steps": 700},
    "r2-muon-lin-6L-800": {**_LIN, "model.n_layer": 6, "max_steps": 800},
    "r2-muon-lin-1200": {**_LIN, "max_steps": 1200},
    "r2-adamw-lin-1000": {"lr": 3e-3, "min_lr": 0.0, "schedule": "linear", "max_steps": 1000},
})
# Round 3: the three small round-2 gains together (Muon lr 0.03, warmup 20, Adam beta2 0.95).
_R3 = {**_LIN, "muon_lr": 0.03, "warmup_steps": 20, "betas": [0.9, 0.95]}
VARIANTS.update({
    "r3-combo-800": {**_R3, "max_steps": 800},
    "r3-combo-900": {**_R3, "max_steps": 900},
    "r3-combo-1000": {**_R3, "max_steps": 1000},
    "r3-combo-1000-s1": {**_R3, "max_steps": 1000, "seed": 1},
    "r3-combo-1000-cos": {**_R3, "max_steps": 1000, "schedule": "cosine", "min_lr": 3e-4},
    "r3-combo-1000-mlr0.04": {**_R3, "max_steps": 1000, "muon_lr": 0.04},
    "r3-combo-1000-b2-0.99": {**_R3, "max_steps": 1000, "betas": [0.9, 0.99]},
    "r3-combo-1100": {**_R3, "max_steps": 1100},
})
# Round 4 (a 4.5-minute budget on the slow 2-core AVX2 machine, ~5.8k tokens/s: ~750 steps of 2,048 tokens):
# fewer steps, a higher Muon rate and a shorter warmup.
_R4 = {**_LIN, "warmup_steps": 20, "checkpoint_interval": 0}
VARIANTS.update({
    "r4-base-750": {**_LIN, "max_steps": 750},
    "r4-mlr0.03-w20-750": {**_R4, "muon_lr": 0.03, "max_steps": 750},
    "r4-mlr0.04-w20-750": {**_R4, "muon_lr": 0.04, "max_steps": 750},
    "r4-mlr0.03-w20-750-s1": {**_R4, "muon_lr": 0.03, "max_steps": 750, "seed": 1},
    "r4-mlr0.03-w20-800": {**_R4, "muon_lr": 0.03, "max_steps": 800},
    "r4-mlr0.03-w20-adam5e-3-750": {**_R4, "muon_lr": 0.03, "lr": 5e-3, "max_steps": 750},
    "r4-mlr0.03-w20-untied-750": {**_R4, "muon_lr": 0.03, "model.tie_embeddings": False, "max_steps": 750},
    "r4-mlr0.03-w20-850": {**_R4, "muon_lr": 0.03, "max_steps": 850},
    "r4-mlr0.03-w20-untied-800": {**_R4, "muon_lr": 0.03, "model.tie_embeddings": False, "max_steps": 800},
    "r4-mlr0.03-w20-untied-900": {**_R4, "muon_lr": 0.03, "model.tie_embeddings": False, "max_steps": 900},
    "r4-mlr0.03-w20-untied-1000": {**_R4, "muon_lr": 0.03, "model.tie_embeddings": False, "max_steps": 1000},
    "r4-mlr0.03-w20-untied-800-s1": {**_R4, "muon_lr": 0.03, "model.tie_embeddings": False, "max_steps": 800,
                                     "seed": 1},
})


def run_variant(name: str, overrides: dict, args: argparse.Namespace) -> dict:
    """One variant in its own process (its own torch threads, its own run folder)."""
    out = Path(args.out_dir) / name
    over = {"eval_interval": args.eval_interval, "log_interval": args.eval_interval // 2 or 1,
            "eval_batches": args.eval_batches, "sample_tokens": 1, "device": args.device, "name": name,
            "time_budget_s": None,  # variants are compared at their step counts, whatever the machine's speed
            "out_dir": str(out.parent), **overrides}
    if args.steps:
        over["max_steps"] = args.steps
    code = ("import json,sys; from byollm.train.config import load_config; from byollm.train.pretrain import "
            "pretrain; r = pretrain(load_config('configs/quickstart.yaml', json.loads(sys.argv[1])), "
            "progress=False); print(json.dumps({'val': r.val, 'tok_s': r.tokens_per_s}))")
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(over)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        return {"name": name, "error": p.stderr.strip().splitlines()[-1:] or ["?"]}
    final = json.loads(p.stdout.strip().splitlines()[-1])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("event") == "eval"]
    curve = [(e["step"], round(e["val_loss"], 4), round(e.get("train_seconds", 0.0), 2)) for e in evals]
    hit = next(((s, t) for s, v, t in curve if v <= args.target), (None, None))
    return {"name": name, "overrides": overrides, "final_val": final["val"].get("loss"),
            "tok_s": final["tok_s"], "step_to_target": hit[0], "seconds_to_target": hit[1],
            "wall_s": round(time.perf_counter() - t0, 1), "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="variants run at once")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    ap.add_argument("--only", nargs="*", help="variant names or globs such as 'r2-*' (default: all)")
    ap.add_argument("--steps", type=int, default=0, help="override max_steps of every variant")
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--out-dir", default="runs/tune")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--throughput", action="store_true",
                    help="measure CPU tokens/s of each variant (few steps, one at a time) instead")
    args = ap.parse_args()
    names = [n for n in VARIANTS if not args.only or any(fnmatch.fnmatch(n, p) for p in args.only)]
    if args.throughput:
        args.eval_interval, args.jobs, args.steps = args.steps or 30, 1, args.steps or 30
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run_variant(n, VARIANTS[n], args), names))
    base = next((r["tok_s"] for r in results if r.get("tok_s")), None)
    print(f"{'variant':28s} {'val':>7s} {'step<=' + str(args.target):>11s} {'tok/s':>9s} {'cost':>6s}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:28s} ERROR {r['error']}")
            continue
        cost = base / r["tok_s"] if base and r["tok_s"] else float("nan")
        print(f"{r['name']:28s} {r['final_val']:7.4f} {str(r['step_to_target']):>11s} {r['tok_s']:9,.0f} {cost:6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
