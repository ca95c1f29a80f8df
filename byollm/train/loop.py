"""The one training loop. Pretraining, SFT, DPO, reward models and LoRA all run through `Trainer`.

What differs between them is only what a batch holds and how a loss is computed from it, so that is all
they supply:

    BatchSource   next_batch() -> any batch (a tuple or dict of tensors); state_dict()/load_state_dict()
                  so a resumed run continues with exactly the batches it would have seen
    Objective     loss(model, batch) -> (scalar loss tensor, {metric name: value})

The loop itself never looks inside a batch. It trains whatever parameters have requires_grad (so a LoRA
recipe freezes the base model and passes an optimizer over its adapters), and it owns the rest:

    for step in range(max_steps):
        for each of grad_accum micro-batches:           gradient accumulation
            loss = objective.loss(model, batch)          under bf16 autocast when asked
            (loss / grad_accum).backward()               DDP averages gradients over ranks on the last one
        clip the gradient norm; optimizer.step(); scheduler.step()
        every log_interval:        metrics.jsonl + progress bar (loss averaged over ranks, tokens/s, MFU)
        every eval_interval:       loss on fixed validation batches (and extra metrics: ppl, bits per byte)
        every sample_interval:     generate some text into samples.txt
        every checkpoint_interval: weights + optimizer + scheduler + RNG + data position, atomically

time_budget_s: the first time_budget_probe steps are timed, then the run's length (and its schedule's) is set
once to the steps that fit (`steps_in_budget`), so the learning rate still decays to its end at the last step.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from byollm.config import Section
from byollm.errors import ByollmError, ConfigError
from byollm.tokenizer import Tokenizer
from byollm.train import sharded_checkpoint
from byollm.train.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
)
from byollm.train.parallel import ParallelConfig, Parallelism
from byollm.train.run import Run, load_train_state, seed_everything

# --------------------------------------------------------------------------------------------------
# What plugs into the loop
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class BatchSource(Protocol):
    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """loss(model, batch) -> (loss, metrics). `loss` is the scalar to minimise (a mean over the batch);
    `metrics` are numbers to log, averaged over micro-batches and ranks, except "tokens", the number of
    tokens the loss was computed on, which is summed (it drives tokens/s and weights the eval average).
    Call the model through model(...), so DDP's hooks see the forward pass."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


