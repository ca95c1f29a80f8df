"""Data-parallel training with `torchrun`: one process per device, each with a full copy of the model.

    torchrun --standalone --nproc_per_node 8 -m byollm.cli pretrain --config configs/gpt2-124m-fineweb.yaml

torchrun starts the processes and gives each RANK, LOCAL_RANK and WORLD_SIZE in its environment. Each rank
reads different batches (the sampler shards by rank), computes gradients on them, and DistributedDataParallel
averages the gradients across ranks during backward, so every rank takes the same optimizer step. Only
rank 0 writes files. Without torchrun (no RANK in the environment) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from byollm.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun (nccl on GPUs, gloo on CPUs); pick this rank's device."""
    if "RANK" not in os.environ:
        return DistInfo(device=pick_device(device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    dev = pick_device(device)
    check_environment(dev, local_rank, world)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        store = restart_safe_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank, local_rank, world, dev)


def restart_safe_store(world_size: int) -> dist.Store | None:
    """The torchrun agent's key-value store, seen through a prefix unique to this restart attempt.

    torchrun (c10d rendezvous) keeps one store for the whole job and hands it to every attempt of the
    workers. After an elastic restart (`--max-restarts`) the keys of the dead attempt are still in it, and a
    new rank can read a dead rank's address from them and fail to connect (pytorch/pytorch issues 135712 and
    167288). Separating attempts by TORCHELASTIC_RESTART_COUNT fixes that for a fixed set of nodes, which all
    restart together; None outside torchrun's shared store (init_process_group then reads MASTER_ADDR/PORT).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return dist.PrefixStore(f"byollm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def check_environment(device: torch.device, local_rank: int, world_size: int) -> None:
    """One clear error for the launches that would otherwise hang or fail deep inside torch.distributed."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world_size < 1 or local_world > world_size:
        raise ConfigError(f"inconsistent torchrun environment: WORLD_SIZE={world_size}, LOCAL_WORLD_SIZE="
                          f"{local_world}; start the run with torchrun, which sets both")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but this machine has no usable GPU; use --device cpu "
                              "(gloo) or run where CUDA is available")
        if not dist.is_nccl_available():
            raise ConfigError("this PyTorch build has no NCCL backend for multi-GPU training; install a CUDA "
                              "build of torch (see DEVELOPERS.md), or train on CPU with gloo (--device cpu)")
        if local_world > torch.cuda.device_count():
            raise ConfigError(f"torchrun started {local_world} processes on this node but it has "
                              f"{torch.cuda.device_count()} GPU(s): set --nproc_per_node {torch.cuda.device_count()}")
    elif not dist.is_gloo_available():
        raise ConfigError("this PyTorch build has no gloo backend for CPU training across processes")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `t` over ranks (a copy; `t` itself is unchanged). Every rank must call it."""
    t = t.detach().clone()
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    t = t.detach().clone()
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. a run name made from rank 0's clock)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. each rank's RNG state for a checkpoint)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


__all__ = ["DistInfo", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object", "check_environment",
           "gather_objects", "pick_device", "setup", "teardown"]
