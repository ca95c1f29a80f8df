"""Parameter-efficient fine-tuning: LoRA and DoRA adapters (PEFT-compatible files), NF4 and Q4_1 layers for QLoRA."""

from byollm.finetune.lora import (
    ATTENTION,
    MLP,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_and_unload,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from byollm.finetune.nf4 import NF4Linear, QLoRALinear, dequantize_nf4, quantize_model, quantize_nf4
from byollm.finetune.q4 import Q4_1Linear, dequantize_q4_1, quantize_q4_1

__all__ = [
    "ATTENTION", "MLP", "LoRALinear", "NF4Linear", "Q4_1Linear", "QLoRALinear", "apply_lora", "dequantize_nf4",
    "dequantize_q4_1", "load_adapter", "lora_modules", "merge_and_unload", "merge_lora", "quantize_model",
    "quantize_nf4", "quantize_q4_1", "save_adapter", "trainable_parameters", "unmerge_lora",
]
