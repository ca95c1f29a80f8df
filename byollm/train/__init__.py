"""Sections 2-3: training. One loop (`Trainer`) that objectives plug into, and the pretraining recipe.

    loop.py         Trainer, the Objective and BatchSource protocols, CausalLM, evaluate
    config.py       TrainConfig / DataConfig: the schema of configs/*.yaml
    optim.py        AdamW with weight decay on matrices only, warmup + cosine schedule
    run.py          the run folder: config.yaml, meta.json, metrics.jsonl, plots, samples, checkpoints
    distributed.py  torchrun / DDP set-up and the few collectives the loop needs
    perf.py         tokens/s and MFU (peak FLOP/s of GPUs, measured on CPUs)
    pretrain.py     the recipe: `pretrain(config)`, `evaluate_checkpoint`, `quickstart_config`
    objectives.py   SFT, RewardBT, DPO, ORPO objectives; collators, ExampleSource, sequence_logprobs

>>> from byollm.train import load_config, pretrain
>>> pretrain(load_config("configs/quickstart.yaml", {"max_steps": 100}))
"""

from byollm.train.config import DataConfig, TrainConfig, load_config
from byollm.train.loop import BatchSource, CausalLM, Objective, Trainer, TrainingError, evaluate
from byollm.train.optim import build_optimizer, build_scheduler, lr_at, param_groups
from byollm.train.pretrain import PretrainResult, evaluate_checkpoint, pretrain, quickstart_config
from byollm.train.run import Run

__all__ = [
    "BatchSource",
    "CausalLM",
    "DataConfig",
    "Objective",
    "PretrainResult",
    "Run",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "evaluate_checkpoint",
    "load_config",
    "lr_at",
    "param_groups",
    "pretrain",
    "quickstart_config",
]
