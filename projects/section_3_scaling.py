#!/usr/bin/env python
"""Section 3 project: the same training on one process and sharded with FSDP over two, a sharded checkpoint
resumed on one and on three processes, and the memory plan of two real models on 8 GPUs. On a CPU.

    python projects/section_3_scaling.py                       # a few minutes on 2 cores
    python projects/section_3_scaling.py --quick               # tiny, well under a minute (the tests)
    python projects/section_3_scaling.py --out out/section3-scaling

1. fsdp      a small Llama on Tiny Shakespeare (through the data registry, as section 2), trained twice with the
             same global batch and seed: one plain process, and FSDP2 (`--dist.strategy fsdp`) on 2 gloo
             processes started by torchrun. The per-step training losses side by side, their largest relative
             difference, the gradient norms, and the final weights (model.safetensors) compared
2. resume    the 2-process run's checkpoint from the middle of the run (DCP shards) resumed on 1 and on 3
             processes, as if the job had died right after writing it: the losses after it against the
             uninterrupted run, and the sampler's data position (train_state.pt) and tokens seen (metrics.jsonl)
3. plan      `byollm plan` (its Python API) for GPT-2 XL (1.56B) and Llama 3 8B on 8 x 80 GB H100s, and the ZeRO
             paper's 7.5B-on-64-GPUs model states, as a check of the arithmetic

OUT/report.json holds every number; the checks are printed (exit 0 either way: a missed target is a finding).
No GPU is used or needed: the point is that the sharded training is the same training, not its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from byollm.scale.plan import format_plan, plan  # noqa: E402

LOSS_TOLERANCE = 1e-4  # the target: relative difference of every step's loss (float32 rounding, summation order)
ZERO_PAPER_GB = {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "fsdp": 1.9}  # Rajbhandari et al. 2020, Figure 1


@dataclass
class Sizes:
    """Everything --quick shrinks. The global batch must divide by 1, 2 and 3 (the three world sizes)."""

    preset: str = "llama-nano"  # the quickstart's model: 0.8M parameters, 4 layers x 128 wide
    block_size: int = 128
    global_batch: int = 12  # 1 x 12, 2 x 6, 3 x 4
    steps: int = 200
    eval_batches: int = 10  # over 3 ranks: 4 + 3 + 3, unequal shares (evaluation must not deadlock)

    @property
    def middle(self) -> int:
        return self.steps // 2


QUICK = Sizes(preset="llama-tiny", block_size=32, global_batch=6, steps=6, eval_batches=4)


def train_args(s: Sizes, out: Path, name: str, world: int, **over: Any) -> list[str]:
    """The pretrain options: the same model, data, seed and global batch whatever the world size."""
    values: dict[str, Any] = {
        "model.preset": s.preset, "model.dropout": 0.0, "data.name": "tinyshakespeare", "block_size": s.block_size,
        "batch_size": s.global_batch // world, "max_steps": s.steps, "warmup_steps": max(1, s.steps // 10),
        "lr": 3e-3, "optimizer": "adamw", "log_interval": 1, "eval_interval": s.middle, "eval_batches": s.eval_batches,
        "checkpoint_interval": s.middle, "keep_last": 3, "sample_tokens": 16, "device": "cpu", "dtype": "fp32",
        "seed": 1337, "out_dir": out, "name": name, **over}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def launch(world: int, args: list[str], env: dict[str, str]) -> float:
    """`byollm pretrain` on one process, or under torchrun on `world` gloo processes; returns the wall time."""
    if world == 1:
        cmd = [sys.executable, "-m", "byollm.cli", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "byollm.cli", "pretrain", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def events(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def by_step(run: Path, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in events(run, "train")}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def weights_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two checkpoints' gathered weights (model.safetensors). A tied
    embedding is stored once, under either of its two names: compare the names both files have."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    common = wa.keys() & wb.keys()
    assert len(common) >= len(wa) - 1 and len(common) >= len(wb) - 1, (sorted(wa), sorted(wb))
    return max((wa[k] - wb[k]).abs().max().item() for k in common)


def data_position(checkpoint: Path) -> dict[str, int]:
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    return {"position": state["data"]["position"], "chunk": state["data"]["chunk"], "step": state["step"],
            "tokens_seen": state["tokens_seen"]}


def crashed_copy(run: Path, copy: Path, step: int) -> None:
    """The run as a job that died right after writing checkpoint `step` would leave it: `latest` names step-<step>
    and the later checkpoints are gone (its metrics.jsonl still has later steps; the resume rewinds them)."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step-*"):
        if int(ckpt.name.removeprefix("step-")) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / "latest").write_text(f"step-{step}\n")


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def shown_steps(s: Sizes) -> list[int]:
    if s.steps <= 8:
        return list(range(1, s.steps + 1))
    picks = {1, 2, 3, s.middle, s.middle + 1, s.middle + 2, s.steps, *range(s.steps // 8, s.steps, s.steps // 8)}
    return sorted(picks)


# --------------------------------------------------------------------------------------------------
# 1-2. One process, FSDP on two, resumed on one and three
# --------------------------------------------------------------------------------------------------


def fsdp_and_resume(s: Sizes, out: Path, env: dict[str, str]) -> dict[str, Any]:
    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    fsdp = {"dist.strategy": "fsdp"}
    seconds = {"one": launch(1, train_args(s, runs, "one", 1), env),
               "fsdp2": launch(2, train_args(s, runs, "fsdp2", 2, **fsdp), env)}
    for world, name in ((1, "resumed1"), (3, "resumed3")):
        crashed_copy(runs / "fsdp2", runs / name, s.middle)
        seconds[name] = launch(world, train_args(s, runs, name, world, resume="true", **fsdp), env)

    loss = {name: by_step(runs / name, "loss") for name in ("one", "fsdp2", "resumed1", "resumed3")}
    norm = {name: by_step(runs / name, "grad_norm") for name in ("one", "fsdp2")}
    steps = list(range(1, s.steps + 1))
    after = steps[s.middle:]
    last = f"checkpoints/step-{s.steps}"
    result: dict[str, Any] = {
        "sizes": s.__dict__,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "losses": {name: [loss[name][i] for i in steps] for name in loss},
        "fsdp_vs_one_max_rel": max(rel_diff(loss["fsdp2"][i], loss["one"][i]) for i in steps),
        "grad_norm_max_rel": max(rel_diff(norm["fsdp2"][i], norm["one"][i]) for i in steps),
        "weights_fsdp_vs_one_max_abs": weights_diff(runs / "one" / last, runs / "fsdp2" / last),
        "resume": {},
    }
    for name in ("resumed1", "resumed3"):
        meta = json.loads((runs / name / "meta.json").read_text())
        result["resume"][name] = {
            "world_size": meta["world_size"],
            "resumed_from": Path(meta["resumed_from"]).name,
            "max_rel_vs_fsdp2": max(rel_diff(loss[name][i], loss["fsdp2"][i]) for i in after),
            "max_rel_vs_one": max(rel_diff(loss[name][i], loss["one"][i]) for i in after),
            "weights_vs_fsdp2_max_abs": weights_diff(runs / "fsdp2" / last, runs / name / last),
            "steps_logged": [e["step"] for e in events(runs / name, "train")] == steps,
            "tokens_seen": [e["tokens_seen"] for e in events(runs / name, "train")],
            "data": data_position(runs / name / last),
            "val_loss": events(runs / name, "eval")[-1]["val_loss"],
        }
    result["data"] = {name: data_position(runs / name / last) for name in ("one", "fsdp2")}
    result["data_middle"] = data_position(runs / "fsdp2" / f"checkpoints/step-{s.middle}")
    result["tokens_seen"] = {name: [e["tokens_seen"] for e in events(runs / name, "train")]
                             for name in ("one", "fsdp2")}
    result["dcp_files"] = sorted(p.name for p in (runs / "fsdp2" / f"checkpoints/step-{s.middle}/dcp").iterdir())
    return result


# --------------------------------------------------------------------------------------------------
# 3. The memory plan of real models
# --------------------------------------------------------------------------------------------------


def plans() -> dict[str, Any]:
    out: dict[str, Any] = {"text": {}, "plans": {}}
    for label, preset in (("GPT-2 XL", "gpt2-1558m"), ("Llama 3 8B", "llama3-8b")):
        p = plan(preset, gpus=8, gpu="H100")
        out["text"][label] = format_plan(p)
        out["plans"][label] = {k: v for k, v in p.to_dict().items() if k != "notes"}
    out["zero_paper"] = {s: round(plan(params=7.5e9, gpus=64, strategy=s).memory_gb["model_states"], 1)
                         for s in ZERO_PAPER_GB}
    return out


# --------------------------------------------------------------------------------------------------
# 4. The same loop under Hugging Face Accelerate
# --------------------------------------------------------------------------------------------------


def accelerate_vs_native(s: Sizes, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """`--dist.strategy accelerate` on 2 gloo processes (Accelerate's MULTI_CPU: its DDP wrapper, accumulate,
    backward and clipping) against the native loop's DDP on 2 processes (the same arithmetic: the losses should
    be the same floats) and against part 1's single process (the same training, up to rounding drift)."""
    runs = out / "runs"
    seconds = {"accelerate2": launch(2, train_args(s, runs, "accelerate2", 2, **{"dist.strategy": "accelerate"}), env),
               "ddp2": launch(2, train_args(s, runs, "ddp2", 2), env)}
    steps = range(1, s.steps + 1)
    loss = {name: by_step(runs / name, "loss") for name in ("one", "ddp2", "accelerate2")}
    meta = json.loads((runs / "accelerate2" / "meta.json").read_text())
    last = f"checkpoints/step-{s.steps}"
    return {"seconds": {k: round(v, 1) for k, v in seconds.items()},
            "losses": {name: [loss[name][i] for i in steps] for name in ("ddp2", "accelerate2")},
            "max_rel_vs_ddp2": max(rel_diff(loss["accelerate2"][i], loss["ddp2"][i]) for i in steps),
            "weights_vs_ddp2_max_abs": weights_diff(runs / "ddp2" / last, runs / "accelerate2" / last),
            "first_steps_max_rel_vs_one": max(rel_diff(loss["accelerate2"][i], loss["one"][i]) for i in steps[:3]),
            "max_rel_vs_one": max(rel_diff(loss["accelerate2"][i], loss["one"][i]) for i in steps),
            "ddp2_max_rel_vs_one": max(rel_diff(loss["ddp2"][i], loss["one"][i]) for i in steps),
            "mixed_precision": meta.get("accelerate_mixed_precision"), "world_size": meta["world_size"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (well under a minute; the tests)")
    parser.add_argument("--out", type=Path, default=Path("out/section3-scaling"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Sizes()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()

    print(f"== 1. One process against FSDP on 2 ({s.preset}, Tiny Shakespeare, {s.steps} steps x {s.global_batch} "
          f"sequences x {s.block_size} tokens, AdamW, fp32, seed 1337)", flush=True)
    r = fsdp_and_resume(s, out, env)
    loss, steps = r["losses"], shown_steps(s)
    rows = [["step", "1 process", "FSDP, 2 processes", "rel. diff", "resumed on 1", "resumed on 3"]]
    for i in steps:
        resumed = [f"{loss[n][i - 1]:.6f}" if i > s.middle else "" for n in ("resumed1", "resumed3")]
        rows.append([str(i), f"{loss['one'][i - 1]:.6f}", f"{loss['fsdp2'][i - 1]:.6f}",
                     f"{rel_diff(loss['fsdp2'][i - 1], loss['one'][i - 1]):.1e}", *resumed])
    print(table(rows))
    print(f"largest relative difference over all {s.steps} steps: losses {r['fsdp_vs_one_max_rel']:.1e}, gradient "
          f"norms {r['grad_norm_max_rel']:.1e}; final weights max |diff| {r['weights_fsdp_vs_one_max_abs']:.1e}")
    print(f"wall time: 1 process {r['seconds']['one']:.0f} s, FSDP on 2 {r['seconds']['fsdp2']:.0f} s (2 cores; "
          "not a speed measurement)")

    print(f"\n== 2. The step-{s.middle} checkpoint of the 2-process run, resumed on 1 and on 3 processes")
    print(f"checkpoint step-{s.middle}/dcp: {', '.join(r['dcp_files'])}")
    mid = r["data_middle"]
    print(f"saved data position: sample {mid['position']:,} (chunk {mid['chunk']}), {mid['tokens_seen']:,} tokens seen")
    rows = [["run", "world", f"loss rel. diff, steps {s.middle + 1}-{s.steps}", f"weights max |diff| at {s.steps}",
             "data position", "tokens seen", "wall s"]]
    for name, label in (("one", "1 process"), ("fsdp2", "FSDP on 2, uninterrupted")):
        d = r["data"][name]
        rows.append([label, "1" if name == "one" else "2", "(reference)" if name == "fsdp2" else
                     f"{max(rel_diff(loss['one'][i], loss['fsdp2'][i]) for i in range(s.middle, s.steps)):.1e}",
                     "(reference)" if name == "fsdp2" else f"{r['weights_fsdp_vs_one_max_abs']:.1e}",
                     f"{d['position']:,}", f"{d['tokens_seen']:,}", f"{r['seconds'][name]:.0f}"])
    for name in ("resumed1", "resumed3"):
        q = r["resume"][name]
        rows.append([f"resumed from {q['resumed_from']}", str(q["world_size"]), f"{q['max_rel_vs_fsdp2']:.1e}",
                     f"{q['weights_vs_fsdp2_max_abs']:.1e}", f"{q['data']['position']:,}",
                     f"{q['data']['tokens_seen']:,}", f"{r['seconds'][name]:.0f}"])
    print(table(rows))
    seen = {tuple(v) for v in (*r["tokens_seen"].values(), *(q["tokens_seen"] for q in r["resume"].values()))}
    print(f"every run ends at sample {s.steps} x {s.global_batch} = {s.steps * s.global_batch:,}: none read twice, "
          f"none skipped; tokens seen per step identical in all four metrics.jsonl: {len(seen) == 1}")

    print("\n== 3. Planning GPT-2 XL and Llama 3 8B on 8 x 80 GB GPUs (byollm plan)")
    p = plans()
    for label, text in p["text"].items():
        print(f"--- {label}\n{text}")
    print("ZeRO paper check, 7.5B parameters on 64 GPUs, model states per GPU (GB): "
          + ", ".join(f"{k} {v} (paper {ZERO_PAPER_GB[k]})" for k, v in p["zero_paper"].items()))

    print("\n== 4. The same loop under Hugging Face Accelerate (--dist.strategy accelerate, 2 gloo processes)")
    a = accelerate_vs_native(s, out, env)
    print(f"against the native loop's DDP on 2 processes: losses max rel. diff {a['max_rel_vs_ddp2']:.1e} over "
          f"{s.steps} steps, final weights max |diff| {a['weights_vs_ddp2_max_abs']:.1e} (mixed precision "
          f"{a['mixed_precision']}; {a['seconds']['accelerate2']:.0f} s and {a['seconds']['ddp2']:.0f} s)")
    print(f"against 1 process: first 3 steps rel. {a['first_steps_max_rel_vs_one']:.1e}; over all steps "
          f"{a['max_rel_vs_one']:.1e} (native DDP on 2: {a['ddp2_max_rel_vs_one']:.1e}), the rounding drift of part 1")

    checks = {
        f"FSDP on 2 gives the 1-process losses (every step, rel. <= {LOSS_TOLERANCE:g})":
            r["fsdp_vs_one_max_rel"] <= LOSS_TOLERANCE,
        "resumed on 1 and on 3 give the uninterrupted run's losses (rel. <= 1e-4)":
            all(q["max_rel_vs_fsdp2"] <= LOSS_TOLERANCE for q in r["resume"].values()),
        "every run ends at the same data position (global sample index)":
            len({d["position"] for d in (*r["data"].values(), *(q["data"] for q in r["resume"].values()))}) == 1
            and r["data"]["one"]["position"] == s.steps * s.global_batch,
        "the resumed runs' metrics read as one uninterrupted history": all(
            q["steps_logged"] for q in r["resume"].values()),
        "the plan reproduces the ZeRO paper's 120 / 31.4 / 16.6 / 1.9 GB":
            all(abs(p["zero_paper"][k] - v) <= 0.05 for k, v in ZERO_PAPER_GB.items()),
        "Llama 3 8B needs more than FSDP on 8 x 80 GB; GPT-2 XL fits with plain DDP":
            p["plans"]["Llama 3 8B"]["strategy"] != "fsdp" and p["plans"]["Llama 3 8B"]["tp"] > 1
            and p["plans"]["GPT-2 XL"]["strategy"] == "ddp",
        "Accelerate on 2 gives the native DDP-on-2 losses (every step, rel. <= 1e-6)":
            a["max_rel_vs_ddp2"] <= 1e-6 and a["world_size"] == 2,
    }
    report = {"quick": args.quick, **r, "plan": p, "accelerate": a, "checks": checks, "seconds": r["seconds"],
              "total_seconds": round(time.perf_counter() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    print(f"report: {out / 'report.json'}; {sum(checks.values())} of {len(checks)} checks met in "
          f"{report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
