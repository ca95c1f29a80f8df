"""Training throughput: our `Trainer` step against the same model in transformers, trained the same way.

    python benchmarks/bench_train.py                                   # CPU: llama-nano, fp32, eager
    python benchmarks/bench_train.py --preset llama-tiny --steps 5 --seq-len 64 --batch-size 4
    python benchmarks/bench_train.py --device cuda --json train.json   # GPU: gpt2-124m, 16 x 1024, bf16, compiled

Both sides run one optimizer step exactly as `byollm train` does: `byollm.train.loop.Trainer`'s
forward_backward (bf16 autocast through the loop's `autocast_context`, loss / grad_accum, backward) and
optimizer_step (clip the gradient norm to 1.0, AdamW from `build_training_optimizer` with the TrainConfig defaults:
fused where PyTorch has it, weight decay on matrices only; the warmup+cosine LambdaLR; zero_grad). The Trainer
also applies `torch.compile` itself when asked. The only difference is the model:

  ours   byollm's `GPT` with the `CausalLM` objective (our forward computes the cross-entropy)
  HF     transformers' model of the same config with the same starting weights
         (`byollm.interop.hf.to_hf_model`: GPT2LMHeadModel for gpt2-* presets, LlamaForCausalLM for llama
         ones), attn_implementation="sdpa", use_cache=False, and the same loss (mean cross-entropy over all
         B*T positions of the fp32-cast logits; its own `labels=` would shift and drop a position).

The batches are random tokens, the same for both sides: this measures throughput only, not learning. Steps
are timed in rounds of --steps-per-round (CUDA-synchronised at both ends), alternating ours, HF, HF, ours,
... in one process so that noise (a busy CPU, GPU clocks) hits both alike; reported as medians and ratios.

MFU = tokens/s x `GPT.flops_per_token(seq_len)` (6 per weight + 12 L H D T attention, the PaLM estimate;
the same count for both sides, which compute the same function) / the device's peak:
  CUDA  the dense bf16 tensor-core datasheet peak for the device name (`byollm.train.perf.gpu_peak_flops`,
        e.g. 989 TFLOP/s for H100 SXM and H200), whatever --dtype is, as papers quote MFU;
  CPU   matmul rates measured in this run (F.linear on n x n, best of 5, at the start and the end, best kept),
        for fp32 and for bf16: MFU is reported against both.

TF32: fp32 matmuls on CUDA are left as PyTorch's settings have them (by default not TF32) unless --tf32 is
given (note that `byollm train` itself turns TF32 on for CUDA). It matters only with --dtype fp32 (under bf16
autocast the matmuls are bf16). The setting used is in the output.

Peak GPU memory per side (CUDA) = that side's persistent state (weights and AdamW moments) + the most memory
its steps allocated on top of what was resident when they started (activations, gradients, temporaries):
what the side would need if it were alone on the GPU. The process's overall peak (both sides resident) is
reported too.

If torch.compile fails for a side, the error is reported and that side runs eager (the output says so).
The last line printed is a one-line JSON summary; --json writes everything (every round's time) to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported from the tests
sys.path.append(str(Path(__file__).resolve().parents[1]))  # byollm from this checkout when it is not installed

from common import DTYPES, load_average, machine_info, matmul_peak, table, warn_if_busy, write_json  # noqa: E402

from byollm.model import GPT, preset  # noqa: E402
from byollm.train.config import TrainConfig  # noqa: E402
from byollm.train.loop import CausalLM, Trainer, seed_everything  # noqa: E402
from byollm.train.optim import build_training_optimizer  # noqa: E402
from byollm.train.perf import gpu_peak_flops  # noqa: E402

GPU_DEFAULTS = dict(preset="gpt2-124m", batch_size=16, seq_len=1024, dtype="bf16", compile=True, steps=30,
                    warmup=3, steps_per_round=5)
CPU_DEFAULTS = dict(preset="llama-nano", batch_size=16, seq_len=256, dtype="fp32", compile=False, steps=10,
                    warmup=2, steps_per_round=1)
SIDES = ("ours", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--preset", help="model preset (default: gpt2-124m on CUDA, llama-nano on CPU)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence, at most the preset's block_size "
                   "(default: 1024 on CUDA, 256 on CPU, capped at block_size)")
    p.add_argument("--dtype", choices=list(DTYPES), help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile both models (default: on for CUDA, off for CPU)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per side (default: 30 on CUDA, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per side after the first (compiling) step "
                   "(default: 3 on CUDA, 2 on CPU)")
    p.add_argument("--steps-per-round", type=int, help="steps timed together before switching sides "
                   "(default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 for fp32 matmuls (default: leave "
                   "PyTorch's setting as it is)")
    p.add_argument("--threads", type=int, help="CPU: torch intra-op threads (default: torch's)")
    p.add_argument("--peak-max-n", type=int, default=2048, help="CPU: largest n for the measured matmul peak")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write all results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    block_size = preset(args.preset).block_size
    if args.seq_len > block_size:
        if "--seq-len" in (argv if argv is not None else sys.argv):
            p.error(f"--seq-len {args.seq_len} is longer than {args.preset}'s block_size {block_size}")
        args.seq_len = block_size
    for name in ("batch_size", "seq_len", "steps", "steps_per_round"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# --------------------------------------------------------------------------------------------------
# What the two Trainers are given
# --------------------------------------------------------------------------------------------------


class FixedBatches:
    """A BatchSource that returns the same (x, y) every step: random tokens, already on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.batch = (x, y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class HFCausalLM:
    """The Objective for a transformers causal LM: the same loss as our GPT computes (mean cross-entropy of
    the fp32-cast logits over all positions), with no KV cache."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=self.ignore_index)
        return loss, {"tokens": y.numel()}


def hf_peer(ours: GPT) -> nn.Module:
    """transformers' model of our config with our weights, SDPA attention, in training mode."""
    try:
        from byollm.interop.hf import to_hf_model

        hf = to_hf_model(ours)
    except ImportError as e:
        raise SystemExit(f"the transformers peer needs `pip install -e '.[hf]'` ({e})") from e
    if getattr(hf.config, "_attn_implementation", None) != "sdpa":
        if hasattr(hf, "set_attn_implementation"):
            hf.set_attn_implementation("sdpa")
        else:
            hf.config._attn_implementation = "sdpa"
    return hf.train()


@dataclass
class Side:
    name: str
    model: nn.Module
    trainer: Trainer
    compiled: bool  # torch.compile asked for and working
    compile_s: float = float("nan")  # the first step: tracing + compiling + one step's run
    compile_error: str | None = None
    graph_breaks: int | None = None
    first_loss: float = float("nan")
    round_s: list[float] = field(default_factory=list)  # seconds per step, one entry per timed round
    step_peak_bytes: int = 0  # most memory a step allocated above what was resident before it (CUDA)

    def step(self) -> torch.Tensor:
        loss, _, _ = self.trainer.forward_backward()
        self.trainer.optimizer_step()
        return loss

    def state_bytes(self) -> int:
        """Weights + optimizer state (AdamW's two moments): what stays resident between steps."""
        tensors = {id(p): p for p in self.model.parameters()}
        for state in self.trainer.optimizer.state.values():
            tensors.update({id(v): v for v in state.values() if isinstance(v, torch.Tensor)})
        return sum(t.numel() * t.element_size() for t in tensors.values())


def build_side(name: str, model: nn.Module, objective: Any, batches: FixedBatches, cfg: TrainConfig,
               device: torch.device, autocast: torch.dtype | None) -> Side:
    optimizer, scheduler = build_training_optimizer(model, cfg, cfg.max_steps, device.type)
    trainer = Trainer(model, objective, batches, optimizer, scheduler, cfg, device=device, autocast_dtype=autocast,
                      compile=cfg.compile, seed=cfg.seed, progress=False)
    model.train()
    return Side(name, model, trainer, compiled=cfg.compile)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_break_count() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - very old torch
        return 0
    return sum(counters["graph_break"].values())


def first_step(side: Side, device: torch.device) -> None:
    """The first step: compiles when asked. If compiling fails, say so and fall back to eager for this side."""
    breaks = graph_break_count()
    start = time.perf_counter()
    try:
        side.first_loss = side.step().item()
    except Exception as e:
        if not side.compiled:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        side.compile_error = f"{type(e).__name__}: {msg}"[:500]
        print(f"  {side.name}: torch.compile FAILED ({side.compile_error}); this side runs EAGER from here on",
              flush=True)
        traceback.print_exc(limit=4, file=sys.stdout)
        side.compiled = False
        side.trainer.train_model = side.model  # what the Trainer runs: the plain module
        side.trainer.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        side.first_loss = side.step().item()
    sync(device)
    side.compile_s = time.perf_counter() - start
    if side.compiled:
        side.graph_breaks = graph_break_count() - breaks
        print(f"  {side.name}: compiled in {side.compile_s:.1f} s (first step, including its run); "
              f"graph breaks: {side.graph_breaks}", flush=True)
    else:
        print(f"  {side.name}: first step {side.compile_s:.2f} s (eager)", flush=True)
    if not math.isfinite(side.first_loss):
        raise RuntimeError(f"{side.name}: the first loss is {side.first_loss}")


def timed_rounds(sides: list[Side], rounds: int, per_round: int, device: torch.device, record: bool) -> None:
    """`rounds` rounds of `per_round` steps per side, alternating the order every round (A B, B A, ...)."""
    cuda = device.type == "cuda"
    loss = None
    for i in range(rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            for _ in range(per_round):
                loss = side.step()
            sync(device)
            seconds = time.perf_counter() - start
            if not record:
                continue
            side.round_s.append(seconds / per_round)
            if cuda:
                side.step_peak_bytes = max(side.step_peak_bytes, torch.cuda.max_memory_allocated(device) - before)
    last = loss.item() if loss is not None else 0.0
    if not math.isfinite(last):
        raise RuntimeError(f"the training loss became {last}: lower lr or use --dtype fp32")


# --------------------------------------------------------------------------------------------------
# Peaks and MFU
# --------------------------------------------------------------------------------------------------


def cpu_peaks(max_n: int, peaks: dict[str, Any]) -> None:
    """Measured fp32 and bf16 matmul FLOP/s, keeping the best of this and any earlier measurement."""
    for dt in ("fp32", "bf16"):
        peak = matmul_peak(DTYPES[dt], max_n=max_n)
        if dt not in peaks or peak["flops"] > peaks[dt]["flops"]:
            peaks[dt] = peak


def device_peaks(device: torch.device, args: argparse.Namespace, peaks: dict[str, Any]) -> None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        peaks["bf16_datasheet"] = {"flops": flops, "source": f"{name}: dense bf16 tensor-core datasheet peak"
                                   if flops else f"unknown GPU {name!r}: add it to byollm.train.perf.GPU_BF16_PEAK"}
    elif device.type == "cpu":
        cpu_peaks(args.peak_max_n, peaks)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    elif args.tf32:
        print("note: --tf32 only applies to CUDA; ignored")
    autocast = None if args.dtype == "fp32" else DTYPES[args.dtype]
    started = time.perf_counter()

    results: dict[str, Any] = {"benchmark": "train", "machine": machine_info(), "args": vars(args), "peaks": {}}
    m = results["machine"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                 tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        print(f"{props.name} ({m['gpu_memory_gb']} GiB), CUDA {torch.version.cuda}; torch {m['torch']}, "
              f"transformers {m['transformers']}; TF32 for fp32 matmuls: {m['tf32_matmul']}; {m['date']}")
    else:
        print(f"{m['cpu']}, {m['cores']} cores, {torch.get_num_threads()} threads, {m['cpu_capability']}, bf16 "
              f"hardware: {m['bf16_hardware']}; torch {m['torch']}, transformers {m['transformers']}; {m['date']}")
        warn_if_busy(torch.get_num_threads())
    device_peaks(device, args, results["peaks"])

    # The two models: same config, same weights; the same random batch, the same training config.
    model_cfg = preset(args.preset, attention="sdpa", dropout=0.0)
    seed_everything(args.seed)
    ours = GPT(model_cfg).to(device)
    theirs = hf_peer(ours)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    batches = FixedBatches(x, y)
    total_steps = 1 + args.warmup + args.steps
    cfg = TrainConfig(batch_size=args.batch_size, block_size=args.seq_len, compile=args.compile, dtype=args.dtype,
                      max_steps=total_steps, warmup_steps=min(100, total_steps // 10), seed=args.seed)
    sides = [build_side("ours", ours, CausalLM(), batches, cfg, device, autocast),
             build_side("hf", theirs, HFCausalLM(), batches, cfg, device, autocast)]
    tokens = args.batch_size * args.seq_len
    flops_per_token = ours.flops_per_token(args.seq_len)
    hf_class = type(theirs).__name__
    attn = getattr(theirs.config, "_attn_implementation", "?")
    print(f"{args.preset} ({ours.num_params() / 1e6:.1f}M params) vs transformers {hf_class} (attn {attn}); "
          f"batch {args.batch_size} x {args.seq_len}, {args.dtype}"
          f"{' autocast' if autocast else ''}, compile {'on' if args.compile else 'off'}; random tokens", flush=True)

    # First step (compiles), warm-up, then the timed rounds, interleaved.
    print("first step (compiling, when asked) ...", flush=True)
    for side in sides:
        first_step(side, device)
    per_round = min(args.steps_per_round, args.steps)
    rounds = max(1, math.ceil(args.steps / per_round))
    warm_rounds = math.ceil(args.warmup / per_round) if args.warmup else 0
    timed_rounds(sides, warm_rounds, per_round, device, record=False)
    print(f"timing {rounds} rounds of {per_round} step(s) per side, alternating ...", flush=True)
    timed_rounds(sides, rounds, per_round, device, record=True)
    if device.type == "cpu":
        cpu_peaks(args.peak_max_n, results["peaks"])  # again at the end; the best is kept

    # Report.
    peaks = results["peaks"]
    rows, per_side = [], {}
    for side in sides:
        sec = statistics.median(side.round_s)
        tok_s = tokens / sec
        r: dict[str, Any] = {
            "side": side.name, "model": "byollm GPT" if side.name == "ours" else hf_class,
            "compiled": side.compiled, "tokens_per_s": tok_s, "ms_per_step": 1e3 * sec,
            "ms_per_step_best": 1e3 * min(side.round_s), "ms_per_step_mean": 1e3 * statistics.fmean(side.round_s),
            "first_step_s": side.compile_s, "graph_breaks": side.graph_breaks, "compile_error": side.compile_error,
            "first_loss": side.first_loss, "round_s": side.round_s,
        }
        achieved = tok_s * flops_per_token
        if device.type == "cuda":
            peak = peaks["bf16_datasheet"]["flops"]
            r["mfu"] = achieved / peak if peak else None
            r["peak_mem_gb"] = (side.state_bytes() + side.step_peak_bytes) / 1e9
        else:
            for dt in ("fp32", "bf16"):
                r[f"mfu_vs_{dt}_peak"] = achieved / peaks[dt]["flops"] if dt in peaks else None
        per_side[side.name] = r
        rows.append(r)
    ratio = per_side["ours"]["tokens_per_s"] / per_side["hf"]["tokens_per_s"]
    ratio_best = per_side["hf"]["ms_per_step_best"] / per_side["ours"]["ms_per_step_best"]
    results.update(ours=per_side["ours"], hf=per_side["hf"], ratio_ours_over_hf=ratio, ratio_best=ratio_best,
                   tokens_per_step=tokens, flops_per_token=flops_per_token, params=ours.num_params(),
                   hf_class=hf_class, hf_attn_implementation=attn,
                   loss_diff_first_step=abs(per_side["ours"]["first_loss"] - per_side["hf"]["first_loss"]))
    if device.type == "cuda":
        results["process_peak_mem_gb"] = torch.cuda.max_memory_reserved(device) / 1e9

    columns = ["side", "model", "compiled", "tokens_per_s", "ms_per_step", "ms_per_step_best"]
    columns += ["mfu", "peak_mem_gb"] if device.type == "cuda" else ["mfu_vs_fp32_peak", "mfu_vs_bf16_peak"]
    columns += ["first_step_s", "first_loss"]
    print(f"\n== training step (Trainer.forward_backward + optimizer_step, AdamW), {args.preset}, batch "
          f"{args.batch_size} x {args.seq_len}, {args.dtype}, compile {'on' if args.compile else 'off'}, "
          f"{device.type} ==")
    print(table(rows, columns))
    print(f"ours / HF tokens/s: {ratio:.3f} (medians of {rounds} interleaved rounds; fastest rounds: {ratio_best:.3f})")
    print(f"first-step |loss ours - loss HF|: {results['loss_diff_first_step']:.2e} (same weights and batch)")
    for side in sides:
        if side.compile_error:
            print(f"NOTE: torch.compile failed for {side.name}; it ran EAGER: {side.compile_error}")
    if device.type == "cuda":
        src = peaks["bf16_datasheet"]["source"]
        peak = peaks["bf16_datasheet"]["flops"]
        print(f"MFU vs {peak / 1e12:,.0f} TFLOP/s ({src})" if peak else f"MFU unknown: {src}")
        print(f"peak_mem_gb: that side's weights + AdamW state + its steps' peak allocation on top; whole process "
              f"(both sides resident): {results['process_peak_mem_gb']:.1f} GB reserved")
    else:
        print("MFU vs matmul peaks measured here: " + ", ".join(
            f"{dt} {p['flops'] / 1e9:,.1f} GFLOP/s ({p['n']}^3)" for dt, p in peaks.items()))
    if args.compile:
        print("first_step_s with compile: tracing + Inductor code generation + one step; the side compiled first "
              "(ours) also pays Inductor's one-time start-up in this process, and a warm on-disk cache shortens both")
    print(f"flops/token {flops_per_token:.3e} (GPT.flops_per_token({args.seq_len})); random-token batches "
          "(throughput only)")
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["load_average_1min_at_end"] = load_average()
    print(f"total {results['elapsed_s']:.0f} s")

    summary = {
        "benchmark": "bench_train", "device": m.get("gpu", m["cpu"]), "torch": m["torch"],
        "transformers": m["transformers"], "preset": args.preset,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype, "compile": args.compile,
        "compiled": {s.name: s.compiled for s in sides}, "tf32": bool(m.get("tf32_matmul", False)),
        **{f"{s}_tokens_per_s": round(per_side[s]["tokens_per_s"], 1) for s in SIDES},
        **{f"{s}_ms_per_step": round(per_side[s]["ms_per_step"], 3) for s in SIDES},
        "ratio_ours_over_hf": round(ratio, 4),
    }
    for s in SIDES:
        for key in ("mfu", "mfu_vs_fp32_peak", "mfu_vs_bf16_peak", "peak_mem_gb", "first_step_s"):
            if per_side[s].get(key) is not None:
                summary[f"{s}_{key}"] = round(per_side[s][key], 4)
    summary["elapsed_s"] = round(results["elapsed_s"], 1)
    results["summary"] = summary
    if args.json_out:
        write_json(args.json_out, results)
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return results


if __name__ == "__main__":
    main()
