"""The capstone's from-scratch track: data -> tokenizer + pretraining -> SFT -> DPO (+ a judge) -> evaluation ->
safety -> export -> RAG index. Every stage is a library recipe the guide teaches; this file only wires them.

One size dial (`Sizes`, picked by name): `tiny` for tests (seconds), `cpu` the default (2 CPU cores), `gpu` the
same recipe scaled for one GPU (the depth dial: a wider, deeper model, more steps, bf16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byollm.capstone.data import prepare_data
from byollm.capstone.pipeline import Stage, StageContext, sized, sizes_of


@dataclass(frozen=True)
class Sizes:
    """Everything the size dial sets."""

    preset: str = "llama-nano"
    vocab: int = 2048
    block: int = 512  # the context must hold a retrieved passage, the question and the answer (RAG)
    pretrain_steps: int = 600
    pretrain_batch: int = 8
    sft_steps: int = 300
    pref_steps: int = 200
    batch: int = 8
    max_len: int = 256  # the judge's pairs, the held-out pairs and the win rate's prompts
    chat_max_len: int = 512  # SFT and DPO examples: a grounded one (system rules + passage + question) ~400 tokens
    answer_tokens: int = 48
    win_prompts: int = 100
    hh_limit: int | None = None
    alpaca_limit: int | None = None
    shakespeare_chars: int | None = None
    max_val: int | None = None
    eval_batches: int = 20  # pretraining's held-out batches
    safety_quick: bool = False
    safety_skip: tuple[str, ...] = ()  # parts of the safety suite left out (tiny: the red team's two servers)
    # The RAG index and the served check: a 512-token model holds one short passage, not three long ones.
    rag_chunk_tokens: int | None = 96  # ~450 characters of this guide, ~200 of our BPE tokens
    check_k: int = 1
    check_tokens: int = 40
    device: str = "cpu"
    dtype: str = "fp32"


SIZES = {
    "tiny": Sizes(preset="llama-tiny", vocab=320, block=1024, pretrain_steps=4, pretrain_batch=4, sft_steps=2,
                  pref_steps=2, batch=2, max_len=128, chat_max_len=1024, answer_tokens=8, win_prompts=4, hh_limit=120,
                  alpaca_limit=60, shakespeare_chars=20_000, max_val=12, eval_batches=4, safety_quick=True,
                  safety_skip=("redteam",), rag_chunk_tokens=None, check_tokens=8),
    "cpu": Sizes(),
    "gpu": Sizes(preset="d12", vocab=8192, block=1024, pretrain_steps=5000, pretrain_batch=32, sft_steps=1500,
                 pref_steps=800, batch=16, max_len=512, chat_max_len=1024, answer_tokens=128, win_prompts=200,
                 device="cuda", dtype="bf16", check_k=2, check_tokens=96),
}


def _common(s: Sizes, out: Path) -> dict[str, Any]:
    """The run settings every training stage shares: its folder, resumable, checkpoints to resume from."""
    return {"device": s.device, "dtype": s.dtype, "out_dir": str(out), "name": "run", "resume": True,
            "log_interval": 10, "eval_interval": 0, "keep_last": 1}


def stage_data(ctx: StageContext) -> dict[str, Any]:
    s = sizes_of(ctx)
    return prepare_data(ctx.dir, shakespeare_chars=s.shakespeare_chars, alpaca_limit=s.alpaca_limit,
                        hh_limit=s.hh_limit, judge_fraction=0.3, heldout_fraction=0.1, grounded_k=s.check_k,
                        chunk_tokens=s.rag_chunk_tokens)


def stage_pretrain(ctx: StageContext) -> dict[str, Any]:
    from byollm.train import load_config, pretrain

    s = sizes_of(ctx)
    result = pretrain(load_config(None, {
        **_common(s, ctx.dir), "model.preset": s.preset, "data.name": str(ctx.inputs["data"] / "mix.txt"),
        "data.tokenizer": f"bpe:{s.vocab}", "block_size": s.block, "batch_size": s.pretrain_batch,
        "max_steps": s.pretrain_steps, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": max(1, s.pretrain_steps // 20),
        "eval_batches": s.eval_batches, "sample_tokens": 16,
        "checkpoint_interval": max(1, s.pretrain_steps // 4)}), progress=False)
    return {"val_loss": result.val.get("loss"), "steps": result.steps, "tokens_per_s": round(result.tokens_per_s),
            "train_seconds": round(result.train_seconds, 1), "checkpoint": str(result.checkpoint)}


def _align(ctx: StageContext, recipe: str, base: Path, dataset: str, steps: int, lr: float, max_len: int,
           **extra: Any) -> Any:
    from byollm.train.align import dpo, load_align_config, reward, sft

    s = sizes_of(ctx)
    run = {"sft": sft, "dpo": dpo, "reward": reward}[recipe]
    return run(load_align_config(None, {
        **_common(s, ctx.dir), "align.base": str(base), "align.dataset": dataset, "align.max_len": max_len,
        "align.max_val": s.max_val, "batch_size": s.batch, "max_steps": steps, "lr": lr, "min_lr": lr / 10,
        "warmup_steps": max(1, steps // 10), "schedule": "cosine", "weight_decay": 0.0,
        "checkpoint_interval": max(1, steps // 4), "sample_tokens": s.answer_tokens, **extra}), progress=False)


def _figures(result: Any) -> dict[str, Any]:
    return {"before": result.before, "after": result.after, "steps": result.steps,
            "seconds": round(result.seconds, 1), "data": result.data, "checkpoint": str(result.checkpoint),
            "samples": result.samples[:2]}


def stage_sft(ctx: StageContext) -> dict[str, Any]:
    s = sizes_of(ctx)
    return _figures(_align(ctx, "sft", ctx.inputs["pretrain"] / "run", str(ctx.inputs["data"] / "sft.jsonl"),
                           s.sft_steps, 1e-3, s.chat_max_len))


def stage_dpo(ctx: StageContext) -> dict[str, Any]:
    s = sizes_of(ctx)
    return _figures(_align(ctx, "dpo", ctx.inputs["sft"] / "run", str(ctx.inputs["data"] / "dpo.jsonl"),
                           s.pref_steps, 3e-4, s.chat_max_len, **{"align.beta": 0.1}))


def stage_judge(ctx: StageContext) -> dict[str, Any]:
    s = sizes_of(ctx)
    return _figures(_align(ctx, "reward", ctx.inputs["sft"] / "run", str(ctx.inputs["data"] / "hh_judge.jsonl"),
                           s.pref_steps, 3e-4, s.max_len))


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    """Held-out preference accuracy on unseen prompts, the win rate of DPO over its starting model (SFT), and how
    both answer grounded (RAG) prompts about SQuAD paragraphs they never trained on."""
    from byollm.capstone.grounded import grounded_figures
    from byollm.capstone.judging import heldout_preferences, load_heldout, win_rate
    from byollm.data.readers import read_jsonl_file

    s = sizes_of(ctx)
    pol, ref, pairs = load_heldout(ctx.inputs["dpo"] / "run", ctx.inputs["sft"] / "run",
                                   ctx.inputs["data"] / "hh_heldout.jsonl")
    prefs = heldout_preferences(pol, ref, pairs, s.max_len)
    wins = win_rate(pol, ref, ctx.inputs["judge"] / "run", pairs,
                    prompts=s.win_prompts, tokens=s.answer_tokens, max_len=s.max_len)
    questions = read_jsonl_file(ctx.inputs["data"] / "grounded_heldout.jsonl")[:s.win_prompts]
    grounded = {name: grounded_figures(m.model, m.tokenizer, questions, tokens=s.check_tokens,
                                       max_len=int(m.model.config.block_size))
                for name, m in (("start", ref), ("tuned", pol))}
    return {"preference": prefs, "win_rate": wins, "grounded": grounded,
            "sft_held_out_loss": {"base": ctx.results["sft"]["before"].get("loss"),
                                  "sft": ctx.results["sft"]["after"].get("loss")},
            "judge_held_out_accuracy": ctx.results["judge"]["after"].get("accuracy")}


def stage_safety(ctx: StageContext) -> dict[str, Any]:
    from byollm.safety.report import EvalOptions, safety_eval

    s = sizes_of(ctx)
    options = EvalOptions(quick=s.safety_quick, skip=tuple(s.safety_skip), name="capstone")
    report = safety_eval(ctx.inputs["dpo"] / "run", ctx.dir, options)
    return {k: report.get(k) for k in ("bias", "toxicity", "redteam", "fairness", "seconds", "skipped")}


def stage_export(ctx: StageContext) -> dict[str, Any]:
    from byollm.interop.convert import export_checkpoint_to_hf
    from byollm.interop.gguf import export_checkpoint_to_gguf
    from byollm.interop.model_card import build_model_card

    ckpt = ctx.inputs["dpo"] / "run"
    hf = export_checkpoint_to_hf(ckpt, ctx.dir / "hf")
    gguf = export_checkpoint_to_gguf(ckpt, ctx.dir / "model.gguf")
    card = build_model_card(ckpt, eval_path=ctx.inputs["safety"] / "safety_report.json", model_name="byollm-capstone",
                            hf_dir=str(hf), data_licenses=ctx.config["data_licenses"])
    card.save(str(Path(hf) / "README.md"))
    return {"hf": str(hf), "gguf": str(gguf), "gguf_bytes": Path(gguf).stat().st_size}


def stage_rag(ctx: StageContext) -> dict[str, Any]:
    from byollm.rag.index import index_paths

    report = index_paths([ctx.config["docs"]], ctx.dir / "index", chunk_size=ctx.config["chunk_size"], progress=False)
    return {"summary": report.summary(), "index": str(ctx.dir / "index")}


# The size fields each stage reads (its key holds only these).
DATA = ("shakespeare_chars", "alpaca_limit", "hh_limit", "check_k", "rag_chunk_tokens")
ALIGN = ("device", "dtype", "max_val", "batch", "answer_tokens")
EVALUATE = ("max_len", "win_prompts", "answer_tokens", "check_tokens")
SAFETY = ("safety_quick", "safety_skip")


def scratch_stages(size: str = "cpu", docs: str | Path = "docs") -> list[Stage]:
    """The from-scratch track's stages at one size of the dial."""
    s = SIZES[size]
    from byollm.capstone import data, grounded, judging

    return [
        Stage("data", stage_data, config=sized(s, *DATA), code=[data, grounded],
              describe="pretraining mix; SFT data with grounded RAG examples; HH pairs split by prompt"),
        Stage("pretrain", stage_pretrain, reads=["data"], describe="BPE tokenizer + base model",
              config=sized(s, "device", "dtype", "preset", "vocab", "block", "pretrain_batch", "pretrain_steps",
                           "eval_batches")),
        Stage("sft", stage_sft, reads=["data", "pretrain"], config=sized(s, *ALIGN, "sft_steps", "chat_max_len"),
              describe="SFT on Alpaca and grounded RAG examples"),
        Stage("dpo", stage_dpo, reads=["data", "sft"], config=sized(s, *ALIGN, "pref_steps", "chat_max_len"),
              describe="DPO on the policy pairs and grounded pairs"),
        Stage("judge", stage_judge, reads=["data", "sft"], config=sized(s, *ALIGN, "pref_steps", "max_len"),
              describe="a reward model on the judge pairs"),
        Stage("evaluate", stage_evaluate, reads=["data", "sft", "dpo", "judge"], config=sized(s, *EVALUATE),
              code=[judging, grounded], describe="held-out preference accuracy, win rate, grounded answers"),
        Stage("safety", stage_safety, reads=["dpo"], config=sized(s, *SAFETY),
              describe="CrowS-Pairs, toxicity, red team"),
        Stage("export", stage_export, reads=["dpo", "safety"], describe="HF dir, GGUF, model card",
              # licences of local files the lineage records without one: the mix holds Alpaca (CC BY-NC 4.0); the
              # SFT data Alpaca and SQuAD (CC BY-SA 4.0), whose terms together are at least CC BY-NC-SA 4.0
              config={"data_licenses": ["mix.txt=CC-BY-NC-4.0", "sft.jsonl=CC-BY-NC-SA-4.0",
                                        "dpo.jsonl=CC-BY-SA-4.0"]}),
        Stage("rag", stage_rag, config={"docs": str(docs), "chunk_size": s.rag_chunk_tokens},
              files=[Path(docs)], describe="RAG index of the guide"),
    ]


def dump(results: list[Any]) -> str:
    return json.dumps({r.name: r.figures for r in results}, indent=2, default=str)
