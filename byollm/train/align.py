"""The alignment recipes: SFT, reward model, DPO and ORPO (PPO is in ppo.py). Each reads top to bottom.

    byollm sft    --config configs/sft-alpaca-cpu.yaml --align.base runs/base
    byollm reward --config configs/reward-hh-cpu.yaml  --align.base runs/sft
    byollm dpo    --config configs/dpo-hh-cpu.yaml     --align.base runs/sft
    byollm orpo   --config configs/orpo-hh-cpu.yaml    --align.base runs/base

Every recipe does the same seven things, and differs only in the objective and the held-out metric:

1. load the starting checkpoint (`align.base`: ours, a run folder, or a Hugging Face directory);
2. make sure its tokenizer has a chat format (`byollm.tokenizer.chat_format`): an imported instruct model keeps
   its own template (e.g. SmolLM2's ChatML; nothing is added); a tokenizer without any gets byollm's control
   tokens (`add_chat_tokens`), growing the model's embedding and LM head to the new vocabulary
   (`resize_token_embeddings`: new rows start at the mean embedding);
3. build examples from a named dataset (alpaca, hh-rlhf, through the mirror) or a local JSON/JSONL file,
   split into train and held-out by record BEFORE tokenising (`byollm.data.instruct`), and print the
   DataReport line: every skipped record is counted and reported, never dropped silently;
4. measure the held-out metric of the starting model;
5. run the one `Trainer` with the objective (metrics.jsonl, plots/loss.png, samples.txt in runs/<name>/);
6. measure the held-out metric again, and sample answers to a fixed prompt set;
7. save a normal checkpoint (a reward model's is marked "kind": "reward") and print a summary.

    SFT     held-out assistant-token loss (every reply token once), before and after
    reward  held-out pairwise accuracy: share of pairs with r(chosen) > r(rejected)
    DPO     held-out implicit-reward accuracy and margin, beta * [log pi/ref (chosen) - log pi/ref (rejected)],
            with the starting model as reference; and, for the starting and the trained model alike, the
            reference-free ranking accuracy (log pi(chosen) > log pi(rejected)), which compares the two fairly
            (the starting model's implicit rewards are all exactly 0)
    ORPO    held-out accuracy (mean token log-prob of chosen > rejected) and log odds ratio, before and after

Each recipe's config (`CONFIGS[recipe]`) is the run, loop and AdamW sections plus the batch size, the sample
settings and `align` with just what that recipe reads (DPO's beta, ORPO's lambda, ...); `AlignTrainConfig`
holds every recipe's settings for Python callers. The model and its tokenizer come from `align.base`:
`model.*` and `data.*` are pretraining settings and are refused here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from byollm.atomic import atomic_write_text
from byollm.checkpoint import load_checkpoint
from byollm.config import Section, parse_config
from byollm.data.instruct import (
    SPLIT_SEED,
    VAL_FRACTION,
    DataReport,
    preference_examples,
    sft_examples,
    to_conversations,
    to_pairs,
)
from byollm.data.readers import load_records, split_records
from byollm.errors import ConfigError, DataError
from byollm.generate import generate
from byollm.model import GPT, RewardModel, resize_token_embeddings
from byollm.sampling import SamplingParams
from byollm.tokenizer import Tokenizer
from byollm.tokenizer.chat_format import chat_format, has_chat_format
from byollm.tokenizer.chat_template import add_chat_tokens
from byollm.train import distributed
from byollm.train.examples import ExampleSource, collate_preference, collate_sft, example_batches
from byollm.train.loop import LoopConfig, Trainer, evaluate
from byollm.train.objectives import DPO, ORPO, SFT, RewardBT, evaluate_pairs, precompute_reference_logprobs
from byollm.train.optim import OptimConfig, build_training_optimizer
from byollm.train.run import RunConfig, format_duration, launch, load_train_state, run_meta, start_run

RECIPES = ("sft", "reward", "dpo", "orpo")

# The fixed prompt set every recipe answers at the end of training (samples.txt and the result).
SAMPLE_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "How can I be a better friend?",
    "Write a short poem about the sea.",
]


@dataclass
class AlignData(Section):
    """What an alignment run starts from and trains on (the `align.*` keys every recipe reads)."""

    base: str | None = None
    """CKPT to start from (required): a checkpoint, a run folder (its latest) or a Hugging Face directory"""
    dataset: str = "alpaca"
    """a registry name (alpaca, hh-rlhf) or a local .json / .jsonl file of records"""
    val_fraction: float = VAL_FRACTION
    """share of records held out for evaluation (split by record, before tokenising)"""
    split_seed: int = SPLIT_SEED
    """seed of the train / held-out split (fixed, so every recipe holds out the same records)"""
    max_train: int | None = None
    """use only the first N training records (default: all)"""
    max_val: int | None = None
    """evaluate on only the first N held-out records (default: all)"""
    max_len: int = 256
    """tokens per example (prompt + reply); longer ones are skipped and counted (pairs: prompt cut first)"""
    strict: bool = False
    """make every skipped record an error instead of a counted skip"""
    eval_batch_size: int = 16
    """examples per batch in held-out evaluations"""

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"align.val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_len", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"align.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train", "max_val"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"align.{name} must be at least 1 (or null for all), got {getattr(self, name)}")


@dataclass
class PairData(AlignData):
    """Preference pairs (reward, dpo, orpo): how a too-long prompt is cut."""

    min_prompt_len: int | None = None
    """the fewest prompt tokens to keep when cutting a prompt from the left (default: max_len // 4)"""


@dataclass
class Samples(Section):
    """Answers to a fixed prompt set (sft, dpo, orpo), in samples.txt and the result."""

    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    """prompts answered into samples.txt during and after training"""
    sample_temperature: float = 0.0
    """sampling temperature of those answers (0: greedy)"""

    def check(self) -> None:
        if self.sample_temperature < 0:
            raise ConfigError(f"align.sample_temperature must be >= 0, got {self.sample_temperature}")


@dataclass
class SFTSettings(AlignData, Samples):
    """`align.*` of sft (and finetune)."""


@dataclass
class DPOSettings(PairData, Samples):
    """`align.*` of dpo."""

    beta: float = 0.1
    """DPO's beta: the strength of the implicit KL constraint to the reference"""
    reference: str | None = None
    """the reference CKPT; default: the base (the usual choice: the SFT model)"""

    def check(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"align.beta must be > 0, got {self.beta}")


@dataclass
class ORPOSettings(PairData, Samples):
    """`align.*` of orpo."""

    orpo_lambda: float = 0.1
    """weight of the odds-ratio term added to the SFT loss"""

    def check(self) -> None:
        if self.orpo_lambda < 0:
            raise ConfigError(f"align.orpo_lambda must be >= 0, got {self.orpo_lambda}")


@dataclass
class AlignConfig(DPOSettings, ORPOSettings):
    """Every recipe's `align.*` settings in one (the Python API's AlignTrainConfig; each recipe reads its own)."""


NOT_HERE = "alignment recipes take the model and tokenizer from align.base and the data from align.dataset; " \
           "remove the model.* / data.* settings"


@dataclass
class RewardTrainConfig(RunConfig, LoopConfig, OptimConfig):
    """A reward-model run: the run, loop and AdamW sections, the batch, and `align` (base, pairs, split)."""

    REFUSED: ClassVar[dict[str, str]] = {
        "model": NOT_HERE, "data": NOT_HERE,
        "optimizer": "alignment recipes use AdamW (optimizer: adamw); Muon is for pretraining here"}

    batch_size: int = 12
    """examples per micro-batch, per process"""
    align: PairData = field(default_factory=PairData)
    """the starting model, the preference data and the held-out split"""

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class SFTTrainConfig(RewardTrainConfig):
    """An SFT run: as a reward run, with conversations, plus answers to align.sample_prompts."""

    sample_interval: int = 0
    """answer align.sample_prompts into samples.txt every N steps (and at the last one); 0: only at the end"""
    sample_tokens: int = 200
    """tokens per answer"""
    align: SFTSettings = field(default_factory=SFTSettings)
    """the starting model, the conversations, the held-out split and the sample prompts"""

    def check(self) -> None:
        if self.sample_tokens < 1:
            raise ConfigError(f"sample_tokens must be at least 1, got {self.sample_tokens}")
        if self.sample_interval < 0:
            raise ConfigError(f"sample_interval must be >= 0, got {self.sample_interval}")


@dataclass
class DPOTrainConfig(SFTTrainConfig):
    """A DPO run: SFTTrainConfig with preference pairs, beta and the reference."""

    align: DPOSettings = field(default_factory=DPOSettings)
    """the starting model (also the default reference), the pairs, beta"""


@dataclass
class ORPOTrainConfig(SFTTrainConfig):
    """An ORPO run: SFTTrainConfig with preference pairs and orpo_lambda."""

    align: ORPOSettings = field(default_factory=ORPOSettings)
    """the starting model, the pairs, orpo_lambda"""


@dataclass
class AlignTrainConfig(SFTTrainConfig):
    """Any alignment recipe's config (Python callers): every recipe's align settings."""

    align: AlignConfig = field(default_factory=AlignConfig)
    """the starting model, the data and every recipe's settings"""


# What `byollm sft|reward|dpo|orpo` parse: each recipe's config lists only what that recipe reads.
CONFIGS: dict[str, type[RewardTrainConfig]] = {"sft": SFTTrainConfig, "reward": RewardTrainConfig,
                                               "dpo": DPOTrainConfig, "orpo": ORPOTrainConfig}


def load_align_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      cls: type[RewardTrainConfig] = AlignTrainConfig) -> Any:
    """An AlignTrainConfig (or one recipe's: `cls`, e.g. DPOTrainConfig, FinetuneTrainConfig) from a YAML
    recipe (configs/*-cpu.yaml) and dotted overrides ({"align.beta": 0.2})."""
    return parse_config(cls, path, overrides)


