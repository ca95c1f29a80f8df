"""`byollm finetune` and `byollm merge`: the SFT recipe (byollm.train.align) with a full, LoRA, QLoRA or DoRA model.

    byollm finetune runs/base --method lora  --data alpaca --config configs/finetune-alpaca-cpu.yaml
    byollm finetune runs/base --method qlora --data alpaca --lora.r 8
    byollm merge runs/base runs/finetune-.../adapter runs/merged      # a normal checkpoint again
    byollm export hf runs/merged hf-merged

The recipe is SFT's (load, chat tokens, examples, held-out loss before/after, the one Trainer, samples); only the
model changes, through `ModelHooks`:

    full   every parameter trains; the run saves normal checkpoints (as `byollm sft`)
    lora   apply_lora on `lora.targets`, base frozen; the run saves the adapter (PEFT format) in <run>/adapter/
    dora   the same with use_dora (a trained magnitude per output feature)
    qlora  the base is read straight into NF4 (`load_quantized`, never in fp32 as a whole) and QLoRA adapters go
           on the 4-bit layers; the adapter is saved the same way and merges into the fp32 base.
           `lora.quant_type q4_1` stores the base in llama.cpp's Q4_1 instead: for a model imported from a Q4_1
           GGUF file, exactly the file's weights (NF4 would round them a second time; see finetune/q4.py)

The adapter folder also holds the run's tokenizer (the base's, plus the chat tokens when it had no chat template)
and finetune.json (method, base, trainable parameters). `merge` grows the base's embedding to that tokenizer
exactly as training did (new rows: the mean embedding), puts the adapter on and folds it in.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byollm.checkpoint import TOKENIZER_DIR, load_checkpoint, save_checkpoint
from byollm.config import Section
from byollm.errors import ConfigError
from byollm.finetune.load import QUANT_TYPES, load_quantized
from byollm.finetune.lora import (
    ATTENTION,
    MLP,
    apply_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
)
from byollm.finetune.nf4 import NF4Linear, QLoRALinear, quantize_model
from byollm.finetune.q4 import Q4_1Linear
from byollm.model import GPT, resize_token_embeddings
from byollm.tokenizer import Tokenizer, load_tokenizer
from byollm.train.align import AlignResult, ModelHooks, SFTTrainConfig, align
from byollm.train.perf import return_large_frees_to_os

METHODS = ("full", "lora", "qlora", "dora")
FINETUNE_META = "finetune.json"


@dataclass
class LoRASettings(Section):
    """The adapter of lora, dora and qlora (`lora.*`; full fine-tuning has none)."""

    r: int = 8
    """rank of the low-rank update B @ A"""
    alpha: float = 16.0
    """scale of the update: alpha / r"""
    dropout: float = 0.0
    """dropout on the adapter's input while training"""
    targets: list[str] = field(default_factory=lambda: list(ATTENTION + MLP))
    """module-name suffixes that get adapters (q_proj, k_proj, ..., down_proj)"""
    double_quant: bool = True
    """qlora: quantise the NF4 block scales to 8 bits as well"""
    quant_backend: str = "byollm"
    """qlora: byollm (our NF4Linear / Q4_1Linear) or bitsandbytes (its Linear4bit, nf4)"""
    quant_type: str = "nf4"
    """qlora: the frozen base's 4-bit format: nf4 (QLoRA's) or q4_1 (llama.cpp's: a model imported from a Q4_1
    GGUF keeps exactly its file's weights)"""

    def check(self) -> None:
        if self.quant_backend not in ("byollm", "bitsandbytes"):
            raise ConfigError(f"unknown lora.quant_backend {self.quant_backend!r}; choose byollm or bitsandbytes")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"unknown lora.quant_type {self.quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
        if self.quant_backend == "bitsandbytes" and self.quant_type != "nf4":
            raise ConfigError("lora.quant_backend bitsandbytes quantises to nf4 only; use lora.quant_type nf4, or "
                              "lora.quant_backend byollm for q4_1")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"need lora.r >= 1, lora.alpha > 0 and 0 <= lora.dropout < 1, got {self.r}, "
                              f"{self.alpha}, {self.dropout}")


