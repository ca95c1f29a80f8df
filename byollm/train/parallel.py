"""How the model is spread over the processes torchrun starts: `dist.strategy` ddp | fsdp | fsdp+tp | accelerate.

    ddp      every rank holds the whole model, optimizer state and gradients; gradients are all-reduced
             (averaged) in backward. Memory per rank: all of it. Simplest and fastest while the model fits.
    fsdp     FSDP2 (`torch.distributed.fsdp.fully_shard`, ZeRO stage 3): each rank keeps 1/N of every
             parameter, gradient and optimizer state as a DTensor. Before a block runs forward (and again
             in backward) its parameters are all-gathered; after backward its gradients are reduce-scattered
             so each rank keeps only its shard's. One FSDP unit per Transformer block, then the root (the
             embeddings, final norm and head), so only one block is ever whole at a time.
    fsdp+tp  a 2-D mesh (dp x tp): tensor parallelism (DTensor: ColwiseParallel / RowwiseParallel, Megatron
             style) splits each block's attention heads and MLP columns over the tp ranks of a node, with
             sequence parallelism for the norms and residual stream between them; FSDP shards over dp.
    accelerate  Hugging Face Accelerate does the wrapping, device placement, mixed precision and gradient
             accumulation, as its `accelerate launch` config says (train/hf_accelerate.py).

What the Trainer asks of this object is small: `shard(model)` once before the optimizer is built,
`wrap(model, optimizer)` for what forward and backward run through, `gradient_sync(on)` and `backward` for
gradient accumulation, `clip_grad_norm_`, and which rank's data a process reads
(`data_rank` / `data_world`: the tp ranks of one group must see the same batch). Checkpoints of sharded
models go through `torch.distributed.checkpoint` (train/sharded_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from byollm.config import Section
from byollm.errors import ConfigError
from byollm.train.distributed import DistInfo

STRATEGIES = ("ddp", "fsdp", "fsdp+tp", "accelerate")


@dataclass
class ParallelConfig(Section):
    """How training is spread over processes (the `dist.*` keys); see byollm/train/parallel.py."""

    strategy: Literal["ddp", "fsdp", "fsdp+tp", "accelerate"] = "ddp"
    """ddp (a full copy per rank), fsdp (FSDP2: parameters, gradients and optimizer state sharded over ranks),
    fsdp+tp (tensor parallel over dist.tp ranks, FSDP over the rest) or accelerate (Hugging Face Accelerate
    wraps the model as its `accelerate launch` config says)"""
    tp: int = 2
    """fsdp+tp: ranks per tensor-parallel group (it must divide the world size, the heads and the MLP width)"""
    activation_checkpointing: bool = False
    """keep only each block's input in forward and recompute the rest in backward (less memory, ~1/3 more
    compute); any strategy"""
    cpu_offload: bool = False
    """fsdp on GPUs: keep parameter shards, gradients and optimizer state in CPU memory (slow; for models that
    do not fit otherwise)"""
    meta_init: bool = False
    """fsdp: build the model on the meta device (no memory), shard it, then initialise only this rank's
    shards, so a model too big for one device never exists whole"""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward (ZeRO-3); False keeps them until
    backward (ZeRO-2-like: more memory, one all-gather fewer)"""

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"dist.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.tp < 1:
            raise ConfigError(f"dist.tp must be at least 1, got {self.tp}")
        if (self.meta_init or self.cpu_offload) and not self.sharded:
            which = "meta_init" if self.meta_init else "cpu_offload"
            raise ConfigError(f"dist.{which} needs byollm's sharding: set dist.strategy fsdp (or fsdp+tp); under "
                              "dist.strategy accelerate, the accelerate config's fsdp_* keys say it")

    @property
    def sharded(self) -> bool:
        """byollm shards the model itself (FSDP2, TP)."""
        return self.strategy in ("fsdp", "fsdp+tp")


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each block's forward runs under torch.utils.checkpoint, which keeps only its
    inputs and recomputes the block in backward. Same gradients, less memory. The module tree (and so the
    state dict) is unchanged: only the blocks' `forward` is wrapped."""
    for block in blocks_of(model):
        block.forward = functools.partial(_recomputed, block.forward)