@dataclass
class ModelHooks:
    """How `byollm finetune` changes the SFT recipe (byollm.finetune.recipe): `load(base, device)` reads the
    starting model (e.g. straight into NF4), `adapt(model)` turns the chat-ready model into the one to train
    (adapters on, base frozen), `save(model, run_dir, tokenizer)` writes the result instead of the Trainer's
    checkpoints."""

    load: Any = None  # (base: str, device) -> Loaded; default load_checkpoint
    adapt: Any = None  # (model: GPT) -> nn.Module
    save: Any = None  # (model: nn.Module, run_dir: Path, tokenizer) -> Path; set: no Trainer checkpoints, no resume
    label: str | None = None  # the recipe's name in messages and the run folder (default: the recipe)


@dataclass
class AlignResult:
    recipe: str
    run_dir: Path
    checkpoint: Path | None
    steps: int
    before: dict[str, float]  # the held-out metrics of the starting model
    after: dict[str, float]  # ... and of the trained one
    data: dict[str, str]  # the DataReport lines of the train and held-out sets
    samples: list[str]  # answers to align.sample_prompts (empty for a reward model)
    seconds: float


# --------------------------------------------------------------------------------------------------
# The recipes
# --------------------------------------------------------------------------------------------------


def sft(cfg: SFTTrainConfig, *, progress: bool = True) -> AlignResult:
    """Supervised fine-tuning on conversations: the loss on assistant tokens only."""
    return align(cfg, "sft", progress=progress)