@dataclass
class FinetuneTrainConfig(SFTTrainConfig):
    """An SFT run (SFTTrainConfig) plus the fine-tuning method and its adapter settings."""

    method: str = "lora"
    """full (every weight), lora, dora, or qlora (the base read straight into NF4)"""
    lora: LoRASettings = field(default_factory=LoRASettings)
    """the adapter (lora, dora, qlora)"""

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")


def _report(method: str, model: nn.Module) -> dict[str, Any]:
    trainable, total = trainable_parameters(model)
    # Count 4-bit weights as the weights they stand for (the fp32 model's count): ours are buffers (not counted
    # yet); bitsandbytes' Linear4bit holds a packed uint8 parameter of half as many elements (counted as that).
    for m in model.modules():
        if isinstance(m, (NF4Linear, Q4_1Linear)):
            total += m.in_features * m.out_features
        elif type(m).__name__ == "Linear4bit":
            total += m.in_features * m.out_features - m.weight.numel()
    print(f"[byollm] finetune {method}: training {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)", file=sys.stderr, flush=True)
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total}


def finetune(cfg: FinetuneTrainConfig, *, progress: bool = True) -> AlignResult:
    """SFT with the chosen method (see the module docstring). Returns the SFT recipe's result; its `checkpoint`
    is the adapter folder for lora/dora/qlora, the run's checkpoint for full."""
    s, method = cfg.lora, cfg.method
    info: dict[str, Any] = {}
    return_large_frees_to_os()  # per-step temporaries would otherwise ratchet the heap up (see its docstring)

    def adapt(model: GPT) -> nn.Module:
        if method in ("lora", "dora"):
            apply_lora(model, s.r, s.alpha, s.dropout, targets=s.targets, use_dora=method == "dora")
        elif method == "qlora":  # the layers are 4-bit already (load_quantized); adapters on top, all else frozen
            for p in model.parameters():
                p.requires_grad_(False)
            for name, m in list(model.named_modules()):
                if isinstance(m, (NF4Linear, Q4_1Linear)) or type(m).__name__ == "Linear4bit":  # ours or bnb'
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child,
                            QLoRALinear(m, m.in_features, m.out_features, r=s.r, alpha=s.alpha, dropout=s.dropout,
                                        compute_dtype=m.compute_dtype))
        info.update(_report(method, model))
        return model

    def load(base: str, device: Any) -> Any:
        if s.quant_backend == "bitsandbytes":  # bitsandbytes quantises a loaded fp32 model (Params4bit.to)
            loaded = load_checkpoint(base, device=device)
            quantize_model(loaded.model, s.targets, backend="bitsandbytes", double_quant=s.double_quant)
            return loaded
        return load_quantized(base, s.targets, double_quant=s.double_quant, quant_type=s.quant_type, device=device)

    def save(model: nn.Module, run_dir: Path, tokenizer: Tokenizer) -> Path:
        out = save_adapter(model, run_dir / "adapter")
        tokenizer.save(out / TOKENIZER_DIR)
        (out / FINETUNE_META).write_text(json.dumps(
            {"method": method, "base": cfg.align.base, "dataset": cfg.align.dataset, "steps": cfg.max_steps,
             "lora": dataclasses.asdict(s), **info}, indent=2) + "\n")
        return out

    hooks = ModelHooks(load=load if method == "qlora" else None, adapt=adapt,
                       save=None if method == "full" else save, label="finetune")
    return align(cfg, "sft", progress=progress, hooks=hooks)


def merge(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """The base model (fp32) with the adapter folded into its weights, written as a normal checkpoint."""
    loaded = load_checkpoint(base)
    model, tok = loaded.model, loaded.tokenizer
    adapter = Path(adapter)
    if (adapter / TOKENIZER_DIR).is_dir():  # the run's tokenizer: the base's (+ any chat tokens added)
        tok = load_tokenizer(adapter / TOKENIZER_DIR)
        if tok.vocab_size > model.config.vocab_size:
            resize_token_embeddings(model, tok.vocab_size)
    load_adapter(model, adapter)
    with torch.no_grad():
        merge_and_unload(model)
    return save_checkpoint(model, out, tok, meta={"created_by": "byollm merge", "base": str(loaded.path),
                                                  "adapter": str(adapter)})


__all__ = ["FINETUNE_META", "METHODS", "FinetuneTrainConfig", "LoRASettings", "finetune", "merge"]
