"""The pretraining config: the schema of configs/quickstart.yaml, nanogpt-*.yaml and gpt2-*.yaml.

It is composed of the sections the pretraining recipe reads (see `byollm.config`): the run (`RunConfig`),
the loop (`LoopConfig`), the optimiser with the Muon choice (`MuonOptimConfig`), plus what only pretraining
has: the model's shape (`model`: a preset plus overrides, `byollm.model.config.ModelChoice`), the text and
tokenizer (`data`), the batch shape, the fixed validation batches and the text sample. Flat keys are named
as in nanoGPT where nanoGPT has a name for them.

    >>> cfg = load_config("configs/quickstart.yaml", {"max_steps": 50, "model.n_layer": 2})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byollm.config import Section, parse_config
from byollm.errors import ConfigError
from byollm.model.config import ModelChoice
from byollm.train.loop import LoopConfig
from byollm.train.optim import MuonOptimConfig
from byollm.train.parallel import ParallelConfig
from byollm.train.run import RunConfig


@dataclass
class DataConfig(Section):
    """Which text to train on and how to cut it into tokens (see `byollm.data.prepare`)."""

    name: str = "tinyshakespeare"
    """a dataset name (`byollm data list`) or a local text file or folder"""
    tokenizer: str = "char"
    """char, bpe:N (train an N-id BPE), gpt2 / hf:REPO (from the Hub) or a tokenizer folder"""
    dir: str | None = None
    """an already prepared folder (train.bin, val.bin, meta.json, tokenizer/), used as it is"""
    allow_fallback: bool = False
    """when the dataset is nowhere (no mirror, cache or network): train on CPython's bundled docs text"""
    streaming: bool | None = None
    """read, tokenise and batch documents while training (no prepare step); default: when the registry
    streams the dataset (fineweb-edu)"""
    val_docs: int = 10_000
    """streaming: the first val_docs documents are the validation set, never trained on"""
    prefetch: int = 8
    """streaming: batches made ahead by a background thread (0: none)"""

    def check(self) -> None:
        if self.val_docs < 1 or self.prefetch < 0:
            raise ConfigError(f"data.val_docs must be >= 1 and data.prefetch >= 0, got {self.val_docs} and "
                              f"{self.prefetch}")


@dataclass
class TrainConfig(RunConfig, LoopConfig, MuonOptimConfig):
    """One pretraining run. One step sees batch_size x block_size x grad_accum x world_size tokens."""

    model: ModelChoice = field(default_factory=ModelChoice)
    """the model's shape: a preset plus overrides (vocab_size follows the tokenizer)"""
    data: DataConfig = field(default_factory=DataConfig)
    """the text and its tokenizer"""
    dist: ParallelConfig = field(default_factory=ParallelConfig)
    """how training is spread over the processes torchrun starts: ddp, fsdp or fsdp+tp"""
    batch_size: int = 12
    """sequences per micro-batch, per process"""
    block_size: int | None = None
    """tokens per training sequence; default: the model's block_size"""
    eval_batches: int = 20
    """fixed validation batches per evaluation"""
    stop_at_val_loss: float | None = None
    """stop early once an evaluation reaches this validation loss (benchmarks)"""
    sample_interval: int = 0
    """generate a text sample into samples.txt every N steps (and at the last one); 0: only at the end"""
    sample_prompt: str = "\n"
    """the text the samples continue"""
    sample_tokens: int = 200
    """tokens per sample"""
    peak_flops: float | None = None
    """peak FLOP/s of one device for MFU; default: the GPU's bf16 peak from a table, or measured on a CPU"""

    def check(self) -> None:
        for name in ("batch_size", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sample_interval < 0:
            raise ConfigError(f"sample_interval must be >= 0, got {self.sample_interval}")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {self.block_size}")
        if self.dist.sharded and self.optimizer == "muon":
            raise ConfigError("optimizer muon orthogonalises whole matrices, which dist.strategy "
                              f"{self.dist.strategy} splits over ranks; use optimizer adamw with it")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults), then dotted overrides such as {"model.n_layer": 4}."""
    return parse_config(TrainConfig, path, overrides)


__all__ = ["DataConfig", "TrainConfig", "load_config"]
