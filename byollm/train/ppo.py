"""RLHF with PPO, from scratch, as one more plug-in of the one training loop: the recipe.

The policy (a GPT) answers prompts; a reward function scores the answers; PPO (Schulman et al. 2017) nudges
the policy towards higher scores while a per-token KL penalty keeps it close to a frozen reference copy of
where it started (Ziegler et al. 2019; Ouyang et al. 2022). The loop is the same `Trainer` as pretraining;
what PPO supplies is a batch source that *makes* its data and an objective, each in its own module:

    rollout.py        RolloutSource (BatchSource): generate, score, evaluate, rewards, advantages; minibatches
    rl_objectives.py  PPOObjective (Objective) and the per-token arithmetic: KL-penalised rewards, GAE,
                      RLOO / GRPO advantages, the clipped policy and value losses
    policy.py         PolicyWithValue (the GPT plus a value head), pack_sequences, response_forward
    rewards.py        RewardModelScorer, token_fraction_reward, load_reward_model, evaluate_policy

This module puts them together: `ppo(PPOConfig)` loads the policy and the reference, the reward and the
prompts, runs the `Trainer` with held-out evaluations, and writes runs/<name>/ (`PPORun`: checkpoints hold
the policy as an ordinary GPT checkpoint and the value head as training state), with plots/ppo.png.
Dropout is switched off (`disable_dropout`): PPO's ratio must be exactly 1 before the first update.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.nn as nn

from byollm.checkpoint import load_checkpoint
from byollm.errors import ByollmError, CheckpointError, ConfigError, DataError
from byollm.generate import generate
from byollm.sampling import SamplingParams
from byollm.tokenizer import Tokenizer
from byollm.tokenizer.chat_template import encode_prompt, has_chat_tokens
from byollm.train import distributed
from byollm.train.loop import Trainer
from byollm.train.optim import build_optimizer
from byollm.train.policy import PolicyWithValue, disable_dropout, unwrap, vocab_limit_of
from byollm.train.rewards import RewardFn, RewardModelScorer, evaluate_policy, load_reward_model
from byollm.train.rl_objectives import PPOObjective
from byollm.train.rollout import RolloutConfig, RolloutSource
from byollm.train.run import Run, find_resume_checkpoint, load_train_state, resolve_dtype, run_meta, seed_everything

# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """One PPO run. A step is one optimizer update on grad_accum minibatches; each rollout gives
    ppo_epochs * rollout_size / (mini_batch_size * grad_accum) steps (4 with the defaults)."""

    policy: str | None = None  # CKPT of the policy to improve (normally an SFT model); also the reference
    reward_model: str | None = None  # CKPT of a reward model (or pass reward_fn= to ppo())
    prompts: str | None = None  # a file: .txt (one prompt a line), .jsonl / .json ("prompt" field or strings)
    val_prompts: int = 0  # prompts held out (a seeded choice) for evaluations; never trained on
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    stop_token_ids: list[int] | None = None  # where answers end; None: the tokenizer's eos (<|end|> after SFT)
    chat: bool | None = None  # render string prompts as a user turn of the chat template; None: if it has one
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1
    grad_clip: float = 1.0
    max_steps: int = 100
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    log_interval: int = 1
    eval_interval: int = 0  # held-out evaluation every N steps (0: at the start and the end only)
    checkpoint_interval: int = 100
    keep_last: int = 2
    seed: int = 1337
    out_dir: str = "runs"
    name: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rollout, dict):
            self.rollout = RolloutConfig(**self.rollout)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        self.rollout.validate()
        for name in ("grad_accum", "max_steps", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("log_interval", "eval_interval", "checkpoint_interval", "val_prompts", "lr", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"name {self.name!r} must be a plain folder name (runs/<name>/)")
        minibatches = self.rollout.ppo_epochs * self.rollout.rollout_size // self.rollout.mini_batch_size
        if minibatches % self.grad_accum:
            # An optimizer step must not straddle two rollouts (its minibatches would come from two policies).
            raise ConfigError(f"grad_accum ({self.grad_accum}) must divide the {minibatches} minibatches of a "
                              "rollout (ppo_epochs * rollout_size / mini_batch_size)")


@dataclass
class PPOResult:
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint: an ordinary GPT checkpoint (+ train_state.pt)
    steps: int
    before: dict[str, float]  # held-out evaluation of the starting policy (empty without held-out prompts)
    after: dict[str, float]  # ... and of the final one
    plot: Path | None


def read_prompts(path: str | Path) -> list[str | list[dict[str, str]]]:
    """Prompts from a file: .txt one per line (blank lines skipped); .jsonl one record per line, .json a list
    of records, each a string, {"prompt": str} or {"messages": [{"role", "content"}, ...]} (a final assistant
    message, the reply of a dataset's conversation, is dropped when encoding)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    try:
        rows = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise DataError(f"{p} must hold a list of prompts")
    out: list[str | list[dict[str, str]]] = []
    for i, row in enumerate(rows):
        value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else row
        ok = (isinstance(value, str) and value) or (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value))
        if not ok:
            raise DataError(f"{p}, record {i}: expected a non-empty string, {{'prompt': str}} or {{'messages': "
                            "[{'role': ..., 'content': ...}, ...]}")
        out.append(value)
    return out