def reward(cfg: RewardTrainConfig, *, progress: bool = True) -> AlignResult:
    """A reward model (scalar head on the base) trained with the Bradley-Terry loss on preference pairs."""
    return align(cfg, "reward", progress=progress)


def dpo(cfg: DPOTrainConfig, *, progress: bool = True) -> AlignResult:
    """Direct Preference Optimisation against a frozen reference (the base, normally the SFT model)."""
    return align(cfg, "dpo", progress=progress)


def orpo(cfg: ORPOTrainConfig, *, progress: bool = True) -> AlignResult:
    """ORPO: SFT on the chosen replies plus an odds-ratio preference term; no reference model."""
    return align(cfg, "orpo", progress=progress)


def align(cfg: RewardTrainConfig, recipe: str, *, progress: bool = True,
          hooks: ModelHooks | None = None) -> AlignResult:
    """Run one recipe (sft, reward, dpo, orpo) on its config: CONFIGS[recipe], or AlignTrainConfig."""
    hooks = hooks or ModelHooks()
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    if not isinstance(cfg, CONFIGS[recipe]) and not isinstance(cfg, AlignTrainConfig):
        raise ConfigError(f"{recipe} takes a {CONFIGS[recipe].__name__}, got a {type(cfg).__name__}")
    a = cfg.align
    if a.base is None:
        raise ConfigError(f"{recipe} needs a model to start from: --align.base CKPT (a checkpoint, run folder or "
                          "Hugging Face directory)")
    t_start = time.perf_counter()
    with launch(cfg) as where:
        dist, device, autocast_dtype = where.dist, where.device, where.autocast_dtype
        say = where.printer(progress)
        # 1-2. The starting model, with a chat format in its tokenizer (and embedding rows for added tokens).
        loaded = (hooks.load or load_checkpoint)(a.base, device=device)
        label = hooks.label or recipe
        say(f"[byollm] {label}: starting from {loaded.describe()} ({loaded.model.num_params() / 1e6:.2f}M parameters)")
        tok = loaded.tokenizer
        gpt = prepare_chat_model(loaded.model, tok, say)
        if hooks.adapt is not None:
            gpt = hooks.adapt(gpt)

        # 3. Examples, split by record before tokenising; every skip counted and printed.
        max_len = a.max_len
        if gpt.config.pos_embedding == "learned" and max_len > gpt.config.block_size:
            raise ConfigError(f"align.max_len={max_len} is longer than the model's block_size "
                              f"({gpt.config.block_size}), which a learned-position model cannot exceed")
        records = load_records(a.dataset)  # read (and resolved, with its notice) once for both splits
        train, train_report = build_examples(recipe, tok, a, "train", records)
        val, val_report = build_examples(recipe, tok, a, "val", records)
        say(f"[byollm] data train: {train_report}")
        say(f"[byollm] data held-out: {val_report}")
        if not val:
            raise DataError(f"no held-out examples left ({val_report})")

        # The run folder (new, or the one to resume).
        if cfg.resume and hooks.save is not None:
            raise ConfigError(f"{label} runs save adapters, not resumable checkpoints; start a new run (no resume)")
        cfg, run, resume_from = start_run(cfg, where, label)
        name = cfg.name

        # The model the objective trains, and the objective.
        pad_id = tok.pad_id if tok.pad_id is not None else 0
        model: nn.Module = RewardModel(gpt) if recipe == "reward" else gpt
        if resume_from is not None:
            state = load_checkpoint(resume_from, device=device, reward=recipe == "reward").model.state_dict()
            model.load_state_dict(state)
        objective: Any
        if recipe == "sft":
            objective, collate = SFT(), partial(collate_sft, pad_id=pad_id, max_length=max_len)
        else:
            collate = partial(collate_preference, pad_id=pad_id, max_length=max_len)
            objective = RewardBT() if recipe == "reward" else ORPO(a.orpo_lambda) if recipe == "orpo" else DPO(a.beta)
        if recipe == "dpo":  # the frozen reference's log-probs, once per example the run reads (then it leaves memory)
            reference = gpt if a.reference is None else prepare_chat_model(
                load_checkpoint(a.reference, device=device).model, tok, say)
            if resume_from is not None and a.reference is None:
                reference = prepare_chat_model(load_checkpoint(a.base, device=device).model, tok, lambda m: None)
            drawn = drawn_indices(len(train), cfg.batch_size, cfg.max_steps * cfg.grad_accum, cfg.seed,
                                  dist.rank, dist.world_size)
            say(f"[byollm] reference log-probs of the {len(drawn)} of {len(train)} train pairs the run reads and "
                f"{len(val)} held-out ({'the base' if a.reference is None else a.reference})")
            ref = partial(precompute_reference_logprobs, reference, batch_size=a.eval_batch_size, pad_id=pad_id,
                          max_length=max_len, device=device, autocast_dtype=autocast_dtype)
            for i, example in zip(drawn, ref([train[i] for i in drawn]), strict=True):
                train[i] = example  # the others are never drawn: they stay without (collate_preference never sees them)
            val = ref(val)
            del reference

        def val_batches():
            return example_batches(val, a.eval_batch_size, collate, rank=dist.rank, world_size=dist.world_size)

        def held_out(m: nn.Module) -> dict[str, float]:
            return held_out_metrics(recipe, m, objective, val, collate, a.eval_batch_size, device, autocast_dtype,
                                    dist)

        # 4. The starting model on the held-out set.
        before = held_out(model) if resume_from is None else {}
        if before:
            say(f"[byollm] held-out before: {_fmt(before)}")

        # 5. Train with the one loop.
        source = ExampleSource(train, cfg.batch_size, collate, seed=cfg.seed, rank=dist.rank,
                               world_size=dist.world_size)
        optimizer, scheduler = build_training_optimizer(model, cfg, cfg.max_steps, device.type)
        samples: list[str] = []

        def sample(m: nn.Module) -> str:
            samples[:] = answer_prompts(m, tok, a.sample_prompts, cfg.sample_tokens, a.sample_temperature, cfg.seed)
            return "\n---\n".join(f"{p}\n=> {s}" for p, s in zip(a.sample_prompts, samples, strict=True))

        meta = {"run": name, "recipe": label, "base": str(loaded.path), "dataset": a.dataset}
        answers = recipe != "reward" and bool(a.sample_prompts)
        trainer = Trainer(model, objective, source, optimizer, scheduler, cfg, device=device, dist=dist,
                          autocast_dtype=autocast_dtype, run=run, tokenizer=tok, eval_data=val_batches,
                          sample=sample if answers else None,
                          sample_interval=cfg.sample_interval if answers else 0, compile=cfg.compile, seed=cfg.seed,
                          checkpoint_meta=meta, progress=progress, checkpoints=hooks.save is None)
        if resume_from is not None:
            trainer.load_state_dict(load_train_state(resume_from))
            run.rewind(trainer.step)
            say(f"[byollm] resumed from {resume_from} (step {trainer.step})")
        run.write_meta(run_meta(cfg.seed, device, {**meta, "world_size": dist.world_size,
                                                   "train_examples": len(train), "val_examples": len(val),
                                                   "data_train": str(train_report), "data_val": str(val_report),
                                                   "resumed_from": str(resume_from) if resume_from else None}))
        say(f"[byollm] run {run.path}: {len(train)} train / {len(val)} held-out examples, batch {cfg.batch_size} "
            f"x {cfg.grad_accum} accum x {dist.world_size}, {cfg.max_steps} steps "
            f"({cfg.max_steps / max(1, source.steps_per_epoch):.2f} epochs)")
        t0 = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0

        # 6. The trained model on the held-out set.
        after = held_out(model)
        run.log({"event": "held_out", "step": trainer.step, **{f"before_{k}": v for k, v in before.items()},
                 **{f"after_{k}": v for k, v in after.items()}})
        run.close()
        checkpoint = trainer.last_checkpoint or resume_from
        if hooks.save is not None and dist.is_main and run.enabled:
            checkpoint = hooks.save(model, run.path, tok)
        result = AlignResult(recipe, run.path, checkpoint, trainer.step, before, after,
                             {"train": str(train_report), "val": str(val_report)}, list(samples),
                             time.perf_counter() - t_start)
        if dist.is_main and run.enabled:
            prompts = a.sample_prompts if answers else []
            atomic_write_text(run.path / "held_out.json", json.dumps(
                {"recipe": recipe, "steps": trainer.step, "before": before, "after": after, "data": result.data,
                 "samples": dict(zip(prompts, samples, strict=False))}, indent=2) + "\n")

        # 7. Summary.
        say(f"[byollm] {label}: {trainer.step} steps in {format_duration(seconds)}")
        say(f"[byollm] held-out {'before ' + _fmt(before) + ' -> ' if before else ''}after {_fmt(after)}")
        for p, s in zip(a.sample_prompts[:2] if answers else [], samples, strict=False):
            say(f"[byollm] sample: {p!r} => {s[:120]!r}")
        files = ["config.yaml", "meta.json", "metrics.jsonl", "held_out.json", "plots/loss.png", "samples.txt"]
        say(f"[byollm] wrote {run.path}/: {', '.join(f for f in files if (run.path / f).exists())}")
        if checkpoint is not None:
            say(f"[byollm] checkpoint{' (reward model)' if recipe == 'reward' else ''}: {checkpoint}")
        return result


