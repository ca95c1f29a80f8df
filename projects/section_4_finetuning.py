#!/usr/bin/env python
"""Section 4 project: full fine-tuning vs LoRA vs QLoRA vs DoRA on Alpaca, on a CPU, measured on held-out data;
then the QLoRA adapter merged, exported to Hugging Face, and loaded with PEFT.

    python projects/section_4_finetuning.py --out out/section4-finetune --threads 2     # about 15 minutes
    python projects/section_4_finetuning.py --base out/section2-align/runs/base         # skip the pretraining
    python projects/section_4_finetuning.py --quick                                      # tiny, under a minute

1. base      a small Llama-style model pretrained on English text: section 2's project's stages 1-2, reused
             (`pretrain_base`), or the checkpoint given with --base
2. finetune  SFT on Alpaca with each method, the same recipe (configs/finetune-alpaca-cpu.yaml), seed, batch,
             learning rate and number of steps: held-out assistant-token loss before/after, trainable
             parameters, time per step. QLoRA trains on the base read straight into NF4 (`load_quantized`)
3. size      the base's fp32 weights file vs the same model with its block weights in NF4 (written with
             safetensors), and the bits per quantised weight
4. interop   `merge` (what `byollm merge` runs) folds the QLoRA adapter into the fp32 base; `byollm export hf`
             writes it; transformers loads it and generates (greedy: the same tokens as ours); PEFT loads the
             UNMERGED adapter onto the exported base and gives our logits; and what merging into the fp32 base
             (instead of the NF4 weights the adapter was trained on) costs in held-out loss

OUT/report.json holds every number; the checks are printed (exit 0 either way: a missed target is a finding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from section_2_alignment import QUICK as S2_QUICK  # noqa: E402 - the section 2 project, reused
from section_2_alignment import Sizes as S2Sizes  # noqa: E402
from section_2_alignment import pretrain_base  # noqa: E402

from byollm.checkpoint import TOKENIZER_DIR, load_checkpoint, resolve_checkpoint  # noqa: E402
from byollm.data.readers import load_records  # noqa: E402
from byollm.errors import require  # noqa: E402
from byollm.finetune import load_adapter  # noqa: E402
from byollm.finetune.load import load_quantized  # noqa: E402
from byollm.finetune.nf4 import NF4Linear, model_nbytes  # noqa: E402
from byollm.finetune.recipe import METHODS, FinetuneTrainConfig, finetune, merge  # noqa: E402
from byollm.generate import generate  # noqa: E402
from byollm.interop.convert import export_checkpoint_to_hf  # noqa: E402
from byollm.interop.hf import to_hf_model  # noqa: E402
from byollm.model import resize_token_embeddings  # noqa: E402
from byollm.sampling import SamplingParams  # noqa: E402
from byollm.tokenizer import load_tokenizer  # noqa: E402
from byollm.tokenizer.chat_template import encode_prompt, end_id  # noqa: E402
from byollm.train.align import build_examples, held_out_metrics, load_align_config  # noqa: E402
from byollm.train.examples import collate_sft  # noqa: E402
from byollm.train.objectives import SFT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "finetune-alpaca-cpu.yaml"
QLORA_MARGIN = 0.02  # the target: QLoRA's held-out loss within 2% of LoRA's (relative)


@dataclass
class Sizes:
    """Everything --quick shrinks (the base's sizes are section 2's)."""

    steps: int = 200
    batch: int = 8
    max_len: int = 256
    lr: float = 1e-3  # the recipe's, for every method
    r: int = 8
    max_train: int | None = None  # all 4,050 training records
    max_val: int | None = None  # all 450 held-out records
    answer_tokens: int = 48
    parity_rows: int = 4  # held-out examples whose logits are compared with PEFT's


SMALL = Sizes(steps=4, batch=4, max_len=128, lr=5e-3, r=4, max_train=64, max_val=24, answer_tokens=8, parity_rows=2)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
    return out.float()


def dequantized(model: nn.Module) -> nn.Module:
    """The NF4 model with each 4-bit layer replaced by an fp32 nn.Linear holding its dequantised weight: the exact
    function QLoRA trained on, in a form `merge`, `export_hf` and PEFT take."""
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight = nn.Parameter(m.dequantized_weight(torch.float32), requires_grad=False)
            if m.bias is not None:
                linear.bias = nn.Parameter(m.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def with_run_vocab(model: nn.Module, tok: Any) -> nn.Module:
    """The base's embedding grown to the run's tokenizer (base + chat tokens) exactly as training grew it."""
    if tok.vocab_size > model.config.vocab_size:
        resize_token_embeddings(model, tok.vocab_size)
    return model


def step_ms(run_dir: Path) -> float | None:
    """Training time per step from the run's metrics (the loop's own clock: no evaluation, no sampling)."""
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [e for e in events if e.get("event") == "train"]
    return 1000 * train[-1]["train_seconds"] / train[-1]["step"] if train else None


def nf4_sizes(base: Path, out: Path, targets: list[str]) -> dict[str, Any]:
    """The fp32 weights file(s) vs the same model with its target layers in NF4 (written with safetensors)."""
    fp32_bytes = sum(f.stat().st_size for f in resolve_checkpoint(base)[1].glob("*.safetensors"))
    model = load_quantized(base, targets).model
    nf4_file = out / "nf4" / "model.safetensors"
    nf4_file.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(nf4_file))  # tied tensors once, as the fp32 file
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n = sum(m.in_features * m.out_features for m in layers)
    nf4_bytes = sum(t.numel() * t.element_size() for m in layers for t in m.buffers() if t is not m.bias)
    return {"fp32_file_bytes": fp32_bytes, "nf4_file_bytes": nf4_file.stat().st_size,
            "file_ratio": fp32_bytes / nf4_file.stat().st_size,
            "quantised_weights": n, "quantised_fp32_bytes": 4 * n, "quantised_nf4_bytes": nf4_bytes,
            "quantised_ratio": 4 * n / nf4_bytes, "bits_per_quantised_weight": 8 * nf4_bytes / n,
            "nf4_model_bytes_in_memory": model_nbytes(model), "nf4_file": str(nf4_file)}


def interop(base: Path, result: Any, cfg: FinetuneTrainConfig, out: Path, s: Sizes) -> dict[str, Any]:
    """Merge, export, PEFT and transformers: see the module docstring (stage 4)."""
    peft = require("peft", "finetune")
    transformers = require("transformers", "hf")
    adapter = result.checkpoint
    tok = load_tokenizer(adapter / TOKENIZER_DIR)
    device = torch.device("cpu")
    records = load_records(cfg.align.dataset)
    val, _ = build_examples("sft", tok, cfg.align, "val", records)
    collate = partial(collate_sft, pad_id=tok.pad_id or 0, max_length=cfg.align.max_len)

    def held_out(model: nn.Module) -> float:
        return held_out_metrics("sft", model.eval(), SFT(), val, collate, cfg.align.eval_batch_size, device,
                                None)["loss"]

    x = collate(val[: s.parity_rows])["input_ids"]
    report: dict[str, Any] = {"parity_tokens": int(x.numel())}

    # The merged model (fp32 base + the adapter folded in), exported to Hugging Face.
    merged_dir = merge(base, adapter, out / "merged")
    hf_dir = export_checkpoint_to_hf(merged_dir, out / "merged-hf")
    merged = load_checkpoint(merged_dir).model.eval()
    report["held_out_loss_merged_into_fp32_base"] = held_out(merged)

    # PEFT: the unmerged adapter on the exported fp32 base vs ours (the same base, the adapter on top).
    ours = with_run_vocab(load_checkpoint(base).model, tok)
    hf_base = to_hf_model(ours)
    before = logits(ours.eval(), x)
    load_adapter(ours, adapter)
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(adapter)).eval()
    ref = logits(ours.eval(), x)
    report["adapter_effect_max_abs"] = (ref - before).abs().max().item()  # what the parity is about: not zero
    report["peft_vs_ours_max_abs_diff"] = (logits(peft_model, x) - ref).abs().max().item()
    report["merged_vs_unmerged_max_abs_diff"] = (logits(merged, x) - ref).abs().max().item()

    # The function QLoRA trained: the NF4 base (dequantised) + the adapter; PEFT on its export gives it too.
    trained = with_run_vocab(dequantized(load_quantized(base, cfg.lora.targets).model), tok)
    hf_nf4 = to_hf_model(trained)
    load_adapter(trained, adapter)
    peft_nf4 = peft.PeftModel.from_pretrained(hf_nf4, str(adapter)).eval()
    diff = logits(peft_nf4, x) - logits(trained.eval(), x)
    report["peft_vs_ours_on_nf4_base_max_abs_diff"] = diff.abs().max().item()
    report["held_out_loss_on_nf4_base"] = held_out(trained)
    report["held_out_loss_qlora_run"] = result.after["loss"]

    # transformers loads the merged export and generates: greedy, the same tokens as our generate.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    prompt = cfg.align.sample_prompts[0] if cfg.align.sample_prompts else "Give three tips for staying healthy."
    ids = encode_prompt(tok, [{"role": "user", "content": prompt}])
    stop = end_id(tok)
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([ids]), max_new_tokens=s.answer_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tok.pad_id or 0)[0, len(ids):].tolist()
    our_ids = generate(merged, [ids], SamplingParams(max_new_tokens=s.answer_tokens, temperature=0.0,
                                                     stop_token_ids=(stop,))).token_ids[0]
    report.update(hf_dir=str(hf_dir), merged_dir=str(merged_dir), prompt=prompt,
                  transformers_answer=tok.decode([t for t in hf_ids if t != stop]).strip(),
                  transformers_tokens=len(hf_ids), greedy_tokens_match=hf_ids == our_ids)
    return report


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (under a minute; the tests)")
    parser.add_argument("--small", dest="quick", action="store_true", help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--base", type=Path, default=None, help="start from this checkpoint instead of pretraining")
    parser.add_argument("--out", type=Path, default=Path("out/section4-finetune"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = SMALL if args.quick else Sizes()
    out = args.out.resolve()
    runs = out / "runs"
    if any(p.exists() for p in (runs / "base", *(runs / m for m in METHODS))):
        raise SystemExit(f"{runs} already holds runs; choose another --out or delete it")
    progress = not args.quick
    report: dict[str, Any] = {"quick": args.quick, "sizes": vars(s), "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "stages": {}}
    t_all = time.perf_counter()

    def stage(name: str, t0: float, **numbers: Any) -> None:
        report["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1), **numbers}
        print(f"=== {name}: {json.dumps(report['stages'][name], default=str)}", file=sys.stderr, flush=True)

    # 1. The base.
    t0 = time.perf_counter()
    if args.base is None:
        pretrained, _ = pretrain_base(out, S2_QUICK if args.quick else S2Sizes(), args.quick, progress)
        base = pretrained.run_dir
        stage("base", t0, pretrained=True, val_loss=pretrained.val.get("loss"), run=str(base))
    else:
        base = args.base.resolve()
        stage("base", t0, pretrained=False, run=str(base))
    base_params = load_checkpoint(base).model.num_params()

    # 2. The same SFT run with each method.
    results: dict[str, Any] = {}
    configs: dict[str, FinetuneTrainConfig] = {}
    for method in METHODS:
        t0 = time.perf_counter()
        configs[method] = cfg = load_align_config(RECIPE, {
            "method": method, "name": method, "out_dir": str(runs), "align.base": str(base), "seed": 0,
            "max_steps": s.steps, "batch_size": s.batch, "lr": s.lr, "min_lr": s.lr / 10,
            "warmup_steps": max(1, s.steps // 10), "align.max_len": s.max_len, "align.max_train": s.max_train,
            "align.max_val": s.max_val, "lora.r": s.r, "lora.alpha": 2.0 * s.r, "sample_tokens": s.answer_tokens,
        }, cls=FinetuneTrainConfig)
        results[method] = r = finetune(cfg, progress=progress)
        if method == "full":
            trainable = total = load_checkpoint(r.run_dir).model.num_params()
        else:
            meta = json.loads((r.checkpoint / "finetune.json").read_text())
            trainable, total = meta["trainable_params"], meta["total_params"]
        stage(method, t0, held_out_loss_before=r.before["loss"], held_out_loss_after=r.after["loss"],
              examples=r.after["examples"], tokens=r.after["tokens"], trainable_params=trainable,
              params=total, trainable_fraction=trainable / total, step_ms=step_ms(r.run_dir),
              train_seconds=r.seconds, sample=r.samples[0] if r.samples else None, data=r.data)

    # 3. Model size: fp32 vs NF4.
    t0 = time.perf_counter()
    stage("size", t0, **nf4_sizes(base, out, configs["qlora"].lora.targets))

    # 4. Merge, export, PEFT, transformers.
    t0 = time.perf_counter()
    stage("interop", t0, **interop(base, results["qlora"], configs["qlora"], out, s))

    # The checks.
    st = report["stages"]
    lora, qlora = st["lora"]["held_out_loss_after"], st["qlora"]["held_out_loss_after"]
    report["qlora_vs_lora_relative"] = abs(qlora - lora) / lora
    report["nf4_cost_before_training"] = st["qlora"]["held_out_loss_before"] - st["lora"]["held_out_loss_before"]
    io = st["interop"]
    report["checks"] = {
        **{f"{m}_lowers_held_out_loss": st[m]["held_out_loss_after"] < st[m]["held_out_loss_before"] for m in METHODS},
        f"qlora_within_{QLORA_MARGIN:.0%}_of_lora": report["qlora_vs_lora_relative"] <= QLORA_MARGIN,
        "nf4_weights_over_5x_smaller": st["size"]["quantised_ratio"] > 5,
        "peft_logits_match_1e-4": io["peft_vs_ours_max_abs_diff"] < 1e-4
        and io["peft_vs_ours_on_nf4_base_max_abs_diff"] < 1e-4,
        "merged_equals_unmerged_1e-4": io["merged_vs_unmerged_max_abs_diff"] < 1e-4,
        "nf4_base_plus_adapter_reproduces_the_run": abs(io["held_out_loss_on_nf4_base"] - qlora) < 1e-4,
        "transformers_generates_our_tokens": io["greedy_tokens_match"] and io["transformers_tokens"] > 0,
    }
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["load_after"] = os.getloadavg()
    report["base_params"] = base_params
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    rows = [["method", "trainable params", "trainable %", "held-out loss before", "after", "ms / step"]]
    for m in METHODS:
        x = st[m]
        rows.append([m, f"{x['trainable_params']:,}", f"{100 * x['trainable_fraction']:.2f}",
                     f"{x['held_out_loss_before']:.4f}", f"{x['held_out_loss_after']:.4f}", f"{x['step_ms']:.0f}"])
    size = st["size"]
    print(f"Alpaca SFT, {s.steps} steps x batch {s.batch}, lr {s.lr:g}, r={s.r}, seed 0; held-out assistant-token "
          f"loss on {st['lora']['examples']} records ({st['lora']['tokens']:.0f} tokens); base {base_params:,} "
          "parameters")
    print(table(rows))
    print(f"|QLoRA - LoRA| / LoRA = {report['qlora_vs_lora_relative']:.4f} (target <= {QLORA_MARGIN}); the NF4 base "
          f"before training: {report['nf4_cost_before_training']:+.4f} loss vs the fp32 base")
    print(f"size: weights file fp32 {size['fp32_file_bytes']:,} B -> NF4 {size['nf4_file_bytes']:,} B "
          f"({size['file_ratio']:.2f}x); the {size['quantised_weights']:,} quantised weights "
          f"{size['quantised_fp32_bytes']:,} -> {size['quantised_nf4_bytes']:,} B ({size['quantised_ratio']:.2f}x, "
          f"{size['bits_per_quantised_weight']:.3f} bits per weight)")
    print(f"interop: the adapter moves logits by up to {io['adapter_effect_max_abs']:.3f}; PEFT vs ours max |dlogit| "
          f"{io['peft_vs_ours_max_abs_diff']:.2e} (fp32 base), "
          f"{io['peft_vs_ours_on_nf4_base_max_abs_diff']:.2e} (NF4 base); merged vs unmerged "
          f"{io['merged_vs_unmerged_max_abs_diff']:.2e}; held-out loss: QLoRA run {qlora:.4f}, adapter on the "
          f"dequantised NF4 base {io['held_out_loss_on_nf4_base']:.4f}, merged into the fp32 base "
          f"{io['held_out_loss_merged_into_fp32_base']:.4f}")
    print(f"transformers on {Path(io['hf_dir']).name}/ (greedy, {io['transformers_tokens']} tokens, same as ours: "
          f"{io['greedy_tokens_match']}): {io['prompt']!r} -> {io['transformers_answer'][:160]!r}")
    checks = report["checks"]
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    print(f"report: {out / 'report.json'}; {sum(checks.values())} of {len(checks)} checks met in "
          f"{report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