def _recomputed(forward: Any, *args: Any) -> torch.Tensor:
    return checkpoint(forward, *args, use_reentrant=False)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks (byollm's GPT, or a model wrapping one as `.backbone`)."""
    inner = getattr(model, "backbone", model)
    blocks = getattr(inner, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no .blocks: dist.strategy fsdp/fsdp+tp and "
                          "activation_checkpointing work on byollm's GPT")
    return blocks


class Parallelism:
    """A ParallelConfig applied to this process: the device mesh and what the Trainer calls."""

    def __init__(self, cfg: ParallelConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.tp = cfg.tp if cfg.strategy == "fsdp+tp" else 1
        if dist.world_size % self.tp:
            raise ConfigError(f"dist.tp={self.tp} does not divide the world size {dist.world_size}: start "
                              f"a multiple of {self.tp} processes (torchrun --nproc_per_node) or change dist.tp")
        if cfg.cpu_offload and dist.device.type != "cuda":
            raise ConfigError("dist.cpu_offload moves shards from GPU to CPU memory; on a CPU run it does "
                              "nothing: leave it off")
        self.mesh = None
        if dist.enabled and cfg.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            dims, names = (dist.world_size // self.tp, self.tp), ("dp", "tp")
            self.mesh = init_device_mesh(dist.device.type, dims, mesh_dim_names=names)

    # ---- which data this rank reads -----------------------------------------------------------------------
    @property
    def data_world(self) -> int:
        """Data-parallel replicas: the tp ranks of a group share one batch."""
        return self.dist.world_size // self.tp

    @property
    def data_rank(self) -> int:
        return self.dist.rank // self.tp  # the mesh is (dp, tp) in row-major order

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors spread over ranks: every rank must run every forward (evaluation and
        sampling included)."""
        return self.mesh is not None

    @property
    def sharded_checkpoints(self) -> bool:
        """Checkpoints go through torch.distributed.checkpoint (so they reshard to any world size)."""
        return self.cfg.sharded

    @property
    def mixed_precision(self) -> str | None:
        """The precision a launcher chose for the run (Accelerate's); None: byollm's own dtype decides."""
        return None

    # ---- the model ---------------------------------------------------------------------------------------
    def shard(self, model: nn.Module, *, compile: bool = False, autocast_dtype: torch.dtype | None = None
              ) -> nn.Module:
        """Apply tensor parallelism, activation checkpointing, compilation and FSDP, in torchtitan's order,
        to `model` in place; returns it. Build the optimizer after this (FSDP swaps the parameters)."""
        if self.tp > 1:
            check_splittable(getattr(model, "backbone", model).config, self.tp)
            tensor_parallel(model, self.mesh["tp"])
        if self.cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if not self.sharded:
            return model
        if compile:
            for block in blocks_of(model):
                block.compile()
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {"mesh": self.mesh["dp"], "reshard_after_forward": self.cfg.reshard_after_forward}
        if autocast_dtype is not None:  # bf16 compute and all-gathers, fp32 gradient reduction and master weights
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for block in blocks_of(model):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        # The root's output holds logits made by a reshape (a view); the loss never modifies it in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        if self.cfg.meta_init:
            model.to_empty(device=self.dist.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed() + self.dist.rank)  # each shard its own random draws
                init = getattr(model, "backbone", model).reset_parameters
                init()
        return model

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, compile: bool = False
             ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """What forward and backward run through, and the optimizer to step. Sharded (FSDP, TP): the model
        itself, which shard() has compiled per block. DDP: compiled (optional), then wrapped in
        DistributedDataParallel, which all-reduces the gradients during backward."""
        if self.sharded:
            return model, optimizer
        train_model = torch.compile(model) if compile else model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            train_model = DDP(train_model, device_ids=ids)
        return train_model, optimizer

    @staticmethod
    def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer itself (the sharded checkpoints read its state)."""
        return optimizer

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        """Backward of one micro-batch's loss, scaled so that the micro-batches add up to their mean."""
        (loss / micro_batches).backward()

    def gradient_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: no reduction on the micro-batches before the last (DDP's no_sync; FSDP2's
        set_requires_gradient_sync keeps the unsharded gradients until the last micro-batch)."""
        if not self.dist.enabled or enabled:
            if self.sharded:
                model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.sharded:
            model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return model.no_sync()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global norm over all gradients and ranks (clip_grad_norm_ reduces DTensor shards itself)."""
        return full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: over sharded (DTensor) gradients, the norm is a replicated DTensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def check_splittable(config: Any, tp: int) -> None:
    """One clear error for a model (a ModelConfig) that tensor parallelism over `tp` ranks cannot split."""
    for name in ("n_head", "n_kv_head", "intermediate_size"):
        value = getattr(config, name)
        if value % tp:
            raise ConfigError(f"dist.tp={tp} does not divide the model's {name}={value}: tensor parallelism "
                              "gives each rank whole heads and an equal slice of the MLP")
    if config.tie_embeddings:
        raise ConfigError("dist.strategy fsdp+tp needs untied embeddings (model.tie_embeddings false): the input "
                          "table is split by rows and the head by output columns")


def tensor_parallel(model: nn.Module, mesh: Any) -> None:
    """Megatron-style tensor parallelism with sequence parallelism, written as DTensor layouts.

    Between blocks the residual stream is split along the sequence (Shard(1)): the norms run on each rank's
    slice of positions. Attention and the MLP first all-gather the sequence (Replicate), then q/k/v and
    gate/up are split by output columns (each rank computes whole heads / a slice of the hidden width with no
    communication), and o_proj / down_proj by input rows, whose partial sums are reduce-scattered back to
    sequence shards. The embedding is split by rows of the table, the head by output columns (logits are
    gathered for the loss)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = mesh.size()
    # Clipping the 2-D-sharded gradients all-reduces over dp, then tp; DTensor warns at every step that one
    # flattened collective would be faster. Correct as it is (and the norm is tested), so quiet.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    top: dict[str, Any] = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    if getattr(model, "pos_emb", None) is not None:
        top["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    parallelize_module(model, mesh, top)
    # Attention is called as attn(x, rope, mask, is_causal, cache, layer): only x changes layout.
    gather_x = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                  desired_input_layouts=(Replicate(), None, None, None, None, None))
    for block in blocks_of(model):
        plan: dict[str, Any] = {
            "norm_1": SequenceParallel(), "norm_2": SequenceParallel(), "attn": gather_x,
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if getattr(block.mlp, "swiglu", False):
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= tp  # the view into heads sees this rank's heads only
        block.attn.n_kv_head //= tp


__all__ = ["STRATEGIES", "ParallelConfig", "Parallelism", "blocks_of", "check_splittable", "checkpoint_blocks",
           "full_norm", "tensor_parallel"]
