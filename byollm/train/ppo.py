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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.nn as nn

from byollm.checkpoint import load_checkpoint
from byollm.data.instruct import SPLIT_SEED, VAL_FRACTION, to_pairs
from byollm.data.readers import load_records, split_records
from byollm.data.registry import find_spec
from byollm.errors import ByollmError, CheckpointError, ConfigError, DataError
from byollm.generate import generate
from byollm.sampling import SamplingParams
from byollm.tokenizer import Tokenizer
from byollm.tokenizer.chat_format import chat_format, has_chat_format
from byollm.train.loop import LoopConfig, Trainer
from byollm.train.optim import OptimConfig, build_training_optimizer
from byollm.train.policy import PolicyWithValue, disable_dropout, unwrap, vocab_limit_of
from byollm.train.rewards import RewardFn, RewardModelScorer, evaluate_policy, load_reward_model
from byollm.train.rl_objectives import PPOObjective
from byollm.train.rollout import RolloutConfig, RolloutSource
from byollm.train.run import Run, RunConfig, launch, load_train_state, run_meta, start_run

# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig(RunConfig, LoopConfig, OptimConfig):
    """One PPO run: the run, loop and AdamW sections plus the policy, the reward, the prompts, `rollout` and the
    loss. A step is one optimizer update on grad_accum minibatches; each rollout gives
    ppo_epochs * rollout_size / (mini_batch_size * grad_accum) steps (4 with the defaults)."""

    policy: str | None = None
    """CKPT of the policy to improve (required; normally an SFT model); also the frozen reference"""
    reward_model: str | None = None
    """CKPT of a reward model written by `byollm reward` (required on the command line)"""
    prompts: str | None = None
    """a prompt file (.txt one prompt a line; .jsonl/.json strings, {"prompt": ...} or {"messages": [...]}) or a
    preference dataset (hh-rlhf, or a .json/.jsonl of pairs) whose training prompts are used"""
    val_prompts: int = 0
    """held-out prompts for the evaluations (a dataset's held-out split, else a seeded choice never trained on)"""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """how answers are generated and turned into advantages"""
    stop_token_ids: list[int] | None = None
    """token ids that end an answer; default: the chat format's end-of-turn ids with chat prompts, else the eos"""
    chat: bool | None = None
    """render string prompts as a user turn of the chat template; default: when the tokenizer has one"""
    clip_range: float = 0.2
    """PPO's clip of the probability ratio (1 - c, 1 + c)"""
    clip_range_value: float = 0.2
    """clip of the value prediction's change per update"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    # The sections' defaults that differ for PPO (a constant small learning rate, no weight decay, ...).
    lr: float = 1e-5
    """learning rate (constant by default)"""
    min_lr: float = 0.0
    """learning rate at the end of the decay (when schedule is not constant)"""
    warmup_steps: int = 0
    """linear warmup over this many steps"""
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """decay shape after warmup (constant: stay at lr)"""
    weight_decay: float = 0.0
    """AdamW weight decay, on matrices only"""
    max_steps: int = 100
    """optimizer steps to train for"""
    log_interval: int = 1
    """write a train event (loss, score, KL) to metrics.jsonl every N steps"""
    eval_interval: int = 0
    """held-out evaluation (score, KL) and answers every N steps; 0: at the start and the end only"""
    checkpoint_interval: int = 100
    """save a resumable checkpoint every N steps (and at the last one)"""

    def check(self) -> None:
        if self.val_prompts < 0:
            raise ConfigError(f"val_prompts must be >= 0, got {self.val_prompts}")
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

    def save_checkpoint(self, step: int, model: nn.Module, tokenizer: Tokenizer | None, train_state: dict[str, Any],
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
    if cfg.policy is None:
        raise ConfigError("ppo needs a policy checkpoint (--policy CKPT), normally an SFT model")
    with launch(cfg) as where:
        dist, device, autocast_dtype = where.dist, where.device, where.autocast_dtype
        say = where.printer(progress)
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
        stop_ids = (tuple(cfg.stop_token_ids) if cfg.stop_token_ids is not None
                    else default_stop_ids(tokenizer, cfg.chat))
        vocab_limit = vocab_limit_of(gpt.config, tokenizer)
        pad_id = _pad_id(tokenizer)

        # 4. The run folder (new or resumed), the model with its value head, the optimizer.
        cfg, run, resume_from = start_run(cfg, where, "ppo", run_class=PPORun)
        name = cfg.name
        model = PolicyWithValue(gpt)
        if cfg.rollout.advantage != "gae":  # no critic: frozen, so neither AdamW nor DDP waits for its gradient
            model.value_head.requires_grad_(False)
        state = None
        if resume_from is not None:
            state = load_train_state(resume_from)
            gpt.load_state_dict(load_checkpoint(resume_from, device=device).model.state_dict())
            model.value_head.load_state_dict(state["value_head"])
        optimizer, scheduler = build_training_optimizer(model, cfg, cfg.max_steps, device.type)

        # 5. The pieces that plug into the one loop.
        rollout = cfg.rollout if cfg.rollout.seed is not None else dataclasses.replace(cfg.rollout, seed=cfg.seed)
        source = RolloutSource(model, reference, reward_fn, train_ids, rollout,
                               stop_token_ids=stop_ids, pad_id=pad_id, tokenizer=tokenizer, rank=dist.rank,
                               world_size=dist.world_size, autocast_dtype=autocast_dtype)
        grpo = cfg.rollout.advantage == "grpo"
        objective = PPOObjective(cfg.clip_range, cfg.clip_range_value, cfg.vf_coef, cfg.ent_coef,
                                 cfg.rollout.temperature, vocab_limit, kl_loss_coef=cfg.rollout.kl_coef if grpo else 0)

        def held_out_eval(m: nn.Module) -> dict[str, float]:  # the loop's evaluation: score and KL, rank 0
            if not dist.is_main:
                return {}
            return evaluate_policy(gpt, reference, reward_fn, held_ids, max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=cfg.rollout.temperature, stop_token_ids=stop_ids, seed=cfg.seed,
                                   pad_id=pad_id, tokenizer=tokenizer)

        def sample(m: nn.Module) -> str:  # the loop's sample hook: a few held-out answers
            if tokenizer is None:
                return ""
            shown = held_ids[:3]
            params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    stop_token_ids=stop_ids, seed=cfg.seed)
            answers = generate(gpt, shown, params, tokenizer=tokenizer).texts
            return "\n---\n".join(tokenizer.decode(p) + (a or "") for p, a in zip(shown, answers, strict=True))

        trainer = Trainer(model, objective, source, optimizer, scheduler, cfg, device=device, dist=dist,
                          autocast_dtype=autocast_dtype, run=run, tokenizer=tokenizer,
                          evaluate=held_out_eval if held_ids else None, eval_event="ppo_eval", eval_prefix="eval_",
                          sample=sample if held_ids else None, sample_interval=cfg.eval_interval,
                          compile=cfg.compile, seed=cfg.seed,
                          checkpoint_meta={"run": name, "recipe": "ppo", "policy": str(loaded.path)},
                          progress=progress)
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
        if held_ids:
            earlier = [e for e in run.history if e.get("event") == "ppo_eval" and e["step"] == 0]
            if earlier:  # resumed: the starting policy was evaluated by the run that began it
                before = {k.removeprefix("eval_"): v for k, v in earlier[0].items() if k.startswith("eval_")}
            elif trainer.step == 0:
                before = trainer.run_eval()
        trainer.fit()
        run.close()
        plot = None
        if dist.is_main and run.enabled:
            plot = plot_ppo_curves(run.history, run.path / "plots" / "ppo.png", title=name)
        checkpoint = trainer.last_checkpoint or resume_from
        after = trainer.last_eval if held_ids else {}
        if before and after:
            say(f"[byollm] held-out score {before['score']:.4f} -> {after['score']:.4f}, KL to the reference "
                f"{after['kl']:.3f} nats per answer")
        if checkpoint is not None:
            say(f"[byollm] policy checkpoint: {checkpoint}")
        return PPOResult(run.path, checkpoint, trainer.step, before, after, plot)


def ppo_chat(cfg: PPOConfig, *, prompts: list[list[int]] | None = None, eval_prompts: list[list[int]] | None = None,
             max_prompt_len: int = 128, progress: bool = True) -> Any:
    """`byollm ppo`: PPO (`byollm.train.ppo.ppo`) on chat prompts. cfg.prompts may be a prompt file (each line
    a user turn, rendered with the chat template) or a preference dataset (hh-rlhf, or a local JSON/JSONL of
    pairs): its training split's prompts are trained on and, with cfg.val_prompts > 0, that many of its
    HELD-OUT split's prompts are the evaluation set (never the training pairs). Prompts longer than
    max_prompt_len tokens are skipped and counted."""
    if cfg.policy is None:
        raise ConfigError("ppo needs a policy checkpoint (--policy CKPT), normally an SFT model")
    tok = load_checkpoint(cfg.policy).tokenizer
    if tok is None or (cfg.chat is not False and not has_chat_format(tok)):
        raise ConfigError(f"the policy {cfg.policy} has no chat template; train it with `byollm sft` first (or "
                          "--chat false for plain-text prompts)")
    if prompts is None and cfg.prompts is not None:
        is_dataset = find_spec(cfg.prompts) is not None or Path(cfg.prompts).suffix in (".json", ".jsonl") and \
            _looks_like_pairs(cfg.prompts)
        if is_dataset:
            prompts = prompt_ids(tok, cfg.prompts, "train", max_prompt_len)
            if cfg.val_prompts and eval_prompts is None:
                eval_prompts = prompt_ids(tok, cfg.prompts, "val", max_prompt_len)[:cfg.val_prompts]
        else:
            # strings become a user turn, {"messages": [...]} records keep their roles (a final reply is dropped)
            encode = prompt_encoder(tok, cfg.chat)
            prompts = [encode(p) for p in read_prompts(cfg.prompts)]
    if eval_prompts is not None:
        cfg = dataclasses.replace(cfg, val_prompts=0)
    return ppo(cfg, prompts=prompts, eval_prompts=eval_prompts, progress=progress)


def _looks_like_pairs(path: str) -> bool:
    try:
        first = load_records(path)[:1]
    except DataError:
        return False
    return bool(first) and isinstance(first[0], dict) and "chosen" in first[0]


def prompt_ids(tok: Tokenizer, dataset: str, split: str, max_prompt_len: int, *,
               val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> list[list[int]]:
    """The chat-rendered prompts (ending with the assistant header) of a preference dataset's split, at most
    max_prompt_len tokens each (longer ones are skipped, and the count is printed)."""
    records = load_records(dataset)
    train_idx, val_idx = split_records(len(records), val_fraction, seed)
    pairs, report = to_pairs(records, indices=(train_idx if split == "train" else val_idx).tolist(),
                             source=f"{Path(dataset).name} ({split})")
    fmt = chat_format(tok)
    ids = [fmt.encode_prompt(p.prompt) for p in pairs]
    kept = [x for x in ids if len(x) <= max_prompt_len]
    print(f"[byollm] prompts {split}: {len(kept)} of {report.total} records ({report.n_skipped} unusable, "
          f"{len(ids) - len(kept)} longer than {max_prompt_len} tokens skipped)", file=sys.stderr)
    return kept


def _pad_id(tokenizer: Tokenizer | None) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None else 0  # pads are masked everywhere, so any id in range works


def _uses_chat(tokenizer: Tokenizer | None, chat: bool | None) -> bool:
    return has_chat_format(tokenizer) if chat is None else chat


def default_stop_ids(tokenizer: Tokenizer | None, chat: bool | None = None) -> tuple[int, ...]:
    """Where an answer ends by default: the chat format's end-of-turn ids (<|end|>, <|im_end|>, ... and the eos)
    when prompts are chat-rendered (`chat`, None: when the tokenizer has a chat format), else the eos."""
    if tokenizer is not None and _uses_chat(tokenizer, chat) and has_chat_format(tokenizer):
        return chat_format(tokenizer).stop_ids
    return (tokenizer.eos_id,) if tokenizer is not None and tokenizer.eos_id is not None else ()


def prompt_encoder(tokenizer: Tokenizer | None, chat: bool | None = None) -> Callable[[Any], list[int]]:
    """How a prompt becomes ids. Token ids stay as they are; a list of messages goes through the chat format
    (`byollm.tokenizer.chat_format`: byollm's template after SFT here, or an imported model's own; ending in the
    assistant header, so the policy writes the reply); a string is one user turn of it when `chat` (None: when
    the tokenizer has a chat format), else plain text."""
    use_chat = _uses_chat(tokenizer, chat)

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
        return chat_format(tokenizer).encode_prompt(messages)

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


__all__ = ["PPOConfig", "PPOResult", "PPORun", "default_stop_ids", "plot_ppo_curves", "ppo", "ppo_chat",
           "prompt_encoder", "prompt_ids", "read_prompts"]