class CausalLM:
    """Pretraining: predict every next token. A batch is (x, y) with y = x shifted by one; the loss is the
    mean cross-entropy over all positions whose target is not `ignore_index`."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        _, loss = model(x, y, ignore_index=self.ignore_index)
        return loss, {"tokens": y.numel()}  # tokens processed (pretraining windows have no ignored targets)


class TrainingError(ByollmError):
    """Training cannot go on (for example the loss became nan)."""


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple/list/dict batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast: matmuls run in bf16 while weights, optimizer state and reductions stay fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# RNG state: part of a checkpoint, so a resumed run draws the same dropout masks (and anything else random)
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                             "pos": np_state["state"]["pos"]}}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: Iterable[Any], *, device: torch.device,
             autocast_dtype: torch.dtype | None = None, dist: DistInfo | None = None,
             collective: bool = False, replicas: int = 1) -> dict[str, float]:
    """The objective's loss over `batches` (this rank's share), averaged over all ranks: per token when the
    objective reports "tokens" (an exact mean over unequal batches), else per batch. Returns
    {"loss": mean, "tokens": what it was averaged over}.

    collective: every forward is a collective (a sharded model all-gathers its parameters), so every rank must
    run the same number of them. Ranks with fewer batches (or none: a small validation split over many
    ranks) run extra forwards on a borrowed batch that count with weight 0, instead of waiting forever.
    replicas: ranks that evaluate the same batches (tensor-parallel peers); their sums are divided back out."""
    dist = dist or DistInfo(device=device)
    weights = None
    if collective and dist.enabled:
        batches = list(batches)
        counts = gather_objects(len(batches), dist)
        if min(counts) < max(counts):
            src = counts.index(max(counts))
            filler = broadcast_object(batches[0] if dist.rank == src else None, dist, src=src)
            weights = [1.0] * len(batches) + [0.0] * (max(counts) - len(batches))
            batches = batches + [filler] * (max(counts) - len(batches))
    was_training = model.training
    model.eval()
    weighted, weight = 0.0, 0.0
    try:
        for i, batch in enumerate(batches):
            with autocast_context(device, autocast_dtype):
                loss, metrics = objective.loss(model, to_device(batch, device))
            w = float(metrics.get("tokens", 1)) * (weights[i] if weights is not None else 1.0)
            weighted += loss.item() * w
            weight += w
    finally:
        model.train(was_training)
    weighted, weight = weighted / replicas, weight / replicas
    dtype = torch.float32 if device.type == "mps" else torch.float64  # (MPS has no float64)
    totals = all_reduce_sum(torch.tensor([weighted, weight], device=device, dtype=dtype), dist)
    if totals[1] == 0:
        raise TrainingError("evaluation got no batches; check eval_batches and the size of the val split")
    return {"loss": (totals[0] / totals[1]).item(), "tokens": totals[1].item()}


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class LoopConfig(Section):
    """How long the loop runs and how often it reports: the section of a recipe's config the Trainer reads.
    A step is one optimizer update on grad_accum micro-batches."""

    max_steps: int = 2000
    """optimizer steps to train for"""
    grad_accum: int = 1
    """micro-batches per optimizer step (gradient accumulation)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0: no clipping"""
    log_interval: int = 10
    """write a train event (loss, lr, tokens/s) to metrics.jsonl every N steps"""
    eval_interval: int = 250
    """evaluate every N steps (and at the last one); 0: only at the end"""
    checkpoint_interval: int = 1000
    """save a resumable checkpoint every N steps (and at the last one); 0: only at the end"""
    keep_last: int = 2
    """checkpoints kept on disk (older ones are deleted)"""
    time_budget_s: float | None = None
    """train for at most this many seconds (evaluations included): after time_budget_probe timed steps the
    run's length, and its schedule, become the steps that fit (at most max_steps); null: max_steps"""
    time_budget_probe: int = 20
    """steps timed before fitting the run to time_budget_s (when they are all warmup steps, the fitted run is
    bitwise the run with max_steps set to the fitted length)"""

    def check(self) -> None:
        for name in ("max_steps", "grad_accum", "keep_last", "time_budget_probe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("log_interval", "eval_interval", "checkpoint_interval", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s must be positive (or null for no budget), got {self.time_budget_s}")