class PPORun(Run):
    """A Run whose checkpoints hold the policy as an ordinary GPT checkpoint (what chat, generate and the HF
    export read) and the value head in train_state.pt: the critic is only needed to continue training."""

    def save_checkpoint(self, step: int, model: nn.Module, tokenizer: Any, train_state: dict[str, Any],
                        meta: dict[str, Any], keep_last: int) -> Path | None:
        head = {k: v.detach().cpu() for k, v in unwrap(model).value_head.state_dict().items()}
        return super().save_checkpoint(step, unwrap(model).policy, tokenizer, {**train_state, "value_head": head},
                                       meta, keep_last)


def ppo(cfg: PPOConfig, *, reward_fn: RewardFn | None = None,
        prompts: Sequence[str] | Sequence[list[int]] | None = None,
        eval_prompts: Sequence[str] | Sequence[list[int]] | None = None,
        encode: Callable[[Any], list[int]] | None = None, progress: bool = True) -> PPOResult:
    """Run PPO: cfg.policy improved against reward_fn (or cfg.reward_model), written to runs/<name>/.

    prompts / eval_prompts: strings, message lists or token ids (default: cfg.prompts, with cfg.val_prompts
        held out), encoded by `encode` (default `prompt_encoder(tokenizer, cfg.chat)`: the chat template for
        a chat model). Prompts too long for the model are skipped and counted, never silently.
    The checkpoints are ordinary GPT checkpoints of the policy (`byollm chat` / `generate` load them); the
    value head lives in their train_state.pt, used only to resume. metrics.jsonl holds "train" events (with
    the rollout's score and kl) and "ppo_eval" events (held-out score and kl); plots/ppo.png draws both."""
    cfg.validate()
    if cfg.policy is None:
        raise ConfigError("ppo needs a policy checkpoint (--policy CKPT), normally an SFT model")
    dist = distributed.setup(cfg.device)
    device = dist.device
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if (dist.is_main and progress) else (lambda m: None)
    autocast_dtype = resolve_dtype(cfg.dtype, device)
    try:
        # 1. Policy, and the reference: a frozen copy of the same starting weights (also when resuming).
        loaded = load_checkpoint(cfg.policy, device=device)
        say(f"[byollm] policy: {loaded.describe()}")
        tokenizer = loaded.tokenizer
        gpt = disable_dropout(loaded.model)
        reference = disable_dropout(copy.deepcopy(gpt)).eval().requires_grad_(False)

        # 2. The reward.
        reward_source = cfg.reward_model if reward_fn is None else getattr(reward_fn, "__qualname__", "reward_fn")
        if reward_fn is None:
            if cfg.reward_model is None:
                raise ConfigError("ppo needs a reward: --reward_model CKPT, or reward_fn= from Python")
            reward_model = load_reward_model(cfg.reward_model, device, tokenizer)
            say(f"[byollm] reward model: {cfg.reward_model}")
            reward_fn = RewardModelScorer(reward_model, autocast_dtype=autocast_dtype, pad_id=_pad_id(tokenizer))
        # 3. Prompts -> ids; a held-out set for the before/after evaluation.
        if prompts is None:
            if cfg.prompts is None:
                raise ConfigError("ppo needs prompts: --prompts FILE, or prompts= from Python")
            prompts = read_prompts(cfg.prompts)
        train_texts, held_texts = list(prompts), list(eval_prompts) if eval_prompts is not None else []
        if eval_prompts is None and cfg.val_prompts:
            if cfg.val_prompts >= len(train_texts):
                raise ConfigError(f"val_prompts={cfg.val_prompts} leaves no training prompts of {len(train_texts)}")
            perm = np.random.default_rng(cfg.seed).permutation(len(train_texts))
            held = set(perm[:cfg.val_prompts].tolist())
            held_texts = [train_texts[i] for i in sorted(held)]
            train_texts = [t for i, t in enumerate(train_texts) if i not in held]
        limit = gpt.config.block_size - cfg.rollout.max_new_tokens  # prompt + answer within the trained context
        encode = encode or prompt_encoder(tokenizer, cfg.chat)
        train_ids = _encode_prompts(train_texts, encode, limit, "training", say)
        held_ids = _encode_prompts(held_texts, encode, limit, "held-out", say) if held_texts else []
        stop_ids = tuple(cfg.stop_token_ids) if cfg.stop_token_ids is not None else (
            (tokenizer.eos_id,) if tokenizer is not None and tokenizer.eos_id is not None else ())
        vocab_limit = vocab_limit_of(gpt.config, tokenizer)
        pad_id = _pad_id(tokenizer)

        # 4. The run folder (new or resumed), the model with its value head, the optimizer.
        name = distributed.broadcast_object(cfg.name or f"ppo-{time.strftime('%Y%m%d-%H%M%S')}", dist)
        cfg = dataclasses.replace(cfg, name=name)
        run = PPORun(Path(cfg.out_dir) / name, enabled=dist.is_main)
        resume_from = find_resume_checkpoint(run, cfg.resume)
        run.remove_partial_checkpoints()
        run.write_config(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
        seed_everything(cfg.seed)
        model = PolicyWithValue(gpt)
        if cfg.rollout.advantage != "gae":  # no critic: frozen, so neither AdamW nor DDP waits for its gradient
            model.value_head.requires_grad_(False)
        state = None
        if resume_from is not None:
            state = load_train_state(resume_from)
            gpt.load_state_dict(load_checkpoint(resume_from, device=device).model.state_dict())
            model.value_head.load_state_dict(state["value_head"])
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, True, device.type)

        # 5. The pieces that plug into the one loop.
        source = RolloutSource(model, reference, reward_fn, train_ids, dataclasses.replace(cfg.rollout, seed=cfg.seed),
                               stop_token_ids=stop_ids, pad_id=pad_id, tokenizer=tokenizer, rank=dist.rank,
                               world_size=dist.world_size, autocast_dtype=autocast_dtype)
        grpo = cfg.rollout.advantage == "grpo"
        objective = PPOObjective(cfg.clip_range, cfg.clip_range_value, cfg.vf_coef, cfg.ent_coef,
                                 cfg.rollout.temperature, vocab_limit, kl_loss_coef=cfg.rollout.kl_coef if grpo else 0)
        holder: dict[str, Any] = {}

        def held_out_eval(step: int) -> dict[str, float]:
            result = evaluate_policy(gpt, reference, reward_fn, held_ids, max_new_tokens=cfg.rollout.max_new_tokens,
                                     temperature=cfg.rollout.temperature, stop_token_ids=stop_ids, seed=cfg.seed,
                                     pad_id=pad_id, tokenizer=tokenizer)
            run.log({"event": "ppo_eval", "step": step, **{f"eval_{k}": v for k, v in result.items()}})
            say(f"[byollm] step {step}: held-out score {result['score']:.4f}, KL {result['kl']:.3f} "
                f"({result['prompts']} prompts)")
            return result

        def sample(m: nn.Module) -> str:  # the loop's sample hook: evaluate, and show a few answers
            holder["after"] = held_out_eval(holder["trainer"].step)
            if tokenizer is None:
                return ""
            shown = held_ids[:3]
            params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    stop_token_ids=stop_ids, seed=cfg.seed)
            answers = generate(gpt, shown, params, tokenizer=tokenizer).texts
            return "\n---\n".join(tokenizer.decode(p) + (a or "") for p, a in zip(shown, answers, strict=True))

        loop_cfg = types.SimpleNamespace(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
        loop_cfg.sample_interval, loop_cfg.eval_interval = cfg.eval_interval, 0  # held-out eval via the sample hook
        trainer = Trainer(model, objective, source, optimizer, None, loop_cfg, device=device, dist=dist,
                          autocast_dtype=autocast_dtype, run=run, tokenizer=tokenizer,
                          sample=sample if held_ids and dist.is_main else None,
                          checkpoint_meta={"run": name, "recipe": "ppo", "policy": str(loaded.path)},
                          progress=progress)
        holder["trainer"] = trainer
        if state is not None:
            trainer.load_state_dict(state)
            run.rewind(trainer.step)
            say(f"[byollm] resumed from {resume_from} (step {trainer.step})")
        run.write_meta(run_meta(cfg.seed, device, {
            "run": name, "recipe": "ppo", "policy": str(loaded.path), "reward": reward_source,
            "prompts": len(train_ids), "held_out_prompts": len(held_ids),
            "resumed_from": str(resume_from) if resume_from else None}))
        per_rollout = source.minibatches_per_rollout / cfg.grad_accum
        say(f"[byollm] run {run.path}: {len(train_ids)} prompts, {cfg.rollout.rollout_size} per rollout, "
            f"{per_rollout:g} steps per rollout, {cfg.max_steps} steps")

        # 6. Train (held-out evaluation before, every eval_interval, and at the end).
        before: dict[str, float] = {}
        if held_ids and dist.is_main:
            earlier = [e for e in run.history if e.get("event") == "ppo_eval" and e["step"] == 0]
            before = ({k.removeprefix("eval_"): v for k, v in earlier[0].items() if k.startswith("eval_")}
                      if earlier else held_out_eval(0))
        trainer.fit()
        run.close()
        plot = None
        if dist.is_main and run.enabled:
            plot = plot_ppo_curves(run.history, run.path / "plots" / "ppo.png", title=name)
        checkpoint = trainer.last_checkpoint or resume_from
        after = holder.get("after", {})
        if before and after:
            say(f"[byollm] held-out score {before['score']:.4f} -> {after['score']:.4f}, KL to the reference "
                f"{after['kl']:.3f} nats per answer")
        if checkpoint is not None:
            say(f"[byollm] policy checkpoint: {checkpoint}")
        return PPOResult(run.path, checkpoint, trainer.step, before, after, plot)
    finally:
        if dist.enabled:
            distributed.teardown()


def _pad_id(tokenizer: Tokenizer | None) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None else 0  # pads are masked everywhere, so any id in range works


def prompt_encoder(tokenizer: Tokenizer | None, chat: bool | None = None) -> Callable[[Any], list[int]]:
    """How a prompt becomes ids. Token ids stay as they are; a list of messages goes through the chat template
    (ending in the assistant header, so the policy writes the reply); a string is one user turn of the chat
    template when `chat` (None: when the tokenizer has the chat tokens, i.e. after SFT), else plain text."""
    use_chat = has_chat_tokens(tokenizer) if chat is None else chat

    def encode(prompt: Any) -> list[int]:
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if tokenizer is None:
            raise CheckpointError("the policy checkpoint has no tokenizer/ to encode text prompts; pass token ids")
        if isinstance(prompt, str) and not use_chat:
            return tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a conversation with its reply: the prompt is everything before it
        return encode_prompt(tokenizer, messages)

    return encode


def _encode_prompts(prompts: list[Any], encode: Callable[[Any], list[int]], limit: int,
                    what: str, say: Callable[[str], None]) -> list[list[int]]:
    ids = [list(encode(p)) for p in prompts]
    empty = sum(1 for x in ids if not x)
    long = sum(1 for x in ids if x and len(x) > limit)
    kept = [x for x in ids if x and len(x) <= limit]
    if empty or long:  # counted and reported, never dropped silently
        say(f"[byollm] skipped {empty + long} of {len(ids)} {what} prompts ({empty} empty, {long} longer than "
            f"{limit} tokens, which leaves no room for max_new_tokens in the model's block_size)")
    if not kept:
        raise DataError(f"no usable {what} prompts ({empty} empty, {long} too long of {len(ids)})")
    return kept


# --------------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------------


def plot_ppo_curves(metrics: str | Path | list[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Reward (top) and KL to the reference (bottom) against the optimizer step, as a PNG.

    metrics: a run folder, its metrics.jsonl, or the list of events. Lines: each rollout's mean score and
    per-sequence KL ("train" events); dots: held-out evaluations ("ppo_eval" events), when there are any."""
    from matplotlib.figure import Figure  # the object API: no global backend, no display needed

    if not isinstance(metrics, list):
        path = Path(metrics)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise ByollmError(f"no metrics at {path}: give a PPO run folder or its metrics.jsonl")
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [e for e in metrics if e.get("event") == "train" and "score" in e]
    # A rollout's numbers are logged at each of its steps: draw them once, at the rollout's first step.
    train = [e for i, e in enumerate(train) if i == 0 or e.get("rollout") != train[i - 1].get("rollout")]
    held = [e for e in metrics if e.get("event") == "ppo_eval"]
    if not train and not held:
        raise ByollmError("these metrics have no PPO events (train events with 'score', or 'ppo_eval' events)")
    fig = Figure(figsize=(8, 6), tight_layout=True)
    ax_r, ax_kl = fig.subplots(2, 1, sharex=True)
    for ax, key, label in ((ax_r, "score", "mean reward"), (ax_kl, "kl", "KL to reference (nats / answer)")):
        if train:
            ax.plot([e["step"] for e in train], [e[key] for e in train], label="rollouts", alpha=0.7)
        if held:
            ax.plot([e["step"] for e in held], [e[f"eval_{key}"] for e in held], "o-", label="held-out prompts")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_r.set_title(title or "PPO: reward up, KL to the reference bounded")
    ax_kl.set_xlabel("optimizer step")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


__all__ = ["PPOConfig", "PPOResult", "PPORun", "plot_ppo_curves", "ppo", "prompt_encoder", "read_prompts"]
