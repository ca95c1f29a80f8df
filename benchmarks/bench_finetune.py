"""Fine-tuning memory and speed on a CPU: full fine-tune vs LoRA vs QLoRA, ours vs transformers + PEFT + bitsandbytes.

    python benchmarks/bench_finetune.py                                  # gpt2-124m and smollm2-135m (~4-6 min)
    python benchmarks/bench_finetune.py --presets gpt2-124m --steps 3 --json finetune.json
    python benchmarks/bench_finetune.py --presets gpt-tiny --steps 1 --in-process   # smoke run, no RSS meaning

Every (stack, method) runs in a FRESH Python process, so its peak RSS (the child's own high-water mark, VmHWM
of /proc/self/status; not `getrusage().ru_maxrss`, which Linux carries over from the parent across fork + exec)
is what that method alone needs. Nothing is subtracted; the RSS of a
process that only imported torch (and one that imported the peer stack) is reported next to it as the floor.
Every child, ours and the peer's, runs with the same allocator setting: MALLOC_MMAP_THRESHOLD_=131072 by default
(what `byollm finetune` sets in-process: glibc's dynamic threshold otherwise lets freed per-step temporaries pile
up in the heap), or glibc's default with --malloc-mmap-threshold 0.

The parent builds one random-weight model per preset (seeded), saves it twice: as a byollm checkpoint
(`save_checkpoint`) and as a Hugging Face directory (`export_hf`), so both stacks start from the same weights on
disk and pay for loading them. Each child then:

  ours   `load_checkpoint` (fp32), then
           full   every parameter trainable;
           lora   `apply_lora(r=8, alpha=16, targets=ATTENTION + MLP)`: every linear layer inside the blocks
                  (GPT-2: q/k/v/o, up/down; Llama: q/k/v/o, gate/up/down); embeddings and head frozen;
           qlora  `quantize_model(lora_r=8, alpha=16)`: the same layers become NF4 (blocks of 64, double
                  quantisation) with an fp32 adapter; embeddings/head/norms stay fp32 and frozen. The fp32 model
                  is loaded first and quantised layer by layer afterwards;
           qlora-load  the same model, read straight into NF4 tensor by tensor (`byollm.finetune.load.
                  load_quantized`: the fp32 model never exists as a whole), then a `QLoRALinear` adapter on each
                  NF4 layer;
  peer   transformers `AutoModelForCausalLM.from_pretrained` (fp32; GPT2LMHeadModel / LlamaForCausalLM), then
           full   every parameter trainable;
           lora   `peft.get_peft_model(LoraConfig(r=8, alpha=16))` on the same layers (GPT-2: c_attn, c_proj
                  (attention and MLP), c_fc; Llama: q/k/v/o, gate/up/down). HF GPT-2's q/k/v is one fused
                  layer, so its adapter count differs slightly from ours (one A of r x 768 instead of three);
           qlora  the same, on a model loaded with `BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
                  compute dtype fp32)` on the CPU (bitsandbytes `Linear4bit`). No `prepare_model_for_kbit_training`
                  (it would turn on gradient checkpointing for this side only); everything is fp32 already.

and trains `--steps` steps on one fixed random batch (batch x seq-len tokens, mean cross-entropy of all
positions, backward, AdamW lr 1e-4 over the trainable parameters, zero_grad(set_to_none)). Step time = median of
the steps after the first (all of them when there is one). Model bytes = `byollm.finetune.nf4.model_nbytes`
(parameters + buffers + bitsandbytes' quantisation state, each tensor once) after the method is applied.
Trainable fraction = trainable parameters / the fp32 model's parameter count (a 4-bit model's packed storage
would make the denominator meaningless).

The last line printed is a one-line JSON summary; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported from the tests
sys.path.append(str(Path(__file__).resolve().parents[1]))  # byollm from this checkout when it is not installed

METHODS = ("full", "lora", "qlora", "qlora-load")  # qlora-load: ours only (byollm.finetune.load.load_quantized)
STACKS = ("ours", "peer")
PEER_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["gpt2-124m", "smollm2-135m"])
    p.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="training steps per case (the first is not timed)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--malloc-mmap-threshold", type=int, default=128 * 1024, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ for EVERY child, ours and the peer alike (glibc then returns each "
                   "freed block of this size or more to the OS at once; `byollm finetune` sets the same in-process). "
                   "0: glibc's default (a dynamic threshold, freed step temporaries stay in the heap)")
    p.add_argument("--in-process", action="store_true", help="run every case in this process (tests: exercises "
                   "the code, but the RSS numbers then mean nothing)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one case (a JSON spec), print its result
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's high-water resident set size: VmHWM from /proc/self/status on Linux. Not
    `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that over fork + exec, so a child started by a parent
    holding 400 MB reports at least 400 MB whatever it does (`maxrss_getrusage` is recorded too, to show it)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, elsewhere KiB
    return peak if sys.platform == "darwin" else peak * 1024


def maxrss_getrusage() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    return (_status_kb("VmRSS") or 0) * 1024


# --------------------------------------------------------------------------------------------------
# One case (runs in a child process)
# --------------------------------------------------------------------------------------------------


def _setup_ours(method: str, ckpt: str, rank: int) -> Any:
    from byollm.checkpoint import load_checkpoint
    from byollm.finetune import ATTENTION, MLP, apply_lora, quantize_model

    model = load_checkpoint(ckpt).model
    if method == "lora":
        apply_lora(model, r=rank, alpha=16, targets=ATTENTION + MLP)
    elif method == "qlora":
        quantize_model(model, lora_r=rank, lora_alpha=16)  # its default targets: ATTENTION + MLP
    return model


def _setup_ours_nf4_load(ckpt: str, rank: int) -> Any:
    """Read the checkpoint straight into NF4, tensor by tensor (`load_quantized`), then wrap each NF4 layer in a
    `QLoRALinear` adapter: the fp32 model never exists as a whole."""
    from byollm.finetune.load import load_quantized
    from byollm.finetune.nf4 import NF4Linear, QLoRALinear

    model = load_quantized(ckpt).model
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                QLoRALinear(layer, layer.in_features, layer.out_features, r=rank, alpha=16))
    return model


def _setup_peer(method: str, hf_dir: str, rank: int, arch: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.config.use_cache = False
    if method != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=PEER_TARGETS[arch], task_type="CAUSAL_LM"))
    return model


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, apply the method, train `steps` steps on one random batch; time, parameters, bytes, peak RSS."""
    import torch
    import torch.nn.functional as F

    from byollm.finetune.nf4 import model_nbytes

    started = time.perf_counter()
    torch.manual_seed(spec["seed"])
    stack, method, rank = spec["stack"], spec["method"], spec["rank"]
    if stack == "ours" and method == "qlora-load":
        model = _setup_ours_nf4_load(spec["ckpt"], rank)
    elif stack == "ours":
        model = _setup_ours(method, spec["ckpt"], rank)
    else:
        model = _setup_peer(method, spec["hf_dir"], rank, spec["arch"])
    model.train()
    setup_s = time.perf_counter() - started
    rss_after_setup, peak_after_setup = current_rss_bytes(), peak_rss_bytes()

    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    nbytes = model_nbytes(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch_size"], spec["seq_len"])
    x = torch.randint(0, spec["vocab_size"], shape, generator=g)
    y = torch.randint(0, spec["vocab_size"], shape, generator=g)
    step_s, losses = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        if stack == "ours":
            loss = model(x, y).loss
        else:
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = step_s[1:] or step_s
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    return {"stack": stack, "method": method, "model_class": type(base).__name__,
            "trainable": trainable, "trainable_frac": trainable / spec["base_params"], "model_bytes": nbytes,
            "setup_s": setup_s, "rss_after_setup": rss_after_setup, "peak_rss_after_setup": peak_after_setup,
            "step_s": step_s, "step_s_median": statistics.median(timed), "first_loss": losses[0],
            "peak_rss": peak_rss_bytes(), "maxrss_getrusage": maxrss_getrusage()}


def baseline(imports: str, mmap_threshold: int = 0) -> dict[str, Any]:
    """Peak RSS of a fresh process that only imports `imports`: the floor under every case."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); {imports}; " \
           "import bench_finetune as b; print(json.dumps({'peak_rss': b.peak_rss_bytes(), " \
           "'maxrss_getrusage': b.maxrss_getrusage()}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_child_env(mmap_threshold))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_env(mmap_threshold: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[1]),
                                                    env.get("PYTHONPATH", "")] if p)
    return env


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=_child_env(spec.get("malloc_mmap_threshold", 0)))
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        return {"stack": spec["stack"], "method": spec["method"], "error": " | ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _mb(n: float | None) -> float:
    return float("nan") if n is None else n / 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        result = run_case(json.loads(args.child))
        print(json.dumps(result))
        return result

    import torch
    from common import machine_info, table, warn_if_busy, write_json

    from byollm.checkpoint import save_checkpoint
    from byollm.finetune.lora import trainable_parameters
    from byollm.interop.hf import export_hf
    from byollm.model import GPT, preset

    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "finetune", "machine": machine_info(), "args": vars(args), "presets": {}}
    m = results["machine"]
    import peft

    try:
        import bitsandbytes

        m["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        m["bitsandbytes"] = None
    m["peft"] = peft.__version__
    print(f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}, transformers "
          f"{m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}; {m['date']}")
    warn_if_busy(torch.get_num_threads())
    if not args.in_process:
        t = args.malloc_mmap_threshold
        print(f"allocator: MALLOC_MMAP_THRESHOLD_={t} for every child" if t else "allocator: glibc default")
        results["baseline_torch"] = baseline("import torch", t)
        results["baseline_peer"] = baseline("import torch, transformers, peft, bitsandbytes", t)
        print(f"baseline peak RSS: import torch {_mb(results['baseline_torch']['peak_rss']):.0f} MB, "
              f"+ transformers/peft/bitsandbytes {_mb(results['baseline_peer']['peak_rss']):.0f} MB", flush=True)

    import importlib.util

    if "qlora-load" in args.methods and importlib.util.find_spec("byollm.finetune.load") is None:
        print("note: this byollm has no byollm.finetune.load (loading straight into NF4): qlora-load skipped")
        args.methods = [m for m in args.methods if m != "qlora-load"]
    summary: dict[str, Any] = {}
    for name in args.presets:
        cfg = preset(name, dropout=0.0)
        arch = "gpt2" if cfg.mlp == "gelu" else "llama"
        seq_len = min(args.seq_len, cfg.block_size)
        with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
            torch.manual_seed(args.seed)
            model = GPT(cfg)
            _, base_params = trainable_parameters(model)
            ckpt, hf_dir = Path(tmp) / "ckpt", Path(tmp) / "hf"
            save_checkpoint(model, ckpt)
            if "peer" in args.stacks:
                export_hf(model, hf_dir)
            del model
            print(f"\n{name} ({base_params / 1e6:.1f}M params, {arch}), batch {args.batch_size} x {seq_len}, "
                  f"fp32, AdamW, r={args.rank}, {args.steps} steps per case", flush=True)
            rows = []
            for stack in args.stacks:
                for method in args.methods:
                    if stack == "peer" and method == "qlora-load":
                        continue  # transformers already quantises while it loads (from_pretrained + bnb)
                    spec = dict(stack=stack, method=method, ckpt=str(ckpt), hf_dir=str(hf_dir), arch=arch,
                                rank=args.rank, seed=args.seed, batch_size=args.batch_size, seq_len=seq_len,
                                steps=args.steps, vocab_size=cfg.vocab_size, base_params=base_params,
                                malloc_mmap_threshold=args.malloc_mmap_threshold)
                    r = run_case(spec) if args.in_process else run_child(spec)
                    rows.append(r)
                    print(f"  {stack:4s} {method:5s} " + (f"ERROR {r['error']}" if "error" in r else
                          f"peak RSS {_mb(r['peak_rss']):.0f} MB, step {r['step_s_median'] * 1e3:.0f} ms, "
                          f"trainable {r['trainable_frac']:.2%}"), flush=True)
        ratios = {}
        for stack in args.stacks:
            by = {r["method"]: r for r in rows if r["stack"] == stack and "error" not in r}
            if "full" in by:
                for method in ("lora", "qlora", "qlora-load"):
                    if method in by:
                        ratios[f"{stack}_{method}_over_full_peak_rss"] = by[method]["peak_rss"] / by["full"]["peak_rss"]
        results["presets"][name] = {"base_params": base_params, "arch": arch, "cases": rows, "ratios": ratios}
        print()
        print(table([{"stack": r["stack"], "method": r["method"],
                      "trainable": r.get("trainable", "-"), "trainable %": 100 * r.get("trainable_frac", float("nan")),
                      "model MB": _mb(r.get("model_bytes")), "peak RSS MB": _mb(r.get("peak_rss")),
                      "RSS after load MB": _mb(r.get("peak_rss_after_setup")),
                      "step ms": 1e3 * r.get("step_s_median", float("nan")),
                      "vs full (RSS)": ratios.get(f"{r['stack']}_{r['method']}_over_full_peak_rss", float("nan"))
                      if r["method"] != "full" else 1.0} for r in rows]))
        for key, value in ratios.items():
            if "qlora" in key:
                verdict = "meets" if value <= 0.35 else "MISSES"
                print(f"{name}: {key.rsplit('_over', 1)[0]} / full peak RSS = {value:.3f} "
                      f"({verdict} the <= 0.35 target)")
        summary[name] = {k: round(v, 4) for k, v in ratios.items()}
        summary[name].update({f"{r['stack']}_{r['method']}_trainable_frac": round(r["trainable_frac"], 5)
                              for r in rows if "error" not in r and r["method"] != "full"})
    results["summary"] = summary
    results["wall_s"] = time.perf_counter() - started
    print(f"\ntotal {results['wall_s']:.0f} s")
    if args.json_out:
        write_json(args.json_out, results)
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
