"""Checkpoints on disk: save atomically, and resolve whatever path a user gives to a model.

A checkpoint directory holds `model.safetensors` (weights), `config.json` (our `ModelConfig`),
`meta.json` (who wrote it, when, with which versions) and `tokenizer/`. A reward model's checkpoint is the
same with `"kind": "reward"` in meta.json and its weights named `backbone.*` and `score.weight` (the head);
`load_checkpoint(path, reward=True)` reads it back as a `RewardModel`. Every command that takes a
CKPT accepts such a directory, a run directory (its latest checkpoint) or a Hugging Face model
directory (converted on the fly), and says which it resolved to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_model

from byollm.atomic import atomic_dir_write
from byollm.errors import CheckpointError, ConfigError
from byollm.model import GPT, ModelConfig, RewardModel, build_model  # build_model: also importable from here
from byollm.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"  # in a run's checkpoints/ folder: the name of the newest complete checkpoint

CheckpointKind = Literal["checkpoint", "run", "hf"]


@dataclass
class Loaded:
    model: GPT  # a RewardModel when loaded with reward=True
    tokenizer: Tokenizer | None
    path: Path  # the checkpoint directory actually read
    kind: CheckpointKind

    def describe(self) -> str:
        what = {"checkpoint": "checkpoint", "run": "latest checkpoint of run", "hf": "Hugging Face model"}[self.kind]
        return f"{what} {self.path}"


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    import platform

    import numpy
    import safetensors
    import tokenizers

    import byollm

    return {"byollm": byollm.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__}


def save_checkpoint(model: GPT | RewardModel, path: str | Path, tokenizer: Tokenizer | None = None,
                    meta: dict[str, Any] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write model weights, config, tokenizer and metadata to `path` atomically.

    `extra(tmp_dir)` may add files (a trainer's train_state.pt) inside the same atomic write. A RewardModel
    is marked "kind": "reward" in meta.json, so loading it as a language model fails clearly."""

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save(tmp / CONFIG)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(),
                "num_params": model.num_params(), **(meta or {})}
        if isinstance(model, RewardModel):
            info["kind"] = "reward"
        (tmp / META).write_text(json.dumps(info, indent=2, default=str) + "\n")
        if extra is not None:
            extra(tmp)

    return atomic_dir_write(path, write)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> tuple[CheckpointKind, Path]:
    """Which kind of directory `path` is, and the checkpoint directory to read."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at '{p}': the path does not exist (give a checkpoint directory, "
                              "a run directory or a Hugging Face model directory)")
    if p.is_file():
        raise CheckpointError(f"'{p}' is a file; give the directory that contains {WEIGHTS} and {CONFIG}")
    ckpts = p / "checkpoints"
    if ckpts.is_dir():
        return "run", latest_checkpoint(ckpts)
    config = p / CONFIG
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config} is not valid JSON ({e})") from e
        if "model_type" in data:
            return "hf", p
        if not (p / WEIGHTS).is_file():
            raise CheckpointError(f"'{p}' has {CONFIG} but no {WEIGHTS}: the checkpoint is incomplete")
        return "checkpoint", p
    raise CheckpointError(f"'{p}' is not a checkpoint: expected {CONFIG} + {WEIGHTS}, a run directory with "
                          "checkpoints/, or a Hugging Face model directory")


def latest_checkpoint(checkpoints_dir: str | Path) -> Path:
    d = Path(checkpoints_dir)
    pointer = d / LATEST
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if (target / WEIGHTS).is_file():
            return target
    # No pointer (or it names a checkpoint that is gone): the highest complete step-N folder.
    candidates = sorted((c for c in d.glob("step-*") if (c / WEIGHTS).is_file()),
                        key=lambda c: int(c.name.split("-")[1]) if c.name.split("-")[1].isdigit() else -1)
    if not candidates:
        raise CheckpointError(f"run folder '{d.parent}' has no complete checkpoint yet")
    return candidates[-1]


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    *, reward: bool = False) -> Loaded:
    """Load a model (and its tokenizer, when there is one) from any CKPT path a user may give.

    reward=True: the checkpoint must be a reward model's, and `model` is a `RewardModel`."""
    kind, ckpt = resolve_checkpoint(path)
    is_reward = kind != "hf" and checkpoint_kind(ckpt) == "reward"
    if is_reward != reward:
        raise CheckpointError(
            f"'{ckpt}' is a reward model (a scalar head, no language model to generate with); use it where a "
            "reward model is expected" if is_reward else
            f"'{ckpt}' is a language model checkpoint, not a reward model; train one with `byollm reward`")
    if kind == "hf":
        from byollm.interop.hf import load_hf_dir

        model, tokenizer = load_hf_dir(ckpt, device=device, dtype=dtype)
        return Loaded(model, tokenizer, ckpt, kind)
    try:
        config = ModelConfig.load(ckpt / CONFIG)
    except (ConfigError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / CONFIG} is not a byollm model config: {e}") from e
    try:
        state_dict = load_file(str(ckpt / WEIGHTS), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read {ckpt / WEIGHTS}: {e}") from e
    if reward:
        # The backbone's weights are checked and filled by build_model like any model's; then the head.
        head = state_dict.pop("score.weight", None)
        if head is None:
            raise CheckpointError(f"{ckpt / WEIGHTS} has no score.weight: the reward head is missing")
        backbone = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
        model = RewardModel(build_model(config, backbone, device=device, dtype=dtype))
        model = model.to(device=device, dtype=dtype or next(model.backbone.parameters()).dtype)
        if head.shape != model.score.weight.shape:
            raise CheckpointError(f"score.weight has shape {tuple(head.shape)}, expected "
                                  f"{tuple(model.score.weight.shape)}; is config.json from the same model?")
        with torch.no_grad():
            model.score.weight.copy_(head)
    else:
        model = build_model(config, state_dict, device=device, dtype=dtype)
    tokenizer = load_tokenizer(ckpt / TOKENIZER_DIR) if (ckpt / TOKENIZER_DIR).is_dir() else None
    return Loaded(model.eval(), tokenizer, ckpt, kind)


def checkpoint_kind(ckpt: str | Path) -> str:
    """"reward" or "lm" (the default: checkpoints written before kinds existed have none), from meta.json."""
    meta = Path(ckpt) / META
    try:
        return json.loads(meta.read_text()).get("kind", "lm") if meta.is_file() else "lm"
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta} is not valid JSON ({e})") from e
