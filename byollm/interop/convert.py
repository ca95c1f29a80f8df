"""The conversion commands: byollm checkpoints <-> Hugging Face model directories.

`byollm.interop.hf` converts models in memory and reads/writes Hugging Face directories; `byollm.checkpoint` reads
and writes byollm checkpoints (and calls `interop.hf` to read a Hugging Face directory). These two functions
join the two, so they sit above both: `interop.hf` never imports `checkpoint` (no import cycle):

    convert_from_hf("out/hf-dpo", "out/ckpt")            # `byollm convert from-hf SRC CKPT`
    export_checkpoint_to_hf("runs/sft", "out/hf")         # `byollm export hf CKPT OUT_DIR`
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from byollm.checkpoint import load_checkpoint, save_checkpoint
from byollm.interop.hf import HF_CONFIG, export_hf, load_hf_dir


def convert_from_hf(src_dir: str | Path, ckpt_dir: str | Path) -> Path:
    """`byollm convert from-hf SRC CKPT`: a Hugging Face model directory -> a byollm checkpoint directory."""
    model, tokenizer = load_hf_dir(src_dir)
    model_type = json.loads((Path(src_dir) / HF_CONFIG).read_text()).get("model_type")
    return save_checkpoint(model, ckpt_dir, tokenizer,
                           meta={"source": str(Path(src_dir).resolve()), "converted_from": f"huggingface/{model_type}"})


def export_checkpoint_to_hf(ckpt_path: str | Path, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """`byollm export hf CKPT OUT_DIR`: any checkpoint path byollm accepts -> a Hugging Face model directory."""
    loaded = load_checkpoint(ckpt_path)
    return export_hf(loaded.model, out_dir, loaded.tokenizer, dtype)


__all__ = ["convert_from_hf", "export_checkpoint_to_hf"]
