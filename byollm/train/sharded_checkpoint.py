"""Checkpoints of sharded training (dist.strategy fsdp / fsdp+tp) with `torch.distributed.checkpoint` (DCP).

    checkpoints/step-<N>/
      dcp/                  model + optimizer state: each rank writes its own shards (`__<rank>_0.distcp`) and
                            rank 0 the `.metadata` that says which slice of which tensor is where
      model.safetensors     the same weights gathered whole (what export, serving and `generate` read)
      config.json, tokenizer/, meta.json
      train_state.pt        step, schedule, data position, RNG: small, written by rank 0

DCP stores every tensor as global slices, so a checkpoint written by 2 ranks loads on 1, 3 or 16: each
loading rank reads exactly the slices its own shards cover (resharding is the library's job). The data
position reshards too, because it is a global sample index (byollm/data/samplers.py).

The write is atomic like every checkpoint here: all ranks write the shards into a hidden `.step-<N>.dcp-*`
folder, rank 0 moves it into the checkpoint's own temporary folder with the other files, and one rename
publishes the whole `step-<N>`. A crash anywhere before that rename leaves the previous checkpoint and
`latest` as they were; the next start deletes the hidden leftovers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from byollm.train import distributed
from byollm.train.distributed import DistInfo
from byollm.train.run import TRAIN_STATE

SHARDS = "dcp"


def has_shards(checkpoint: Path) -> bool:
    return (checkpoint / SHARDS / ".metadata").is_file()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optim": ...}: this rank's view (DTensor shards under FSDP, whole tensors without)
    keyed by parameter names, which is what lets another world size find its slices."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def write_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(folder))


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP folder into `model` and `optimizer` as they are sharded now (any world size; with no
    process group a plain model reads every slice)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (gathered from the shards; a collective; empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU model of the same class and config holding `weights` (rank 0 saves it as safetensors)."""
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps a module's class for a subclass (FSDPGPT); build the plain class it came from
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls(model.config)
    copy.to_empty(device="cpu")
    copy.load_state_dict(weights, strict=True)
    if hasattr(copy, "init_buffers"):
        copy.init_buffers()  # RoPE frequencies are a buffer, not in the state dict
    return copy


def save_sharded(run: Any, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any,
                 train_state: dict[str, Any], meta: dict[str, Any], keep_last: int, dist: DistInfo) -> Path | None:
    """checkpoints/step-<step>/ with DCP shards and the gathered weights, atomically. Every rank calls it;
    returns the path on rank 0."""
    run_dir = Path(distributed.broadcast_object(str(run.path), dist))
    staging = run_dir / "checkpoints" / f".step-{step}.dcp-{os.getpid()}-{time.monotonic_ns()}"
    staging = Path(distributed.broadcast_object(str(staging), dist))
    write_shards(staging, model, optimizer)
    weights = full_weights(model)
    path = None
    if dist.is_main:
        def extra(tmp: Path) -> None:
            torch.save(train_state, tmp / TRAIN_STATE)
            os.replace(staging, tmp / SHARDS)

        path = run.save_checkpoint(step, plain_copy(model, weights), tokenizer, train_state, meta, keep_last,
                                   extra=extra)
    distributed.barrier(dist)
    return path


__all__ = ["SHARDS", "full_weights", "has_shards", "load_shards", "plain_copy", "save_sharded", "write_shards"]
