"""A wall-clock budget for training (LoopConfig.time_budget_s): the run's length is fitted once, after a few
timed steps, to what fits; the schedule reaches its end at the fitted last step; a resume keeps the length.

Time is a fake clock here: every training forward costs exactly `STEP_S` seconds of it, so the step count a
budget buys is known in advance and the tests do not depend on the machine's speed."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
import torch.nn as nn

from byollm.errors import ConfigError
from byollm.train import loop
from byollm.train.loop import LoopConfig, Trainer, steps_in_budget
from byollm.train.optim import OptimConfig, build_training_optimizer, lr_at

STEP_S = 0.25  # fake seconds per training step (exact in binary, so floor() sees no rounding)


class FakeClock:
    """Stands in for the `time` module of byollm.train.loop: perf_counter() is the fake time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Batches:
    """Deterministic (x, y) batches: batch i from a generator seeded with i; resumable."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.i, self.fail_at = 0, fail_at

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.i == self.fail_at:
            raise KeyboardInterrupt  # the run stops here (a crash), to be resumed from its state
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        x = torch.randn(8, 4, generator=g)
        return x, x.flip(-1)

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


class Regression:
    """The mean squared error; each call costs the clock `cost` fake seconds."""

    def __init__(self, clock: FakeClock, cost: float = STEP_S) -> None:
        self.clock, self.cost = clock, cost

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        self.clock.now += self.cost
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {"tokens": y.numel()}


OPTIM = dict(lr=0.05, min_lr=0.0, warmup_steps=5, schedule="linear")


def trainer(clock: FakeClock, cost: float = STEP_S, fail_at: int | None = None, **loop_kw: Any) -> Trainer:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    cfg = LoopConfig(**{"max_steps": 1000, "log_interval": 0, "eval_interval": 0, "checkpoint_interval": 0,
                        "time_budget_probe": 4, **loop_kw})
    optimizer, scheduler = build_training_optimizer(model, OptimConfig(**OPTIM), cfg.max_steps)
    return Trainer(model, Regression(clock, cost), Batches(fail_at), optimizer, scheduler, cfg,
                   device=torch.device("cpu"), checkpoints=False, progress=False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(loop, "time", fake)
    return fake


def brute_force(budget: float, elapsed: float, step: int, s: float, cap: int, eval_s: float, every: int) -> int:
    """The largest n <= cap whose remaining steps and evaluations fit, by trying every n (the reference)."""
    best = step
    for n in range(step + 1, cap + 1):
        evals = sum(1 for k in range(step + 1, n + 1) if (every and k % every == 0) or k == n)
        if (n - step) * s + evals * eval_s <= budget - elapsed:
            best = n
    return best


def test_steps_in_budget_is_the_most_steps_that_fit() -> None:
    # By hand: 90 s left at 0.5 s/step -> 180 more steps; with a 2 s evaluation at 50, 100, 150 and the last
    # step, 184 steps in all: 164 * 0.5 + 4 * 2 = 90 <= 90, while 185 steps need 90.5.
    assert steps_in_budget(100, 10, 20, seconds_per_step=0.5, max_steps=10**6) == 200
    assert steps_in_budget(100, 10, 20, seconds_per_step=0.5, max_steps=10**6, eval_seconds=2, eval_interval=50) == 184
    assert steps_in_budget(100, 10, 20, seconds_per_step=0.5, max_steps=150) == 150  # the cap
    assert steps_in_budget(100, 120, 20, seconds_per_step=0.5, max_steps=1000) == 20  # over budget: stop now
    rng = random.Random(0)
    for _ in range(200):
        case = dict(budget=rng.uniform(1, 60), elapsed=rng.uniform(0, 20), step=rng.randrange(0, 30),
                    s=rng.uniform(0.05, 1.0), cap=rng.randrange(30, 200), eval_s=rng.choice([0.0, rng.uniform(0, 3)]),
                    every=rng.choice([0, 7, 25]))
        got = steps_in_budget(case["budget"], case["elapsed"], case["step"], seconds_per_step=case["s"],
                              max_steps=case["cap"], eval_seconds=case["eval_s"], eval_interval=case["every"])
        assert got == brute_force(**case), case


def test_a_budget_fits_the_run_and_its_schedule_reaches_zero_at_the_fitted_end(clock: FakeClock) -> None:
    t = trainer(clock, time_budget_s=10.0)
    lrs: list[float] = []
    step = t.optimizer_step

    def recording_step() -> dict[str, float]:
        lrs.append(t.optimizer.param_groups[0]["lr"])
        return step()

    t.optimizer_step = recording_step  # type: ignore[method-assign]
    t.fit()
    # After 4 steps (1 s), 9 s are left at 0.25 s/step: 36 more, 40 in all = floor(budget / seconds per step).
    n = math.floor(10.0 / STEP_S)
    assert t.step == t.max_steps == n == 40
    assert t.time_budget == {"budget_s": 10.0, "max_steps": 1000, "step": 4, "elapsed_s": 1.0,
                             "seconds_per_step": STEP_S, "eval_seconds": 0.0, "steps_fit": 40, "steps": 40}
    # Every step's rate is the schedule of a 40-step run, and the rate after the last step is exactly zero.
    assert lrs == pytest.approx([lr_at(i, lr=0.05, min_lr=0.0, warmup_steps=5, decay_steps=n, schedule="linear")
                                 for i in range(n)], rel=1e-12)
    assert lrs[-1] > 0 and t.optimizer.param_groups[0]["lr"] == 0.0
    assert t.scheduler.state_dict()["total_steps"] == n  # type: ignore[union-attr]

    # Reproducible: the same as a run told max_steps=40 from the start, bit for bit (the probe is in the warmup).
    plain = trainer(FakeClock(), max_steps=n)
    plain.fit()
    for a, b in zip(t.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_evaluations_are_budgeted_at_their_measured_cost(clock: FakeClock) -> None:
    # An evaluation of 2 batches costs 0.5 s: at step 0 and every 10 steps and at the last. 10 s budget, after
    # 1.5 s (the eval at 0 and 4 steps), 8.5 s left: n = 30 costs 26 * 0.25 + 3 * 0.5 = 8.0, n = 31 costs 8.75.
    t = trainer(clock, time_budget_s=10.0, eval_interval=10)
    t.eval_data = lambda: [(torch.ones(2, 4), torch.ones(2, 4))] * 2
    t.fit()
    assert t.time_budget is not None and t.time_budget["eval_seconds"] == 0.5
    assert t.step == 30 == brute_force(10.0, 1.5, 4, STEP_S, 1000, 0.5, 10)
    assert clock.now <= 10.0


def test_a_resumed_run_keeps_its_fitted_length(clock: FakeClock) -> None:
    first = trainer(clock, time_budget_s=10.0, fail_at=20)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert first.step == 20 and first.max_steps == 40
    state = first.state_dict()
    # The resumed process is 4x slower: were the length fitted again, it would be 20 + 36 / 4 = 29 steps.
    resumed = trainer(clock, cost=4 * STEP_S, time_budget_s=10.0)
    resumed.model.load_state_dict(first.model.state_dict())  # (a checkpoint holds the weights beside the state)
    resumed.load_state_dict(state)
    assert resumed.max_steps == 40 and resumed.scheduler.total_steps == 40  # type: ignore[union-attr]
    resumed.fit()
    assert resumed.step == 40 and resumed.optimizer.param_groups[0]["lr"] == 0.0
    clock.now = 0.0
    uninterrupted = trainer(clock, time_budget_s=10.0)
    uninterrupted.fit()
    for a, b in zip(resumed.model.parameters(), uninterrupted.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # A resume that asks for another length gets it (and its schedule): max_steps wins over the old fit.
    longer = trainer(clock, max_steps=60)
    longer.load_state_dict(state)
    assert longer.max_steps == 60 and longer.scheduler.total_steps == 60  # type: ignore[union-attr]


def test_a_budget_needs_a_schedule_whose_length_can_change() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fixed = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with pytest.raises(ConfigError, match="time_budget_s"):
        Trainer(model, Regression(FakeClock()), Batches(), opt, fixed, LoopConfig(time_budget_s=5.0),
                device=torch.device("cpu"), progress=False)
    with pytest.raises(ConfigError, match="time_budget_s"):
        LoopConfig(time_budget_s=0.0)


def test_the_quickstart_has_a_budget_unless_told_its_steps() -> None:
    from byollm.train.pretrain import QUICKSTART, quickstart_config

    assert quickstart_config().time_budget_s == QUICKSTART["time_budget_s"] > 0
    assert quickstart_config().time_budget_probe <= quickstart_config().warmup_steps  # bitwise = max_steps=N
    assert quickstart_config({"max_steps": 20}).time_budget_s is None  # a length given is the length (canaries)
    assert quickstart_config({"max_steps": 20, "time_budget_s": 5}).time_budget_s == 5
