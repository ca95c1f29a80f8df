"""AdamW with weight decay on matrices only, and the learning-rate schedule (linear warmup, then decay).

Weight decay pulls weights towards zero. It regularises the matrices that mix features (attention and MLP
projections), but on a norm's gain or a bias it only fights the scale the layer needs, so those are left
alone, as in GPT-2, nanoGPT and most LLM trainers. Embedding tables are matrices too: GPT-2/nanoGPT decay
them (with tied embeddings the table is also the output layer) and that is our default;
`decay_embeddings=False` leaves them out, as some Llama-style recipes do.

Muon (Keller Jordan et al., 2024; the modded-nanoGPT speedruns) is the optional alternative for the hidden
matrices: SGD-momentum whose update is replaced by the nearest semi-orthogonal matrix (all singular values
~1), computed with a few Newton-Schulz iterations. Every direction of the update then moves at the same
rate, instead of a few dominant ones as with Adam, and small models reach a given loss in fewer steps.
Embeddings, the output layer, norms and biases keep AdamW, as in the speedruns.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from byollm.config import Section
from byollm.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig(Section):
    """AdamW and its learning-rate schedule: the section of a recipe's config `build_training_optimizer` reads."""

    lr: float = 1e-3
    """peak learning rate (reached after warmup_steps)"""
    min_lr: float = 1e-4
    """learning rate at the end of the decay"""
    warmup_steps: int = 100
    """linear warmup from ~0 to lr over this many steps"""
    lr_decay_steps: int | None = None
    """the step at which the decay reaches min_lr; default: max_steps"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay shape after warmup (constant: stay at lr)"""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not on norms or biases)"""
    decay_embeddings: bool = True
    """decay the embedding tables too, as GPT-2/nanoGPT do (a tied one is also the LM head)"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's beta1, beta2"""

    def check(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  (YAML and JSON give lists)
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 0:
            raise ConfigError(f"lr_decay_steps must be >= 0 (or null for max_steps), got {self.lr_decay_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} and lr={self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")


@dataclass
class MuonOptimConfig(OptimConfig):
    """OptimConfig plus the choice of Muon for the blocks' hidden matrices (pretraining)."""

    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: Muon for the blocks' matrices, AdamW (lr) for embeddings, head, norms and biases"""
    muon_lr: float = 0.02
    """Muon's peak learning rate (the schedule scales it like lr)"""
    muon_momentum: float = 0.95
    """Muon's momentum"""

    def check(self) -> None:
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of adamw, muon")


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


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U @ V^T for g = U S V^T (a batch of matrices, (..., rows, cols)), by iterating the
    odd polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X. Its coefficients (Muon's) push every singular value
    of X (first scaled so all are <= 1) quickly towards ~1 (into roughly [0.7, 1.2]; exactness is not needed)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius norm >= the largest singular value
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked use_muon (2-D hidden matrices), AdamW for the other groups, in one optimizer
    so that one scheduler scales both learning rates and one state_dict resumes both.

    Muon step for a matrix W with gradient G:  M <- mu M + (1 - mu) G;  D <- G + mu (M - G) (Nesterov);
    W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) newton_schulz(D). Matrices of the same shape are
    orthogonalised together as one batch (fewer, larger matmuls)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 momentum: float = 0.95, ns_steps: int = 5, eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, betas=betas, momentum=momentum, ns_steps=ns_steps, eps=eps, weight_decay=0.0,
                        use_muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["use_muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape, ps in by_shape.items():
            grads = torch.stack([p.grad for p in ps])
            state = self.state[ps[0]]  # the shape's stacked momentum lives with its first matrix
            if "momentum_buffer" not in state or state["momentum_buffer"].shape != grads.shape:
                state["momentum_buffer"] = torch.zeros_like(grads)
            buf = state["momentum_buffer"]
            buf.lerp_(grads, 1 - mu)
            update = newton_schulz(grads.lerp_(buf, mu), group["ns_steps"])
            scale = lr * max(1.0, shape[-2] / shape[-1]) ** 0.5
            for p, u in zip(ps, update.unbind(0), strict=True):
                p.mul_(1 - lr * wd).add_(u.to(p.dtype), alpha=-scale)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            m.lerp_(p.grad, 1 - beta1)  # first moment
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # second moment
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def is_hidden_matrix(name: str, p: torch.Tensor, model: nn.Module) -> bool:
    """A 2-D weight inside the transformer blocks (not an embedding table, not the LM head): Muon's domain."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return p.dim() == 2 and name.split(".")[0] == "blocks" and id(p) not in embeddings


def build_muon(model: nn.Module, lr: float, muon_lr: float, weight_decay: float, betas: tuple[float, float],
               momentum: float = 0.95, decay_embeddings: bool = True) -> Muon:
    """Muon over the hidden matrices (learning rate muon_lr), AdamW over the rest (lr, weight decay on the
    embedding matrices as `param_groups` decides)."""
    hidden = {id(p) for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p, model)}
    groups: list[dict] = [{"params": [p for p in model.parameters() if id(p) in hidden], "use_muon": True,
                           "lr": muon_lr, "weight_decay": weight_decay, "momentum": momentum}]
    for g in param_groups(model, weight_decay, decay_embeddings):
        g["params"] = [p for p in g["params"] if id(p) not in hidden]
        groups.append(g)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no parameters with requires_grad=True: nothing to train")
    return Muon(groups, lr=lr, betas=betas, momentum=momentum)


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


class LengthSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that sets lr = schedule(step, total_steps), where the run's length total_steps can change
    after the start: a time budget fits it after a few steps (`Trainer.fit_length`), a resume with a larger
    max_steps stretches it. The rate of the current step follows at once; total_steps is in the state_dict."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Callable[[int, int], float], base_lr: float,
                 total_steps: int) -> None:
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: schedule(step, self.total_steps) / base_lr if base_lr else 0.0)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = total_steps
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_training_optimizer(model: nn.Module, cfg: OptimConfig, max_steps: int, device_type: str = "cpu"
                             ) -> tuple[torch.optim.Optimizer, LengthSchedule]:
    """The optimizer (AdamW, or Muon + AdamW when cfg chooses it) over the trainable parameters and its
    schedule: warmup to cfg.lr, then decay to cfg.min_lr at lr_decay_steps (default: the run's last step,
    max_steps until a time budget or a resume changes it)."""
    if isinstance(cfg, MuonOptimConfig) and cfg.optimizer == "muon":
        optimizer: torch.optim.Optimizer = build_muon(model, cfg.lr, cfg.muon_lr, cfg.weight_decay, cfg.betas,
                                                      cfg.muon_momentum, cfg.decay_embeddings)
    else:
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.decay_embeddings, device_type)

    def schedule(step: int, total_steps: int) -> float:
        return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                     decay_steps=cfg.lr_decay_steps or total_steps, schedule=cfg.schedule)

    return optimizer, LengthSchedule(optimizer, schedule, cfg.lr, max_steps)


__all__ = ["LengthSchedule", "Muon", "MuonOptimConfig", "OptimConfig", "build_muon", "build_optimizer",
           "build_scheduler", "build_training_optimizer", "is_hidden_matrix", "lr_at", "newton_schulz", "param_groups"]
