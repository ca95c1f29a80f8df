"""Sections 2-3: training. One loop (`Trainer`) that objectives plug into, and the recipes.

    run.py          RunConfig; launch() and start_run(), the start-up every recipe shares; the run folder
    loop.py         LoopConfig; Trainer, the Objective and BatchSource protocols, CausalLM, evaluate
    optim.py        OptimConfig / MuonOptimConfig; AdamW (decay on matrices only), Muon, the lr schedule
    config.py       TrainConfig / DataConfig: the pretraining config (configs/quickstart.yaml, ...)
    distributed.py  torchrun / DDP set-up and the few collectives the loop needs
    perf.py         tokens/s and MFU (peak FLOP/s of GPUs, measured on CPUs)
    pretrain.py     the recipe: `pretrain(config)`, `evaluate_checkpoint`, `quickstart_config`
    examples.py     collators, packing, ExampleSource: examples -> batches for SFT and preference pairs
    objectives.py   SFT, RewardBT, DPO, ORPO objectives; sequence and token log-probs
    align.py        the sft / reward / dpo / orpo recipes and their configs
    rl_objectives.py, policy.py, rollout.py, rewards.py   PPO's math, policy + value head, rollouts, rewards
    ppo.py          the PPO recipe (RLOO / GRPO too) and `byollm ppo` on chat prompts

>>> from byollm.train import load_config, pretrain
>>> pretrain(load_config("configs/quickstart.yaml", {"max_steps": 100}))
"""

from byollm.train.config import DataConfig, TrainConfig, load_config
from byollm.train.loop import BatchSource, CausalLM, LoopConfig, Objective, Trainer, TrainingError, evaluate
from byollm.train.optim import (
    MuonOptimConfig,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    build_training_optimizer,
    lr_at,
    param_groups,
)
from byollm.train.pretrain import PretrainResult, evaluate_checkpoint, pretrain, quickstart_config
from byollm.train.run import Run, RunConfig

__all__ = [
    "BatchSource",
    "CausalLM",
    "DataConfig",
    "LoopConfig",
    "MuonOptimConfig",
    "OptimConfig",
    "Objective",
    "PretrainResult",
    "Run",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "build_optimizer",
    "build_scheduler",
    "build_training_optimizer",
    "evaluate",
    "evaluate_checkpoint",
    "load_config",
    "lr_at",
    "param_groups",
    "pretrain",
    "quickstart_config",
]