# --------------------------------------------------------------------------------------------------
# The pieces the recipes use
# --------------------------------------------------------------------------------------------------


def prepare_chat_model(model: GPT, tok: Tokenizer | None, say: Any = None) -> GPT:
    """Give `tok` a chat format when it has none: byollm's control tokens (in place), with the model's vocabulary
    grown to cover them (`resize_token_embeddings`; a table already larger than the tokenizer is left alone).
    A tokenizer with byollm's tokens or a chat template of its own (an imported instruct model) is kept as it is:
    the model is trained further in the format it already knows."""
    if tok is None:
        raise ConfigError("the base checkpoint has no tokenizer/; alignment needs one to render conversations")
    if not has_chat_format(tok):
        add_chat_tokens(tok)
        if say is not None:
            say(f"[byollm] added the chat tokens to the tokenizer ({tok.vocab_size} ids)")
    elif say is not None and (fmt := chat_format(tok)).name != "byollm":
        say(f"[byollm] chat format: the tokenizer's own {fmt.name} template (stop ids {list(fmt.stop_ids)})")
    if tok.vocab_size > model.config.vocab_size:
        if say is not None:
            say(f"[byollm] resized the embedding{'' if model.config.tie_embeddings else ' and LM head'} "
                f"{model.config.vocab_size} -> {tok.vocab_size} rows (new rows: the mean embedding)")
        resize_token_embeddings(model, tok.vocab_size)
    return model


