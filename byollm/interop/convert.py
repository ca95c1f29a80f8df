"""The conversion commands: byollm checkpoints <-> Hugging Face model directories.

`byollm.interop.hf` converts models in memory and reads/writes Hugging Face directories; `byollm.checkpoint` reads
and writes byollm checkpoints (and calls `interop.hf` to read a Hugging Face directory). These two functions
join the two, so they sit above both: `interop.hf` never imports `checkpoint` (no import cycle):

    convert_from_hf("out/hf-dpo", "out/ckpt")            # `byollm convert from-hf SRC CKPT`
    export_checkpoint_to_hf("runs/sft", "out/hf")         # `byollm export hf CKPT OUT_DIR` (with README.md, the card)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from byollm.checkpoint import load_checkpoint, save_checkpoint
from byollm.interop.hf import HF_CONFIG, export_hf, load_hf_dir


def convert_from_hf(src_dir: str | Path, ckpt_dir: str | Path) -> Path:
    """`byollm convert from-hf SRC CKPT`: a Hugging Face model directory -> a byollm checkpoint directory."""
    from byollm.train.run import hf_dir_provenance

    model, tokenizer = load_hf_dir(src_dir)
    model_type = json.loads((Path(src_dir) / HF_CONFIG).read_text()).get("model_type")
    # What the directory's own model card says (license, base_model, datasets, language) travels with the weights:
    # an imported model keeps its licence, and a card written later for it or a fine-tune of it needs it.
    card = {k: v for k, v in hf_dir_provenance(Path(src_dir)).items() if k in ("license", "base_model", "language")}
    return save_checkpoint(model, ckpt_dir, tokenizer,
                           meta={"source": str(Path(src_dir).resolve()), "converted_from": f"huggingface/{model_type}",
                                 **card})


def export_checkpoint_to_hf(ckpt_path: str | Path, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """`byollm export hf CKPT OUT_DIR`: any checkpoint path byollm accepts -> a Hugging Face model directory, with
    the model card (README.md, `byollm.interop.model_card`) written from the checkpoint's records."""
    from byollm.atomic import atomic_write_text
    from byollm.interop.model_card import README, build_model_card

    loaded = load_checkpoint(ckpt_path)
    card = None
    if importlib.util.find_spec("huggingface_hub") is not None:  # it comes with transformers (the hf extra)
        card = build_model_card(ckpt_path, hf_dir=str(out_dir))  # before writing: a bad record fails early
    else:
        print("[byollm] no model card (README.md): it needs huggingface_hub, pip install 'byollm[hf]'", file=sys.stderr)
    out = export_hf(loaded.model, out_dir, loaded.tokenizer, dtype)
    if card is not None:
        atomic_write_text(out / README, str(card))
    return out


__all__ = ["convert_from_hf", "export_checkpoint_to_hf"]
