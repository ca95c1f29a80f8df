"""TRL interop: train an exported byollm model with the library's SFTTrainer and DPOTrainer, and come back.

The guide writes SFT and DPO by hand (`byollm.train.objectives`); this module runs the same steps with TRL
(https://huggingface.co/docs/trl) on the same data, so readers can move between the two:

    export_hf(model, "out/hf", tok)                           # byollm -> a Hugging Face directory
    trl_sft("out/hf", conversations, "out/hf-sft", steps=100) # TRL's SFTTrainer
    trl_dpo("out/hf-sft", pairs, "out/hf-dpo", steps=100)     # TRL's DPOTrainer
    convert_from_hf("out/hf-dpo", "out/ckpt")                 # back to a byollm checkpoint (`byollm chat`)

The data goes over in TRL's *conversational* formats, so TRL renders it with our chat template (the
tokenizer's `chat_template`, written by `export_hf`):
- SFT: one column "messages" (a list of {"role", "content"}). With `assistant_only_loss=True` (the default
  here) TRL trains only on the tokens inside the template's `{% generation %}` blocks: each assistant reply
  and its closing <|end|>, exactly the tokens our `encode_chat` labels. Our template carries those blocks
  already (they change no ids), so TRL uses it as is instead of swapping in a "training template", and its
  check that the end-of-turn token is trained passes. The loss is the mean over trained tokens of the batch.
- DPO: "prompt" (the messages before the reply), "chosen" and "rejected" (each one assistant message).
  TRL renders the prompt with the generation prompt (ending with <|assistant|>) and takes the completion as
  what follows it in the rendered prompt + reply: our `encode_prompt` + `encode_response`.

Everything runs from local directories (nothing is downloaded) and in fp32: TRL's configs turn bf16 autocast
and activation checkpointing on by default; here both are off (pass bf16=True etc. to turn them back on).
TRL probes the chat template with its own text ("dummy"), so the tokenizer must encode any text: a
byte-level BPE tokenizer does; a `CharTokenizer` fails unless its alphabet has those letters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byollm.data.instruct import Conversation, PreferencePair
from byollm.errors import DataError, TokenizerError, require
from byollm.tokenizer.chat_template import check_messages

Messages = Sequence[Mapping[str, str]]


# --------------------------------------------------------------------------------------------------
# Our data -> TRL's datasets
# --------------------------------------------------------------------------------------------------


def _messages(conv: Conversation | Messages) -> list[dict[str, str]]:
    msgs = conv.messages if isinstance(conv, Conversation) else conv
    return [{"role": m["role"], "content": m["content"]} for m in check_messages(msgs)]


def sft_dataset(conversations: Iterable[Conversation | Messages]) -> Any:
    """Conversations -> a `datasets.Dataset` with one column, "messages" (TRL's conversational SFT format)."""
    datasets = require("datasets", "data")
    rows = [{"messages": _messages(c)} for c in conversations]
    if not rows:
        raise DataError("no conversations to train on")
    return datasets.Dataset.from_list(rows)


def preference_dataset(pairs: Iterable[PreferencePair]) -> Any:
    """Preference pairs -> a `datasets.Dataset` with TRL's conversational preference columns:
    "prompt" (list of messages), "chosen" and "rejected" (each [{"role": "assistant", "content": ...}])."""
    datasets = require("datasets", "data")
    rows = [{"prompt": _messages(p.prompt),
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    if not rows:
        raise DataError("no preference pairs to train on")
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------------


def load_hf_pretrained(hf_dir: str | Path) -> tuple[Any, Any]:
    """(transformers model in fp32, tokenizer) from a local Hugging Face directory; never downloads."""
    transformers = require("transformers", "hf")
    import torch

    hf_dir = str(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if not tokenizer.chat_template:
        raise TokenizerError(f"the tokenizer in '{hf_dir}' has no chat template; call add_chat_tokens on the "
                             "tokenizer before training the model, then export_hf")
    return model, tokenizer


def _context(model: Any) -> int:
    """The model's context length (block_size): GPT-2 calls it n_positions, Llama max_position_embeddings."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or config.n_positions


def _config(config_cls: type, out_dir: str | Path, steps: int, batch_size: int, lr: float, seed: int,
            overrides: Mapping[str, Any]) -> Any:
    """A TRL config: fp32, no activation checkpointing, no hub, no saving mid-run, a log every step; then
    `overrides` (the trainer's own fields and the caller's)."""
    # transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    names = {f.name for f in dataclasses.fields(config_cls)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = {"output_dir": str(out_dir), "max_steps": steps, "per_device_train_batch_size": batch_size,
            "learning_rate": lr, "lr_scheduler_type": "constant", "seed": seed, "logging_steps": 1,
            "report_to": "none", "save_strategy": "no", "bf16": False, "fp16": False, checkpointing: False,
            "dataloader_num_workers": 0, "dataloader_pin_memory": False, "disable_tqdm": True, **overrides}
    return config_cls(**args)


def sft_trainer(hf_dir: str | Path, conversations: Iterable[Conversation | Messages], out_dir: str | Path, *,
                steps: int = 10, batch_size: int = 2, lr: float = 1e-4, max_length: int | None = None,
                assistant_only_loss: bool = True, seed: int = 0, **config: Any) -> Any:
    """A ready `trl.SFTTrainer` for the model in `hf_dir` on `conversations` (not yet trained).

    assistant_only_loss: train on the assistant replies only (our template's `{% generation %}` blocks).
    max_length: longer conversations are truncated by TRL (default: the model's context, block_size).
    config: any other `trl.SFTConfig` field.
    """
    trl = require("trl", "align")
    model, tokenizer = load_hf_pretrained(hf_dir)
    args = _config(trl.SFTConfig, out_dir, steps, batch_size, lr, seed,
                   {"max_length": max_length or _context(model), "assistant_only_loss": assistant_only_loss,
                    "packing": False, **config})
    return trl.SFTTrainer(model=model, args=args, train_dataset=sft_dataset(conversations),
                          processing_class=tokenizer)


def dpo_trainer(hf_dir: str | Path, pairs: Iterable[PreferencePair], out_dir: str | Path, *, steps: int = 10,
                beta: float = 0.1, batch_size: int = 2, lr: float = 1e-5, max_length: int | None = None,
                seed: int = 0, **config: Any) -> Any:
    """A ready `trl.DPOTrainer` for the model in `hf_dir` on `pairs` (not yet trained).

    The reference model is a second, frozen copy loaded from `hf_dir`. config: any other `trl.DPOConfig` field.
    """
    trl = require("trl", "align")
    model, tokenizer = load_hf_pretrained(hf_dir)
    reference, _ = load_hf_pretrained(hf_dir)
    args = _config(trl.DPOConfig, out_dir, steps, batch_size, lr, seed,
                   {"beta": beta, "max_length": max_length or _context(model), **config})
    return trl.DPOTrainer(model=model, ref_model=reference.eval(), args=args,
                          train_dataset=preference_dataset(pairs), processing_class=tokenizer)


@dataclass
class TrlResult:
    """What a TRL run left: the trained Hugging Face directory and the trainer's log (one dict per step)."""

    out_dir: Path
    log_history: list[dict[str, float]] = field(default_factory=list)

    def losses(self) -> list[float]:
        return [e["loss"] for e in self.log_history if "loss" in e]


def _train_and_save(trainer: Any, out_dir: str | Path) -> TrlResult:
    trainer.train()
    trainer.save_model(str(out_dir))  # config.json + model.safetensors + the tokenizer files
    return TrlResult(Path(out_dir), list(trainer.state.log_history))


def trl_sft(hf_dir: str | Path, conversations: Iterable[Conversation | Messages], out_dir: str | Path,
            steps: int = 10, **kwargs: Any) -> TrlResult:
    """Fine-tune the model in `hf_dir` on `conversations` with TRL's SFTTrainer; save it to `out_dir` (a Hugging
    Face directory that `byollm.interop.convert.convert_from_hf` turns back into a byollm checkpoint).
    kwargs: see `sft_trainer` (batch_size, lr, max_length, assistant_only_loss, seed, SFTConfig fields)."""
    return _train_and_save(sft_trainer(hf_dir, conversations, out_dir, steps=steps, **kwargs), out_dir)


def trl_dpo(hf_dir: str | Path, pairs: Iterable[PreferencePair], out_dir: str | Path, steps: int = 10,
            beta: float = 0.1, **kwargs: Any) -> TrlResult:
    """Align the model in `hf_dir` on preference `pairs` with TRL's DPOTrainer (reference: the model in
    `hf_dir`); save it to `out_dir`. kwargs: see `dpo_trainer`. Logged keys include "rewards/chosen",
    "rewards/rejected", "rewards/accuracies", "rewards/margins"."""
    return _train_and_save(dpo_trainer(hf_dir, pairs, out_dir, steps=steps, beta=beta, **kwargs), out_dir)


__all__ = ["TrlResult", "dpo_trainer", "load_hf_pretrained", "preference_dataset", "sft_dataset", "sft_trainer",
           "trl_dpo", "trl_sft"]
