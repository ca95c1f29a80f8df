"""AdamW with weight decay on matrices only, and the learning-rate schedule (linear warmup, then decay).

Weight decay pulls weights towards zero. It regularises the matrices that mix features (attention and MLP
projections), but on a norm's gain or a bias it only fights the scale the layer needs, so those are left
alone, as in GPT-2, nanoGPT and most LLM trainers. Embedding tables are matrices too: GPT-2/nanoGPT decay
them (with tied embeddings the table is also the output layer) and that is our default;
`decay_embeddings=False` leaves them out, as some Llama-style recipes do.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: trainable tensors with >= 2 dims decay; norms, biases (1-D) do not.

    Only parameters with requires_grad are included, so a frozen base model (LoRA) trains its adapters only.
    A tensor shared by two modules (tied embeddings) appears once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # yields a shared tensor once
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    decay_embeddings: bool = True, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel where this PyTorch has one for the device
    (one kernel for all parameters instead of several per tensor), else the multi-tensor `foreach` path."""
    groups = [g for g in param_groups(model, weight_decay, decay_embeddings) if g["params"]]
    if not groups:
        raise ValueError("the model has no parameters with requires_grad=True: nothing to train")
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    extra = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
          schedule: str = "cosine") -> float:
    """The learning rate of optimizer step `step` (0-based), exactly as nanoGPT's get_lr for "cosine":

        step < warmup:             lr * (step + 1) / (warmup + 1)          linear warmup
        warmup <= step <= decay:   min_lr + c * (lr - min_lr)              c: cosine from 1 to 0 (or linear)
        step > decay:              min_lr
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)  # 0 -> 1 across the decay
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if schedule == "cosine" else 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
                    base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that sets lr = schedule(step) (the optimizer was built with lr=base_lr); its state, the
    step, is saved and restored with checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / base_lr if base_lr else 0.0)


__all__ = ["build_optimizer", "build_scheduler", "lr_at", "param_groups"]