def drawn_indices(num_examples: int, batch_size: int, draws: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """The indices (ascending) of the examples this rank's `ExampleSource(examples, batch_size, ..., seed=seed)`
    serves in its first `draws` batches: all a run of max_steps x grad_accum batches reads (a time budget only
    shortens a run), so the examples a DPO run needs reference log-probs for."""
    source = ExampleSource(range(num_examples), batch_size, list, seed=seed, rank=rank, world_size=world_size)
    drawn: set[int] = set()
    for step in range(draws):
        drawn.update(int(j) for j in source.indices(step))
        if len(drawn) == num_examples:
            break
    return sorted(drawn)


def build_examples(recipe: str, tok: Tokenizer, a: AlignConfig, split: str,
                   records: list[dict] | None = None) -> tuple[list[dict], DataReport]:
    """The train or held-out examples of a recipe: SFT examples for sft, preference examples otherwise.
    Records are split before conversion (`split_records`); max_train / max_val keep the first N of a split.
    `records`: the dataset's records when the caller has read them already (both splits come from one read)."""
    records = load_records(a.dataset) if records is None else records
    train_idx, val_idx = split_records(len(records), a.val_fraction, a.split_seed)
    idx = (train_idx if split == "train" else val_idx).tolist()
    limit = a.max_train if split == "train" else a.max_val
    idx = idx[:limit] if limit is not None else idx
    source = f"{Path(a.dataset).name} ({split})"
    if recipe == "sft":
        convs, report = to_conversations(records, indices=idx, source=source, strict=a.strict)
        return sft_examples(tok, convs, a.max_len, report=report, strict=a.strict)
    pairs, report = to_pairs(records, indices=idx, source=source, strict=a.strict)
    return preference_examples(tok, pairs, a.max_len, min_prompt_len=a.min_prompt_len, report=report,
                               strict=a.strict)


def held_out_metrics(recipe: str, model: nn.Module, objective: Any, val: list[dict], collate: Any, batch_size: int,
                     device: torch.device, autocast_dtype: torch.dtype | None,
                     dist: distributed.DistInfo | None = None) -> dict[str, float]:
    """The recipe's held-out numbers (see the module docstring), each an exact mean over the held-out set."""
    def batches(examples: list[dict]) -> Any:
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        return example_batches(examples, batch_size, collate, rank=rank, world_size=world)

    if recipe == "sft":
        r = evaluate(model, objective, batches(val), device=device, autocast_dtype=autocast_dtype, dist=dist)
        return {"loss": r["loss"], "tokens": r["tokens"], "examples": len(val)}
    r = evaluate_pairs(model, objective, batches(val), device=device, autocast_dtype=autocast_dtype, dist=dist)
    if recipe == "reward":
        return {"accuracy": r["accuracy"], "margin": r["margin"], "loss": r["loss"], "pairs": r["pairs"]}
    if recipe == "orpo":
        return {"accuracy": r["accuracy"], "log_odds_ratio": r["log_odds_ratio"], "nll": r["nll"],
                "pairs": r["pairs"]}
    return {"accuracy": r["accuracy"], "margin": r["margin"], "loss": r["loss"], "pairs": r["pairs"],
            "ranking_accuracy": r["ranking_accuracy"]}  # measured in the same pass (one of DPO's metrics)


@torch.no_grad()
def answer_prompts(model: nn.Module, tok: Tokenizer, prompts: list[str] | list[list[dict]], max_new_tokens: int = 64,
                   temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The model's replies to user prompts (strings, or conversations as message lists), in the tokenizer's chat
    format, stopping at its end of turn (<|end|>, <|im_end|>, ...); greedy with temperature 0, else seeded sampling."""
    fmt = chat_format(tok)
    ids = [fmt.encode_prompt([{"role": "user", "content": p}] if isinstance(p, str) else p) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=fmt.stop_ids,
                            seed=seed)
    was_training = model.training
    model.eval()
    try:
        return [t.strip() for t in generate(model, ids, params, tokenizer=tok).texts]
    finally:
        model.train(was_training)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) and k not in ("pairs", "tokens") else f"{k} {v:g}"
                     for k, v in metrics.items())


__all__ = ["CONFIGS", "RECIPES", "SAMPLE_PROMPTS", "AlignConfig", "AlignData", "AlignResult", "AlignTrainConfig",
           "DPOSettings", "DPOTrainConfig", "ModelHooks", "ORPOSettings", "ORPOTrainConfig", "PairData",
           "RewardTrainConfig", "SFTSettings", "SFTTrainConfig", "Samples", "align",
           "answer_prompts", "build_examples", "dpo", "drawn_indices", "held_out_metrics", "load_align_config", "orpo",
           "prepare_chat_model", "reward", "sft"]
