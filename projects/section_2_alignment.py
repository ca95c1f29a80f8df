#!/usr/bin/env python
"""Section 2 project (second half): from raw text to an aligned chat model on a CPU, measured on held-out data.

    python projects/section_2_alignment.py              # the full pipeline (about 15-20 minutes on 2 CPU cores)
    python projects/section_2_alignment.py --quick      # a tiny configuration in well under a minute (tests)
    python projects/section_2_alignment.py --out out/section2-align --threads 2

Every stage is a library recipe (the same ones `byollm pretrain / sft / reward / dpo / orpo / ppo` run):

  1. mix        one text file of the English text we have: Tiny Shakespeare + the TRAINING records of Alpaca and
                HH-RLHF (their held-out records are left out, so later held-out numbers are honest)
  2. pretrain   a byte-level BPE tokenizer trained on the mix, and a small Llama-style model
  3. sft        SFT on Alpaca: held-out assistant-token loss of the base model vs the SFT model
  4. reward     a reward model (from the SFT model) on HH-RLHF pairs: held-out pairwise accuracy
  5. dpo        DPO on HH-RLHF pairs from the SFT model: held-out ranking accuracy (log pi(chosen) > log pi(rejected))
                of the SFT model vs the DPO model, DPO's implicit-reward accuracy and margin
  6. win rate   the reward model judges DPO vs SFT greedy answers to held-out HH prompts: k wins of n
  7. orpo       ORPO on HH-RLHF pairs, separately, from the pretrained base: held-out accuracy before/after
  8. ppo        PPO from the SFT model against the reward model on HH training prompts; held-out prompts'
                mean reward and KL to the reference, before and after, curves in plots/ppo.png

OUT/report.json holds every number with its sample size and each stage's wall time; the targets are checked and
printed (the script exits 0 either way: a missed target is a finding, reported, not a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byollm.checkpoint import load_checkpoint
from byollm.data import resolve
from byollm.data.instruct import SPLIT_SEED, VAL_FRACTION, to_pairs
from byollm.data.readers import load_records, record_to_text, source_text, split_records
from byollm.tokenizer.chat_template import encode_prompt
from byollm.train import PretrainResult, load_config, pretrain
from byollm.train.align import answer_prompts, load_align_config, orpo
from byollm.train.align import dpo as run_dpo
from byollm.train.align import reward as run_reward
from byollm.train.align import sft as run_sft
from byollm.train.ppo import PPOConfig, ppo, prompt_ids
from byollm.train.rewards import RewardModelScorer, load_reward_model


@dataclass
class Sizes:
    """Everything --quick shrinks."""

    preset: str = "llama-nano"  # 4 layers x 128 wide
    vocab: int = 2048
    block: int = 256
    pretrain_steps: int = 500
    pretrain_batch: int = 16
    max_len: int = 256
    sft_steps: int = 300
    pref_steps: int = 200
    batch: int = 8
    max_train_pairs: int | None = None  # all 1,800 training pairs
    max_val: int | None = None  # all held-out records (450 Alpaca, 200 HH)
    win_prompts: int = 100
    answer_tokens: int = 48
    ppo_steps: int = 32
    ppo_rollout: int = 16
    ppo_eval_prompts: int = 32
    shakespeare_chars: int | None = None


QUICK = Sizes(preset="llama-tiny", vocab=320, block=128, pretrain_steps=4, pretrain_batch=4, max_len=128, sft_steps=2,
              pref_steps=2, batch=2, max_train_pairs=24, max_val=12, win_prompts=4, answer_tokens=8, ppo_steps=2,
              ppo_rollout=4, ppo_eval_prompts=4, shakespeare_chars=20_000)


def write_mix(out: Path, s: Sizes, records_limit: int | None = None) -> dict[str, Any]:
    """The pretraining text: Tiny Shakespeare + Alpaca and HH-RLHF TRAINING records as plain text."""
    parts = {"tinyshakespeare": source_text(resolve("tinyshakespeare"))[: s.shakespeare_chars]}
    for name in ("alpaca", "hh-rlhf"):
        records = load_records(name)
        train, _ = split_records(len(records), VAL_FRACTION, SPLIT_SEED)  # the recipes' split: held-out stays out
        idx = train.tolist()[:records_limit]
        if name == "alpaca":
            texts = [record_to_text(records[i]) for i in idx]
        else:  # the chosen transcript of each pair ("\n\nHuman: ...\n\nAssistant: ...")
            texts = [records[i]["chosen"].strip() for i in idx]
        parts[name] = "\n\n".join(texts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts.values()) + "\n", encoding="utf-8")
    return {k: len(v) for k, v in parts.items()}


def pretrain_base(out: Path, s: Sizes, quick: bool, progress: bool) -> tuple[PretrainResult, dict[str, Any]]:
    """Stages 1-2: the mix (`write_mix`) and a small Llama-style base pretrained on it, in OUT/runs/base.
    Returns `pretrain`'s result and the characters of each part of the mix. Section 4's project reuses it."""
    mix = out / "mix.txt"
    chars = write_mix(mix, s, records_limit=200 if quick else None)
    base = pretrain(load_config(None, {
        "model.preset": s.preset, "data.name": str(mix), "data.tokenizer": f"bpe:{s.vocab}", "block_size": s.block,
        "batch_size": s.pretrain_batch, "max_steps": s.pretrain_steps, "lr": 3e-3, "min_lr": 3e-4,
        "warmup_steps": max(1, s.pretrain_steps // 20), "eval_batches": 4 if quick else 20, "eval_interval": 0,
        "sample_tokens": 16 if quick else 100, "sample_prompt": "\n\nHuman:", "device": "cpu", "dtype": "fp32",
        "out_dir": str(out / "runs"), "name": "base", "log_interval": 10, "checkpoint_interval": 100_000,
        "keep_last": 1}), progress=progress)
    return base, chars


def win_rate(rm_scorer: RewardModelScorer, tok: Any, a: Any, b: Any, prompts: list[list[dict]], tokens: int,
             seed: int) -> dict[str, Any]:
    """The reward model's verdict on greedy answers of model a vs model b to the same held-out prompts."""
    ans_a = answer_prompts(a, tok, prompts, tokens, 0.0, seed)
    ans_b = answer_prompts(b, tok, prompts, tokens, 0.0, seed)
    ids = [encode_prompt(tok, p) for p in prompts]
    enc = [tok.encode(x) + [tok.special_tokens["<|end|>"]] for x in ans_a]
    enc_b = [tok.encode(x) + [tok.special_tokens["<|end|>"]] for x in ans_b]
    sa, sb = rm_scorer(ids, enc), rm_scorer(ids, enc_b)
    wins, ties = int((sa > sb).sum()), int((sa == sb).sum())
    return {"wins": wins, "ties": ties, "losses": len(prompts) - wins - ties, "n": len(prompts),
            "win_rate": (wins + 0.5 * ties) / len(prompts), "mean_score_a": sa.mean().item(),
            "mean_score_b": sb.mean().item(), "example": {"prompt": prompts[0][-1]["content"][:200],
                                                          "a": ans_a[0][:200], "b": ans_b[0][:200]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path("out/section2-align"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Sizes()
    out = args.out.resolve()
    runs = out / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise SystemExit(f"{runs} already holds runs; choose another --out or delete it")
    report: dict[str, Any] = {"quick": args.quick, "sizes": vars(s), "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "stages": {}}
    t_all = time.perf_counter()

    def stage(name: str, t0: float, **numbers: Any) -> None:
        report["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1), **numbers}
        print(f"=== {name}: {json.dumps(report['stages'][name], default=str)}", file=sys.stderr, flush=True)

    common = {"device": "cpu", "dtype": "fp32", "out_dir": str(runs), "log_interval": 10, "eval_interval": 0,
              "checkpoint_interval": 100_000, "keep_last": 1, "weight_decay": 0.0, "schedule": "cosine",
              "sample_tokens": s.answer_tokens, "align.max_len": s.max_len, "align.max_val": s.max_val}
    progress = not args.quick

    # 1-2. Pretraining text and the base model.
    t0 = time.perf_counter()
    base, chars = pretrain_base(out, s, args.quick, progress)
    stage("pretrain", t0, val_loss=base.val.get("loss"), tokens_per_s=round(base.tokens_per_s), mix_chars=chars)

    # 3. SFT on Alpaca.
    t0 = time.perf_counter()
    pref_common = {**common, "batch_size": s.batch, "max_steps": s.pref_steps,
                   "warmup_steps": max(1, s.pref_steps // 10), "align.dataset": "hh-rlhf",
                   "align.max_train": s.max_train_pairs}
    sft = run_sft(load_align_config(None, {
        **common, "name": "sft", "align.base": str(base.run_dir), "align.dataset": "alpaca", "batch_size": s.batch,
        "max_steps": s.sft_steps, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, s.sft_steps // 10)}),
        progress=progress)
    stage("sft", t0, held_out_loss_base=sft.before["loss"], held_out_loss_sft=sft.after["loss"],
          examples=sft.after["examples"], tokens=sft.after["tokens"], data=sft.data, samples=sft.samples[:2])

    # 4. Reward model on HH-RLHF (from the SFT model).
    t0 = time.perf_counter()
    rm = run_reward(load_align_config(None, {**pref_common, "name": "reward", "align.base": str(sft.run_dir),
                                             "lr": 3e-4, "min_lr": 3e-5}), progress=progress)
    stage("reward", t0, held_out_accuracy=rm.after["accuracy"], accuracy_at_start=rm.before["accuracy"],
          pairs=rm.after["pairs"], data=rm.data)

    # 5. DPO on HH-RLHF (from the SFT model, which is also the reference).
    t0 = time.perf_counter()
    dpo = run_dpo(load_align_config(None, {**pref_common, "name": "dpo", "align.base": str(sft.run_dir),
                                           "lr": 3e-4, "min_lr": 3e-5, "align.beta": 0.1}), progress=progress)
    stage("dpo", t0, ranking_accuracy_sft=dpo.before["ranking_accuracy"],
          ranking_accuracy_dpo=dpo.after["ranking_accuracy"], implicit_reward_accuracy_dpo=dpo.after["accuracy"],
          implicit_reward_margin_dpo=dpo.after["margin"], pairs=dpo.after["pairs"], data=dpo.data)

    # 6. Win rate of DPO over SFT answers on held-out HH prompts, judged by the reward model.
    t0 = time.perf_counter()
    sft_model = load_checkpoint(sft.checkpoint).model
    dpo_loaded = load_checkpoint(dpo.checkpoint)
    tok = dpo_loaded.tokenizer
    scorer = RewardModelScorer(load_reward_model(rm.checkpoint, tokenizer=tok), pad_id=tok.pad_id or 0)
    records = load_records("hh-rlhf")
    _, val_idx = split_records(len(records), VAL_FRACTION, SPLIT_SEED)
    pairs, _ = to_pairs(records, indices=val_idx.tolist())
    held_prompts = [p.prompt for p in pairs if len(encode_prompt(tok, p.prompt)) <= s.max_len - s.answer_tokens]
    held_prompts = held_prompts[: s.win_prompts]
    wr = win_rate(scorer, tok, dpo_loaded.model, sft_model, held_prompts, s.answer_tokens, seed=0)
    stage("win_rate_dpo_vs_sft", t0, **wr)

    # 7. ORPO on HH-RLHF, from the pretrained base (ORPO needs no SFT stage and no reference).
    t0 = time.perf_counter()
    orpo_run = orpo(load_align_config(None, {**pref_common, "name": "orpo", "align.base": str(base.run_dir),
                                             "lr": 1e-3, "min_lr": 1e-4, "align.orpo_lambda": 0.5}),
                    progress=progress)
    ob, oa = orpo_run.before, orpo_run.after
    stage("orpo", t0, held_out_accuracy_base=ob["accuracy"], held_out_accuracy_orpo=oa["accuracy"],
          log_odds_ratio_before=ob["log_odds_ratio"], log_odds_ratio_after=oa["log_odds_ratio"],
          pairs=orpo_run.after["pairs"], data=orpo_run.data)

    # 8. PPO from the SFT model against the reward model; held-out prompts for the curves.
    t0 = time.perf_counter()
    stoplen = s.max_len - s.answer_tokens
    train_prompts = prompt_ids(tok, "hh-rlhf", "train", stoplen)
    eval_prompts = [encode_prompt(tok, p) for p in held_prompts[: s.ppo_eval_prompts]]
    mb = max(1, s.ppo_rollout // 4)
    pcfg = PPOConfig(policy=str(sft.checkpoint), reward_model=str(rm.checkpoint),
                     rollout={"rollout_size": s.ppo_rollout, "mini_batch_size": mb, "ppo_epochs": 2,
                              "max_new_tokens": s.answer_tokens, "temperature": 1.0, "kl_coef": 0.05},
                     lr=3e-5, max_steps=s.ppo_steps, device="cpu", dtype="fp32", eval_interval=max(1, s.ppo_steps // 3),
                     checkpoint_interval=100_000, keep_last=1, out_dir=str(runs), name="ppo", log_interval=4)
    pr = ppo(pcfg, prompts=train_prompts, eval_prompts=eval_prompts, progress=progress)
    curve = [e for e in (json.loads(x) for x in (pr.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip())
             if e.get("event") == "ppo_eval"]
    stage("ppo", t0, held_out_score_before=pr.before.get("score"), held_out_score_after=pr.after.get("score"),
          held_out_kl_after=pr.after.get("kl"), prompts=len(eval_prompts), train_prompts=len(train_prompts),
          curve=[{"step": e["step"], "score": e["eval_score"], "kl": e["eval_kl"]} for e in curve],
          plot=str(pr.plot) if pr.plot else None)

    # The targets.
    st = report["stages"]
    report["targets"] = {
        "sft_lowers_held_out_loss": st["sft"]["held_out_loss_sft"] < st["sft"]["held_out_loss_base"],
        "reward_accuracy_above_50": st["reward"]["held_out_accuracy"] > 0.5,
        # The SFT model's implicit rewards (against itself) are all exactly 0: ties, i.e. chance (50%).
        "dpo_implicit_reward_accuracy_above_sft": st["dpo"]["implicit_reward_accuracy_dpo"] > 0.5,
        # The reference-free comparison (log pi(chosen) > log pi(rejected)) of the two models.
        "dpo_ranking_accuracy_above_sft": st["dpo"]["ranking_accuracy_dpo"] > st["dpo"]["ranking_accuracy_sft"],
        "dpo_win_rate_above_50": st["win_rate_dpo_vs_sft"]["win_rate"] > 0.5,
        "ppo_raises_held_out_reward": (st["ppo"]["held_out_score_after"] or 0)
        > (st["ppo"]["held_out_score_before"] or 0),
    }
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["load_after"] = os.getloadavg()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "sizes"}, indent=2, default=str))
    print(f"report: {out / 'report.json'}; {sum(report['targets'].values())} of {len(report['targets'])} targets met "
          f"in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