class Trainer:
    """Runs the loop for a model, an objective and a batch source; saves and restores its whole state.

    model: the plain module (its weights are what checkpoints hold); the Trainer compiles it (`compile`) and
        wraps it (`parallel.wrap`: DistributedDataParallel, or Accelerate's prepare) itself.
    loop: the loop's settings (a LoopConfig, normally the recipe's config, which is one).
    Evaluation, every loop.eval_interval steps and at the last: either `eval_data` (returns a fresh iterable of
        this rank's validation batches; the objective's mean loss over them, and `eval_extras(loss)` turns it
        into more metrics such as perplexity), or `evaluate(model) -> metrics`, any held-out measurement (PPO's
        reward and KL on held-out prompts). Each is logged as an `eval_event` with keys `eval_prefix` + name.
    sample: model -> generated text (rank 0 only), every `sample_interval` steps, appended to samples.txt.
    stop_at_val_loss: stop early once an evaluation's loss reaches it.
    loop.time_budget_s: the run's length is fitted once (`fit_length`) and kept in checkpoints; the scheduler
        must then be able to change its length (`set_total_steps`, as build_training_optimizer's can).
    seed: re-seeds the generators on a resume with another number of ranks.
    flops_per_token / peak_flops: for MFU (omitted when either is unknown).
    checkpoint_meta: written into each checkpoint's meta.json (for example the run's name and data).
    parallel: how the model is spread over ranks (dist.strategy; default DDP). A sharded model (FSDP, TP)
        must already be sharded by `parallel.shard(model)` when the optimizer is built, before the Trainer.
    """

    def __init__(self, model: nn.Module, objective: Objective, train_data: BatchSource,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 loop: LoopConfig, *, device: torch.device, dist: DistInfo | None = None,
                 autocast_dtype: torch.dtype | None = None, run: Run | None = None, tokenizer: Tokenizer | None = None,
                 eval_data: Callable[[], Iterable[Any]] | None = None,
                 eval_extras: Callable[[float], dict[str, float]] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 eval_event: str = "eval", eval_prefix: str = "val_",
                 sample: Callable[[nn.Module], str] | None = None, sample_interval: int = 0,
                 stop_at_val_loss: float | None = None, compile: bool = False, seed: int = 0,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 checkpoint_meta: dict[str, Any] | None = None, checkpoints: bool = True,
                 progress: bool = True, parallel: Parallelism | None = None) -> None:
        if eval_data is not None and evaluate is not None:
            raise ValueError("give the Trainer eval_data (a loss on held-out batches) or evaluate, not both")
        self.model, self.objective, self.train_data = model, objective, train_data
        self.optimizer, self.scheduler, self.config = optimizer, scheduler, loop
        self.device, self.dist = device, dist or DistInfo(device=device)
        self.autocast_dtype, self.run, self.tokenizer = autocast_dtype, run, tokenizer
        self.eval_data, self.eval_extras, self.evaluate_fn = eval_data, eval_extras, evaluate
        self.eval_event, self.eval_prefix = eval_event, eval_prefix
        self.sample, self.sample_interval, self.stop_at_val_loss = sample, sample_interval, stop_at_val_loss
        self.seed = seed
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.checkpoint_meta = checkpoint_meta or {}
        self.checkpoints = checkpoints  # False: the caller saves the result itself (adapters), no checkpoints
        self.progress = progress
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # training tokens over all ranks
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None
        self.last_sample: str | None = None
        self.last_checkpoint = None
        self._bar: tqdm | None = None
        self._timed = [0, 0.0]  # training tokens and seconds in this process, evaluation excluded
        self.max_steps = loop.max_steps  # the run's length: loop.max_steps, or what fits into loop.time_budget_s
        self.time_budget: dict[str, Any] | None = None  # how the length was fitted (kept in checkpoints)
        self._eval_seconds: float | None = None  # how long the last evaluation took
        if loop.time_budget_s is not None and scheduler is not None and not hasattr(scheduler, "set_total_steps"):
            raise ConfigError("time_budget_s needs a schedule whose length can be set after the start (the one "
                              "build_training_optimizer returns); leave time_budget_s unset or build it so")

        self.parallel = parallel or Parallelism(ParallelConfig(), self.dist)
        # What forward/backward runs through: DDP-wrapped, Accelerate-prepared, or (sharded) the model itself.
        self.train_model, self.optimizer = self.parallel.wrap(model, optimizer, compile=compile)

    @property
    def evaluates(self) -> bool:
        return self.eval_data is not None or self.evaluate_fn is not None

    # ---- one optimizer step -----------------------------------------------------------------------
    def forward_backward(self) -> tuple[torch.Tensor, dict[str, float], int]:
        """grad_accum micro-batches into .grad; returns the mean loss (detached), mean metrics, tokens."""
        k = self.config.grad_accum
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        tokens = 0
        for micro in range(k):
            batch = to_device(self.train_data.next_batch(), self.device)
            # Gradients are averaged (DDP) or reduce-scattered (FSDP) across ranks on the last micro-batch only.
            with self.parallel.gradient_sync(self.train_model, micro == k - 1):
                with autocast_context(self.device, self.autocast_dtype):
                    loss, m = self.objective.loss(self.train_model, batch)
                self.parallel.backward(loss, k)  # (loss / k).backward(): the mean over micro-batches
            total += loss.detach() / k
            tokens += int(m.pop("tokens", 0))
            for name, value in m.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / k
        return total, metrics, tokens

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, advance the schedule, zero the gradients; returns the lr used and the gradient norm."""
        out = {"lr": self.optimizer.param_groups[0]["lr"]}
        if self.config.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            out["grad_norm"] = self.parallel.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.config
        budget, probe = cfg.time_budget_s, cfg.time_budget_probe
        self.model.train()
        if self.step >= self.max_steps:
            self._print(f"already at step {self.step} of max_steps={self.max_steps}: nothing to train")
            return
        start, first_step, probe_seconds = time.perf_counter(), self.step, 0.0
        fitting = budget is not None and self.time_budget is None
        # Into a file or pipe (CI, nohup) every refresh is a new line: refresh every 30 s there, not 10 times a second.
        self._bar = bar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                               mininterval=0.1 if sys.stderr.isatty() else 30.0,
                               disable=not (self.progress and self.dist.is_main))
        if self.step == 0 and cfg.eval_interval and self.evaluates and self.last_eval_step != 0:
            self.run_eval()  # the loss before any training: about ln(vocab_size) for a fresh model
        window_tokens, window_time = 0, 0.0
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                loss, metrics, tokens = self.forward_backward()
                opt = self.optimizer_step()
                self.step += 1
                if fitting and self.step - first_step > 1:  # time the probe's steps after the first (warm-up)
                    if self.step - first_step == probe:
                        _synchronize(self.device)
                    probe_seconds += time.perf_counter() - t0
                if fitting and self.step - first_step == probe:
                    fitting = False
                    self.fit_length(budget, time.perf_counter() - start, probe_seconds / (probe - 1))
                    bar.total = self.max_steps
                    bar.refresh()
                last = self.step == self.max_steps
                log = _due(self.step, cfg.log_interval, last)
                if log:
                    loss = loss.item()  # waits for the GPU, so the timing below includes the queued work
                window_tokens += tokens
                window_time += time.perf_counter() - t0
                bar.update(1)
                if log:
                    self._log_train(loss, metrics, opt, window_tokens, window_time)
                    window_tokens, window_time = 0, 0.0
                if self.evaluates and _due(self.step, cfg.eval_interval, last):
                    self.run_eval()
                    target = self.stop_at_val_loss
                    if target is not None and self.last_eval.get("loss", math.inf) <= target and not last:
                        self._print(f"val loss {self.last_eval['loss']:.4f} <= stop_at_val_loss={target}: "
                                    f"stopping at step {self.step}")
                        if self.sample is not None:
                            self.run_sample()
                        self.save_checkpoint()
                        break
                if self.sample is not None and _due(self.step, self.sample_interval, last):
                    self.run_sample()
                if _due(self.step, cfg.checkpoint_interval, last):
                    self.save_checkpoint()
        finally:
            bar.close()

    def fit_length(self, budget_s: float, elapsed_s: float, seconds_per_step: float) -> int:
        """Set the run's length, once, to the steps that fit into `budget_s` after `elapsed_s` seconds at
        `seconds_per_step` (evaluations budgeted at the last one's duration), at most loop.max_steps; stretch
        or shrink the schedule to it, log and print how it was chosen. Returns the new length."""
        cfg = self.config
        eval_s = (self._eval_seconds or 0.0) if self.evaluates else 0.0
        kw = dict(seconds_per_step=seconds_per_step, eval_seconds=eval_s, eval_interval=cfg.eval_interval)
        fit = steps_in_budget(budget_s, elapsed_s, self.step, max_steps=sys.maxsize, **kw)
        steps = min(fit, cfg.max_steps)
        self.time_budget = broadcast_object({  # rank 0's timing decides for all ranks
            "budget_s": budget_s, "max_steps": cfg.max_steps, "step": self.step, "elapsed_s": elapsed_s,
            "seconds_per_step": seconds_per_step, "eval_seconds": eval_s, "steps_fit": fit, "steps": steps}, self.dist)
        fit, steps = self.time_budget["steps_fit"], self.time_budget["steps"]
        self._set_length(steps)
        self._log({"event": "time_budget", **self.time_budget})
        self._print(f"time budget {budget_s:g} s: {fit:,} steps fit at {seconds_per_step:.3f} s/step"
                    + (f" ({eval_s:.1f} s per evaluation)" if eval_s else "") + f" -> training for {steps:,} steps"
                    + (f" (max_steps={cfg.max_steps})" if steps < fit else ""))
        return steps

    def _set_length(self, steps: int) -> None:
        self.max_steps = steps
        if self.scheduler is not None and hasattr(self.scheduler, "set_total_steps"):
            self.scheduler.set_total_steps(steps)

    def _log_train(self, loss: float, metrics: dict[str, float], opt: dict[str, Any], tokens: int,
                   seconds: float) -> None:
        values = torch.tensor([loss, *metrics.values()], device=self.device)
        values = all_reduce_mean(values, self.dist).tolist()  # every rank takes part, only rank 0 writes
        tokens = int(all_reduce_sum(torch.tensor(float(tokens), device=self.device), self.dist).item())
        tokens //= self.parallel.tp  # tensor-parallel peers trained on the same tokens
        self.tokens_seen += tokens
        if not math.isfinite(values[0]):
            raise TrainingError(f"the training loss is {values[0]} at step {self.step}: lower the learning rate "
                                "(lr), keep grad_clip on, or use dtype fp32; resume from the last checkpoint")
        event: dict[str, Any] = {"event": "train", "step": self.step, "loss": values[0],
                                 **dict(zip(metrics, values[1:], strict=True)), "lr": opt["lr"]}
        if "grad_norm" in opt:
            event["grad_norm"] = float(opt["grad_norm"])
        tok_s = tokens / seconds if seconds > 0 else 0.0
        self._timed = [self._timed[0] + tokens, self._timed[1] + seconds]
        event.update(tokens_per_s=tok_s, tokens_seen=self.tokens_seen, train_seconds=self._timed[1])
        if self.flops_per_token and self.peak_flops:
            event["mfu"] = self.flops_per_token * tok_s / (self.peak_flops * self.dist.world_size)
        self._log(event)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values[0]:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)

    def throughput(self) -> float:
        """Mean training tokens/s (all ranks) of this process's fit(), evaluations and checkpoints excluded."""
        return self._timed[0] / self._timed[1] if self._timed[1] > 0 else 0.0

    def run_eval(self) -> dict[str, float]:
        """One evaluation now (see the class docstring), logged, printed and plotted; returns its metrics."""
        t0 = time.perf_counter()
        if self.evaluate_fn is not None:
            result = self.evaluate_fn(self.model)
        else:
            loss = evaluate(self.model, self.objective, self.eval_data(), device=self.device,
                            autocast_dtype=self.autocast_dtype, dist=self.dist, collective=self.parallel.sharded,
                            replicas=self.parallel.tp)["loss"]
            result = {"loss": loss, **(self.eval_extras(loss) if self.eval_extras else {})}
        self.last_eval, self.last_eval_step = result, self.step
        if result:
            self._log({"event": self.eval_event, "step": self.step, "train_seconds": self._timed[1],
                       **{f"{self.eval_prefix}{k}": v for k, v in result.items()}})
            self._print(f"step {self.step}: " + ", ".join(f"{self.eval_prefix.rstrip('_')} {k} {v:.4f}"
                                                         for k, v in result.items()))
        if self.run is not None:
            self.run.plot()
        self._eval_seconds = time.perf_counter() - t0  # (what a time budget reserves per evaluation)
        return result

    def run_sample(self) -> None:
        if self.parallel.tp > 1:
            return  # generation's KV cache is not split over heads: no samples under tensor parallelism
        if self.parallel.sharded:  # every rank takes part in each forward; all draw the same tokens (same seed)
            text = self.sample(self.model)
        elif self.dist.is_main and self.run is not None:
            text = self.sample(self.model)
        else:
            return
        if self.dist.is_main and self.run is not None:
            self.last_sample = text
            self.run.add_sample(self.step, text)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a bit-identical resume needs."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            # sharded runs keep the optimizer in the checkpoint's DCP shards, beside the weights
            **({} if self.parallel.sharded_checkpoints else {"optimizer": self.optimizer.state_dict()}),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "data": self.train_data.state_dict(),
            "rng": gather_objects(rng_state(), self.dist),  # one per rank (their dropout masks differ)
            "world_size": self.dist.world_size,
            "time_budget": self.time_budget,
        }

    def resume(self, checkpoint: Path) -> None:
        """Continue from a checkpoint: its DCP shards (weights and optimizer, resharded to this world size)
        when it has them, then the rest of the training state."""
        state = load_train_state(checkpoint)
        if sharded_checkpoint.has_shards(checkpoint):
            sharded_checkpoint.load_shards(checkpoint / sharded_checkpoint.SHARDS, self.model,
                                           self.parallel.base_optimizer(self.optimizer))
        elif "optimizer" not in state:
            raise TrainingError(f"{checkpoint} has neither DCP shards nor an optimizer state to resume from")
        elif self.parallel.sharded:
            raise TrainingError(f"{checkpoint} was saved by an unsharded run (dist.strategy ddp); resume it "
                                "with dist.strategy ddp, or start a new sharded run from its weights")
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.train_data.load_state_dict(state["data"])
        # The length a time budget fitted stays, unless this start asks for another (max_steps, time_budget_s):
        # then it is max_steps again (and a budget fits it anew after the probe).
        fitted = state.get("time_budget")
        same = fitted is not None and (fitted["max_steps"], fitted["budget_s"]) == (self.config.max_steps,
                                                                                    self.config.time_budget_s)
        self.time_budget = fitted if same else None
        self._set_length(fitted["steps"] if same else self.config.max_steps)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:  # a different number of ranks: continue deterministically, but not bit-identically
            seed_everything(self.seed + 1000 * self.step + self.dist.rank)

    def save_checkpoint(self) -> None:
        if not self.checkpoints:
            return
        state = self.state_dict()  # a collective (gathers RNG states): every rank calls it
        if self.run is not None:
            meta = {**self.checkpoint_meta, "tokens_seen": self.tokens_seen,
                    **{f"val_{k}": v for k, v in self.last_eval.items()}}
            if self.parallel.sharded_checkpoints:  # every rank writes its shards
                meta["strategy"] = self.parallel.cfg.strategy
                path = sharded_checkpoint.save_sharded(self.run, self.step, self.model,
                                                       self.parallel.base_optimizer(self.optimizer),
                                                       self.tokenizer, state, meta, self.config.keep_last, self.dist)
            else:
                path = self.run.save_checkpoint(self.step, self.model, self.tokenizer, state, meta,
                                                self.config.keep_last)
            if path is not None:
                self.last_checkpoint = path
        barrier(self.dist)

    # ---- output -----------------------------------------------------------------------------------
    def _log(self, event: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(event)

    def _print(self, message: str) -> None:
        if self.dist.is_main and self.progress:
            tqdm.write(message)


def steps_in_budget(budget_s: float, elapsed_s: float, step: int, *, seconds_per_step: float, max_steps: int,
                    eval_seconds: float = 0.0, eval_interval: int = 0) -> int:
    """The length of a run that has taken `step` steps in `elapsed_s` seconds and must end within `budget_s`:
    the most steps n <= max_steps (at least `step`) whose remaining steps and evaluations fit, that is
    (n - step) * seconds_per_step + (evaluations in (step, n]) * eval_seconds <= budget_s - elapsed_s."""
    left = budget_s - elapsed_s
    if seconds_per_step <= 0:
        return max_steps

    def fits(n: int) -> bool:  # evaluations: every eval_interval steps and at the last (0: only at the last)
        evals = (n // eval_interval - step // eval_interval + (n % eval_interval != 0)) if eval_interval else 1
        return (n - step) * seconds_per_step + evals * eval_seconds <= left

    per_step = seconds_per_step + (eval_seconds / eval_interval if eval_interval else 0.0)  # evaluations amortised
    n = min(max_steps, step + max(0, math.floor((left - eval_seconds) / per_step)))  # then the exact count:
    while n < max_steps and fits(n + 1):
        n += 1
    while n > step and not fits(n):
        n -= 1
    return n


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _due(step: int, interval: int, last: bool) -> bool:
    """Every `interval` steps, and always at the last step (interval 0: only then)."""
    return last or (interval > 0 and step % interval == 0)


__all__ = ["BatchSource", "CausalLM", "LoopConfig", "Objective", "Trainer", "TrainingError", "autocast_context",
           "evaluate", "rng_state", "seed_everything", "set_rng_state", "steps_in_budget", "to_device"]
