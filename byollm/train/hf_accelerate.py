"""`dist.strategy accelerate`: the same loop, with Hugging Face Accelerate doing the distributed work.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m byollm.cli pretrain \\
        --config configs/gpt2-124m-fineweb.yaml --dist.strategy accelerate

Accelerate reads its launch config (the ACCELERATE_* / FSDP_* environment `accelerate launch` sets) and
decides how the model runs: one process, DDP over CPU (gloo) or GPU (nccl) processes, or FSDP2. What it takes
over from the loop is exactly what its own training-loop recipe names:

    accelerator.prepare(model, optimizer)   device placement, the DDP / FSDP wrapper, mixed precision
    accelerator.accumulate(model)           gradient accumulation: no gradient sync before the last micro-batch
    accelerator.backward(loss)              loss / gradient_accumulation_steps, then backward (or the fp16 scaler)
    accelerator.clip_grad_norm_(...)        the global norm, sharded gradients included

Everything else stays byollm's: the sampler (its position reshards, which a prepared DataLoader's does not),
evaluation, checkpoints (an FSDP run's go through torch.distributed.checkpoint like `dist.strategy fsdp`), the
run folder. DeepSpeed is refused: its engine owns the optimizer step, gradient clipping and the checkpoint
format, so it is not the same loop any more (see docs/LOG.md).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn

from byollm.errors import ConfigError
from byollm.train.distributed import DistInfo
from byollm.train.parallel import ParallelConfig, Parallelism, checkpoint_blocks, full_norm


def accelerate_parallelism(cfg: ParallelConfig, dist: DistInfo, autocast_dtype: torch.dtype | None,
                           grad_accum: int) -> AccelerateParallelism:
    """The Accelerator for this process and the DistInfo it sees (Accelerate may have started the processes
    itself, for example with mpirun for a multi-CPU config, and then it joins the process group)."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
    except ImportError as e:
        raise ConfigError("dist.strategy accelerate needs Hugging Face Accelerate: pip install accelerate") from e
    # Accelerate's launch config decides the precision; a run started without one follows byollm's dtype.
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
        "bf16" if autocast_dtype == torch.bfloat16 else "fp16" if autocast_dtype == torch.float16 else "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                              cpu=dist.device.type == "cpu", step_scheduler_with_optimizer=False)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError("dist.strategy accelerate with a DeepSpeed config is not supported: DeepSpeed's engine "
                          "takes over the optimizer step, clipping and checkpoints. Use dist.strategy fsdp (ZeRO-3; "
                          "dist.reshard_after_forward false is ZeRO-2-like) or an FSDP accelerate config")
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("dist.strategy accelerate supports FSDP2 only: set fsdp_version: 2 in the accelerate "
                          "config (configs/accelerate/fsdp.yaml does)")
    state = accelerator.state
    seen = DistInfo(rank=state.process_index, local_rank=state.local_process_index,
                    world_size=state.num_processes,
                    device=torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device)
    if dist.world_size > 1 and (seen.rank, seen.world_size) != (dist.rank, dist.world_size):
        raise ConfigError(f"Accelerate sees rank {seen.rank} of {seen.world_size} but torchrun said rank "
                          f"{dist.rank} of {dist.world_size}: start the run with one launcher")
    return AccelerateParallelism(cfg, seen, accelerator)


class AccelerateParallelism(Parallelism):
    """The Parallelism interface the Trainer calls, answered by an `accelerate.Accelerator`."""

    def __init__(self, cfg: ParallelConfig, dist: DistInfo, accelerator: Any) -> None:
        super().__init__(cfg, dist)  # (strategy accelerate: no mesh of ours; tp 1)
        self.accelerator = accelerator
        from accelerate.utils import DistributedType

        self.fsdp = accelerator.distributed_type == DistributedType.FSDP

    @property
    def mixed_precision(self) -> str:
        return str(self.accelerator.mixed_precision)  # from the launch config, else byollm's dtype

    @property
    def sharded(self) -> bool:
        return self.fsdp

    @property
    def sharded_checkpoints(self) -> bool:
        return self.fsdp

    def shard(self, model: nn.Module, *, compile: bool = False, autocast_dtype: torch.dtype | None = None
              ) -> nn.Module:
        """Only activation checkpointing here: Accelerate shards (FSDP) in prepare, inside wrap()."""
        if compile and self.fsdp:
            raise ConfigError("compile with Accelerate's FSDP is not supported here: use dist.strategy fsdp, "
                              "which compiles each block before sharding it")
        if self.cfg.activation_checkpointing:
            checkpoint_blocks(model)
        return model

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, compile: bool = False
             ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """accelerator.prepare: the model on its device in its wrapper (DDP, FSDP2, or none in one process), with
        mixed precision around its forward; the optimizer wrapped so that it steps only on synced gradients. With
        FSDP, `model` itself is sharded in place (and the optimizer rebuilt on the shards)."""
        from byollm.train.optim import Muon

        if self.fsdp and isinstance(optimizer, Muon):
            raise ConfigError("optimizer muon orthogonalises whole matrices, which FSDP splits over ranks: use "
                              "optimizer adamw with Accelerate's FSDP")
        train_model = torch.compile(model) if compile else model
        train_model, optimizer = self.accelerator.prepare(train_model, optimizer)
        return train_model, optimizer

    @staticmethod
    def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's AcceleratedOptimizer

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        if self.accelerator.gradient_accumulation_steps != micro_batches:
            raise ConfigError(f"Accelerate was set up for {self.accelerator.gradient_accumulation_steps} "
                              f"micro-batches per step, the loop ran {micro_batches}")
        self.accelerator.backward(loss)  # divides by gradient_accumulation_steps itself

    def gradient_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        return _checked_accumulate(self.accelerator, model, enabled)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return full_norm(self.accelerator.clip_grad_norm_(params, max_norm))


@contextlib.contextmanager
def _checked_accumulate(accelerator: Any, model: nn.Module, last: bool) -> Any:
    """accelerator.accumulate counts micro-batches itself; it must agree with the loop on which one is last."""
    with accelerator.accumulate(model):
        if accelerator.sync_gradients != last:
            raise RuntimeError(f"Accelerate's gradient sync ({accelerator.sync_gradients}) disagrees with the "
                               f"loop's micro-batch count (last={last})")
        yield


__all__ = ["AccelerateParallelism", "accelerate_parallelism"]
