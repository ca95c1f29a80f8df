"""RLHF with PPO, from scratch, as one more plug-in of the one training loop.

The policy (a GPT) answers prompts; a reward function scores the answers; PPO (Schulman et al. 2017) nudges
the policy towards higher scores while a per-token KL penalty keeps it close to a frozen reference copy of
where it started (Ziegler et al. 2019; Ouyang et al. 2022). The loop is the same `Trainer` as pretraining;
what PPO supplies is a batch source that *makes* its data and an objective:

    RolloutSource  (BatchSource)   every rollout_size prompts:
        1. generate     the policy answers them with our KV-cache generator (batched, left-padded prompts)
        2. score        reward_fn(prompt_ids, response_ids) -> (B,) scores (a reward model or any function)
        3. evaluate     one no-grad pass each: the policy's log-probs and values, the reference's log-probs
        4. rewards      r_t = -kl_coef * (logp_t - ref_logp_t) on every response token, + score on the last
        5. advantages   GAE(gamma, lam) over the response tokens, whitened over the rollout; returns = A + V
       then serves the rollout as shuffled minibatches for ppo_epochs epochs, and only then generates anew.
    PPOObjective  (Objective)       per minibatch, on the current policy:
        clipped surrogate   max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),  ratio = exp(logp - logp_old)
        clipped value loss  0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2)
        loss = policy loss + vf_coef * value loss - ent_coef * entropy
    PolicyWithValue  the GPT plus a value head: one linear layer on its final hidden states

Why a value head on the policy rather than a separate critic: it is one network in memory and one forward
pass per minibatch (what TRL's classic PPOTrainer and the InstructGPT-era recipes of small models did). The
cost is that value gradients also move the shared trunk; `vf_coef` keeps them small.

Shapes: B sequences, P prompt width (left-padded), R response width (right-padded), V vocabulary. Every
per-token tensor is (B, R) and comes with `mask` (1 on real response tokens, the stop token included; 0 on
padding and anything after a stop token), and every mean over tokens is a masked mean.

The same machinery runs two critic-free variants (`RolloutConfig.advantage`): each prompt is answered
samples_per_prompt times and each answer's advantage comes from comparing it with its siblings: RLOO (the
mean reward of the others as baseline, KL in the reward) and GRPO (scores standardised within the group, KL
to the reference as a loss term). The clipped surrogate is the same; there is no value loss.

Resume: the source's state holds its counters and the current rollout itself (a few small tensors), so a run
resumed from a checkpoint in the middle of a rollout continues with exactly the minibatches it would have
seen. Everything random is seeded from (seed, rollout number, rank): prompt order, sampling, minibatch order.
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
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.checkpoint import load_checkpoint
from byollm.errors import ByollmError, CheckpointError, ConfigError, DataError
from byollm.generate import SamplingParams, generate
from byollm.model import GPT
from byollm.model.model import Attention
from byollm.train import distributed
from byollm.train.loop import Trainer, autocast_context, seed_everything
from byollm.train.optim import build_optimizer
from byollm.train.pretrain import find_resume_checkpoint, resolve_dtype
from byollm.train.run import Run, load_train_state, run_meta

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
"""reward_fn(prompt_ids, response_ids) -> (B,) float scores. response_ids are the generated tokens, a final
stop token included when the answer stopped; a reward model scores prompt + response."""


# --------------------------------------------------------------------------------------------------
# The per-token arithmetic: pure functions on (B, R) tensors, each tested against numbers worked by hand
# --------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over everything, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance, as TRL), 0 elsewhere.

    Advantages are whitened so the policy step has the same scale whatever the scale of the rewards: about
    half the tokens are pushed up and half down. shift_mean=False rescales only (keeps the sign of each)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def response_mask(response_ids: torch.Tensor, lengths: torch.Tensor,
                  stop_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """(B, R) mask of the tokens that count: position < length, and no stop token before it (a stop token
    itself counts: emitting it was an action; what follows it was never part of the answer)."""
    width = response_ids.size(1)
    mask = torch.arange(width, device=response_ids.device)[None, :] < lengths[:, None]
    if stop_token_ids:
        stops = torch.isin(response_ids, torch.tensor(list(stop_token_ids), device=response_ids.device)) & mask
        stops_before = (stops.long().cumsum(dim=1) - stops.long()) > 0
        mask = mask & ~stops_before
    return mask.long()


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and KL: r_t = -kl_coef * kl_t on every response token, plus the sequence's score
    on its last real token. kl_t = logp_t - ref_logp_t, the sampled estimate of KL(policy || reference)
    (its sum over a sequence is the sequence's log-likelihood ratio). Returns (rewards, kl), 0 off the mask.

    The score comes only at the end because the reward model judges whole answers; the KL is charged where
    it is incurred, so GAE can credit it to the token that caused it."""
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # the index of each sequence's last real token
    has_tokens = mask.sum(dim=1) > 0
    rewards = rewards.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += torch.where(has_tokens, scores.to(rewards.dtype), 0.0)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the response tokens:

        delta_t = r_t + gamma V_{t+1} - V_t          (V after the last real token is 0: the episode ended)
        A_t     = delta_t + gamma lam A_{t+1}
        returns = A + V                              (the value loss's targets)

    The mask must be a prefix of each row (right padding); padded positions get 0 in both outputs."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask  # zeros after the end: V_{T} = 0, no reward
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: rewards (B,) in groups of k consecutive answers to the same prompt; each
    answer's baseline is the mean reward of the other k - 1, an unbiased baseline that needs no critic."""
    r = rewards.view(-1, k)
    return (r - (r.sum(dim=1, keepdim=True) - r) / (k - 1)).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each answer's score standardised within its group of k (mean 0, unit sample std)."""
    g = scores.view(-1, k)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).reshape(-1)


class PPOLosses(NamedTuple):
    policy_loss: torch.Tensor  # masked mean of the clipped surrogate
    value_loss: torch.Tensor  # 0.5 * masked mean of the clipped squared error
    clipfrac: torch.Tensor  # fraction of tokens where the clipped surrogate was the one taken
    value_clipfrac: torch.Tensor
    approx_kl: torch.Tensor  # 0.5 * mean (logp - logp_old)^2: how far this minibatch's policy has moved


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2, clip_range_value: float = 0.2) -> PPOLosses:
    """PPO's clipped losses, masked means over the response tokens.

    Policy: the ratio r = pi/pi_old multiplies the advantage, but the objective takes the pessimistic of
    r A and clip(r, 1 - eps, 1 + eps) A, so a token gains nothing from moving its probability further than
    eps once the move already helps (r > 1 + eps with A > 0, or r < 1 - eps with A < 0): its gradient is 0.
    Value: the same idea for the critic, around the values recorded at rollout time."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.maximum(vf_unclipped, vf_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        value_clipfrac = masked_mean((vf_clipped > vf_unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return PPOLosses(policy_loss, value_loss, clipfrac, value_clipfrac, approx_kl)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) under softmax(logits / temperature): (B, R, V), (B, R) -> (B, R). The temperature is
    the one used to sample, so these are the probabilities the tokens were actually drawn with."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each position's next-token distribution (nats): (B, R, V) -> (B, R)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------------------
# The policy with its value head
# --------------------------------------------------------------------------------------------------


class PolicyOutput(NamedTuple):
    logits: torch.Tensor  # (B, T - start, V)
    values: torch.Tensor  # (B, T - start)


class PolicyWithValue(nn.Module):
    """A GPT (`policy`) and a value head reading its final hidden states: V(s_t) = w . h_t + b.

    The head starts at zero, so the first values are 0 and the critic learns from the first returns without
    first unlearning a random guess. Checkpoints of a PPO run hold `policy` as an ordinary GPT checkpoint;
    the value head is training state (train_state.pt), needed only to resume."""

    def __init__(self, policy: GPT) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(policy.parameters()).device)

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, start: int = 0) -> PolicyOutput:
        """Logits and values for positions start..T-1 (the LM head runs only where they are needed)."""
        h = self.policy.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)[:, start:]
        return PolicyOutput(self.policy.lm_head(h), self.value_head(h.float()).squeeze(-1))


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0. PPO compares the policy with itself (ratio = 1 at the first step)
    and with the reference; random masks would make both comparisons noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, Attention):
            m.dropout = 0.0
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# --------------------------------------------------------------------------------------------------
# Rollouts: the batch source
# --------------------------------------------------------------------------------------------------


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Prompts left-padded to P, responses right-padded to R, side by side: (B, P + R) input_ids, the padding
    mask and positions counting real tokens only (as generation numbered them), plus response_ids (B, R) and
    response lengths (B,). Every answer then starts at column P, so one slice serves the whole batch."""
    p = max(len(x) for x in prompts)
    r = max(max((len(x) for x in responses), default=0), 1)
    b = len(prompts)
    ids = torch.full((b, p + r), pad_id, dtype=torch.long)
    mask = torch.zeros(b, p + r, dtype=torch.long)
    for i, (q, a) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, p - len(q):p] = torch.tensor(q, dtype=torch.long)
        mask[i, p - len(q):p] = 1
        if a:
            ids[i, p:p + len(a)] = torch.tensor(a, dtype=torch.long)
            mask[i, p:p + len(a)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    lengths = torch.tensor([len(a) for a in responses], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "response_ids": ids[:, p:],
           "response_lengths": lengths}
    return {k: v.to(device) for k, v in out.items()} | {"prompt_width": p}


def response_forward(model: nn.Module, batch: dict[str, Any], temperature: float = 1.0,
                     vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies, values) of the response tokens of a packed batch, each (B, R).

    The model reads prompt + response minus the last token; the outputs at positions P-1 .. P+R-2 predict
    response tokens 0 .. R-1. A PolicyWithValue also gives values (the state before each response token);
    a plain GPT (the reference) gives None. vocab_limit: ids past the tokenizer's vocabulary (a padded
    embedding table) are never sampled, so they are left out of the distribution here too."""
    p = batch["prompt_width"]
    ids, mask, pos = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1], batch["position_ids"][:, :-1]
    targets = batch["input_ids"][:, p:]
    if isinstance(_unwrap(model), PolicyWithValue):
        logits, values = model(ids, attention_mask=mask, position_ids=pos, start=p - 1)
    else:
        logits, values = model(ids, attention_mask=mask, position_ids=pos).logits[:, p - 1:], None
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    return token_logprobs(logits, targets, temperature), token_entropy(logits, temperature), values


@dataclass
class RolloutConfig:
    """What a rollout is made with (the PPO hyper-parameters that act before the loss)."""

    rollout_size: int = 16  # prompts per rollout (per process)
    mini_batch_size: int = 4  # sequences per minibatch (one Trainer micro-batch)
    ppo_epochs: int = 2  # passes over each rollout before generating the next
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; log-probs use the same one
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # (gae only: rloo/grpo advantages are already centred per prompt)
    # The advantage estimator. gae: PPO with the value head. rloo / grpo: no critic; samples_per_prompt answers
    # per prompt, each judged against the others (RLOO: Ahmadian et al. 2024, KL in the reward like PPO; GRPO:
    # Shao et al. 2024, group-normalised scores and kl_coef times the k3 KL estimate in the loss instead).
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    samples_per_prompt: int = 1  # rollout_size counts answers: rollout_size / samples_per_prompt prompts
    missing_eos_penalty: float | None = None  # subtracted from the score of answers that never stopped
    generation_batch_size: int | None = None  # prompts generated at once (None: the whole rollout)
    seed: int = 1337

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("rollout_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rollout_size % self.mini_batch_size:
            raise ConfigError(f"rollout_size ({self.rollout_size}) must be a multiple of mini_batch_size "
                              f"({self.mini_batch_size}): each rollout is cut into whole minibatches")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 for PPO (it samples), got {self.temperature}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.advantage not in ("gae", "rloo", "grpo"):
            raise ConfigError(f"advantage={self.advantage!r} is not one of gae, rloo, grpo")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ConfigError(f"advantage={self.advantage} compares several answers to each prompt: set "
                              f"samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        if self.samples_per_prompt < 1 or self.rollout_size % self.samples_per_prompt:
            raise ConfigError(f"rollout_size ({self.rollout_size}) must be a multiple of samples_per_prompt "
                              f"({self.samples_per_prompt})")


def _seed_of(*parts: int) -> int:
    """One 63-bit seed from several integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class RolloutSource:
    """The BatchSource of PPO: generates, scores and evaluates a rollout, then serves it as minibatches
    (dicts of tensors, see `make_rollout`) for ppo_epochs epochs in a seeded shuffled order.

    policy: the PolicyWithValue being trained (the plain module; generation needs no DDP), with dropout off
        (`disable_dropout`): old log-probs are recorded in eval mode and must match the training forward.
    reference: the frozen GPT the KL is measured against.
    prompts: token ids; rank r of W takes rollout prompts from a seeded permutation per pass over them.
    stop_token_ids: where an answer ends (the tokenizer's eos, a chat template's end-of-turn).
    tokenizer: optional; when the model's embedding table is padded past the tokenizer's vocab_size, the
        ids beyond it are never sampled (generate's rule) and left out of every log-prob.
    autocast_dtype: the scoring passes run under it, like the training forward.
    """

    def __init__(self, policy: PolicyWithValue, reference: nn.Module, reward_fn: RewardFn,
                 prompts: list[list[int]], config: RolloutConfig, *, stop_token_ids: Sequence[int] = (),
                 pad_id: int = 0, tokenizer: Any = None, rank: int = 0, world_size: int = 1,
                 autocast_dtype: torch.dtype | None = None) -> None:
        config.validate()
        if not prompts:
            raise DataError("PPO needs at least one prompt")
        block = policy.config.block_size
        longest = max(len(p) for p in prompts)
        if policy.config.pos_embedding == "learned" and longest + config.max_new_tokens > block:
            raise ConfigError(f"the longest prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) "
                              f"exceeds the model's block_size ({block}); shorten the prompts or max_new_tokens")
        self.policy, self.reference, self.reward_fn = policy, reference, reward_fn
        self.prompts, self.config = prompts, config
        self.stop_token_ids = tuple(stop_token_ids)
        self.pad_id, self.tokenizer = pad_id, tokenizer
        self.vocab_limit = vocab_limit_of(policy.config, tokenizer)
        self.rank, self.world_size, self.autocast_dtype = rank, world_size, autocast_dtype
        self.rollouts = 0  # rollouts made so far (the next one is number `rollouts`)
        self.served = 0  # minibatches of the current rollout already served
        self.rollout: dict[str, Any] | None = None
        self.order: list[int] = []  # the serving order of the current rollout's sequences, all epochs
        self.on_rollout: Callable[[dict[str, float]], None] | None = None  # called with each rollout's stats

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @property
    def minibatches_per_rollout(self) -> int:
        return self.config.ppo_epochs * self.config.rollout_size // self.config.mini_batch_size

    # ---- BatchSource ------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, Any]:
        if self.rollout is None or self.served >= self.minibatches_per_rollout:
            self.rollout = self.make_rollout(self.rollouts)
            self.order = self._order(self.rollouts)
            self.rollouts += 1
            self.served = 0
        mb = self.config.mini_batch_size
        idx = torch.tensor(self.order[self.served * mb:(self.served + 1) * mb], device=self.device)
        self.served += 1
        return {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) else v) for k, v in self.rollout.items()}

    def state_dict(self) -> dict[str, Any]:
        rollout = None
        if self.rollout is not None:
            rollout = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.rollout.items()}
        return {"rollouts": self.rollouts, "served": self.served, "rollout": rollout, "order": list(self.order),
                "seed": self.config.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts, self.served = state["rollouts"], state["served"]
        same_ranks = state.get("world_size", 1) == self.world_size and state.get("rank", 0) == self.rank
        if state["rollout"] is not None and same_ranks:
            self.rollout = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                            for k, v in state["rollout"].items()}
            self.order = list(state["order"])
        else:  # another rank count: start the next rollout afresh (deterministic, not bit-identical)
            self.rollout, self.order, self.served = None, [], 0

    # ---- making a rollout -------------------------------------------------------------------------
    def prompt_indices(self, k: int) -> list[int]:
        """The prompts of rollout k on this rank: consecutive slots of a seeded permutation per pass."""
        n, size = len(self.prompts), self.config.rollout_size // self.config.samples_per_prompt
        first = (k * self.world_size + self.rank) * size
        perms: dict[int, np.ndarray] = {}  # one permutation per pass over the prompts
        out = []
        for g in range(first, first + size):
            if g // n not in perms:
                perms[g // n] = np.random.default_rng(_seed_of(self.config.seed, g // n)).permutation(n)
            out.append(int(perms[g // n][g % n]))
        return out

    def _order(self, k: int) -> list[int]:
        g = torch.Generator().manual_seed(_seed_of(self.config.seed, k, self.rank, 1))
        return [i for _ in range(self.config.ppo_epochs)
                for i in torch.randperm(self.config.rollout_size, generator=g).tolist()]

    @torch.no_grad()
    def make_rollout(self, k: int) -> dict[str, Any]:
        """Rollout k: generate, score, evaluate, reward, advantages. Returns the (B, ...) tensors a minibatch
        is cut from (input_ids, attention_mask, position_ids, mask, old_logprobs, old_values, ref_logprobs,
        advantages, returns, scores), prompt_width, and `stats` (floats to log)."""
        cfg = self.config
        prompts = [self.prompts[i] for i in self.prompt_indices(k) for _ in range(cfg.samples_per_prompt)]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                stop_token_ids=self.stop_token_ids, seed=_seed_of(cfg.seed, k, self.rank, 2))
        step = cfg.generation_batch_size or len(prompts)
        responses: list[list[int]] = []
        for start in range(0, len(prompts), step):
            if start:  # each chunk its own seed, so the chunking is part of the (deterministic) recipe
                params.seed = _seed_of(cfg.seed, k, self.rank, 2, start)
            chunk = prompts[start:start + step]
            responses += generate(self.policy.policy, chunk, params, tokenizer=self.tokenizer).token_ids
        return self.score_rollout(prompts, responses)

    @torch.no_grad()
    def score_rollout(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, Any]:
        """Everything after generation (also what RLOO/GRPO-style variants would reuse)."""
        cfg, device = self.config, self.device
        scores = self.reward_fn(prompts, responses)
        scores = torch.as_tensor(scores, dtype=torch.float32).to(device).reshape(-1)
        if scores.numel() != len(prompts) or not torch.isfinite(scores).all():
            raise ByollmError(f"reward_fn must return {len(prompts)} finite scores (one per answer), got "
                              f"{scores.numel()} values{'' if torch.isfinite(scores).all() else ' with nan/inf'}")
        batch = pack_sequences(prompts, responses, self.pad_id, device)
        mask = response_mask(batch["response_ids"], batch["response_lengths"], self.stop_token_ids)
        stopped = torch.tensor([bool(r) and r[-1] in self.stop_token_ids for r in responses], device=device)
        raw_scores = scores
        if cfg.missing_eos_penalty is not None and self.stop_token_ids:
            scores = scores - cfg.missing_eos_penalty * (~stopped).float()
        was_training = self.policy.training
        self.policy.eval()
        try:
            with autocast_context(device, self.autocast_dtype):
                logprobs, entropy, values = response_forward(self.policy, batch, cfg.temperature, self.vocab_limit)
                ref_logprobs, _, _ = response_forward(self.reference, batch, cfg.temperature, self.vocab_limit)
        finally:
            self.policy.train(was_training)
        values = values.float() * mask
        rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, cfg.kl_coef)
        critic = {}
        if cfg.advantage == "gae":
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            critic = {"old_values": values, "returns": returns}
        else:  # one advantage per answer, given to each of its tokens
            if cfg.advantage == "rloo":
                per_answer = rloo_advantages(scores - cfg.kl_coef * kl.sum(dim=1), cfg.samples_per_prompt)
            else:
                per_answer = grpo_advantages(scores, cfg.samples_per_prompt)
            advantages = per_answer[:, None] * mask
        stats = {
            "rollout": float(self.rollouts),  # which rollout these numbers describe (plots draw each once)
            "score": raw_scores.mean().item(),  # what the reward function says, before any penalty
            "kl": kl.sum(dim=1).mean().item(),  # per sequence: sum over its tokens of logp - ref_logp
            "nonscore_reward": (-cfg.kl_coef * kl).sum(dim=1).mean().item(),
            "response_len": mask.sum(dim=1).float().mean().item(),
            "stopped": stopped.float().mean().item(),
            "rollout_entropy": masked_mean(entropy, mask).item(),
        }
        if self.on_rollout is not None:
            self.on_rollout(stats)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "position_ids": batch["position_ids"], "mask": mask, "old_logprobs": logprobs,
                **critic, "ref_logprobs": ref_logprobs, "advantages": advantages,
                "scores": scores, "prompt_width": batch["prompt_width"], "stats": stats}


def vocab_limit_of(config: Any, tokenizer: Any) -> int | None:
    """The tokenizer's vocab_size when the model's table is padded past it (50257 of 50304), else None."""
    n = getattr(tokenizer, "vocab_size", None)
    return n if n is not None and n < config.vocab_size else None


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


class PPOObjective:
    """loss(model, minibatch): the PPO loss of a PolicyWithValue on a minibatch from RolloutSource.

    Logged per step: policy_loss, value_loss, entropy, clipfrac, value_clipfrac, approx_kl, and the rollout's
    stats (score, kl, nonscore_reward, response_len, stopped, rollout_entropy) carried in the batch."""

    def __init__(self, clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1,
                 ent_coef: float = 0.0, temperature: float = 1.0, vocab_limit: int | None = None,
                 kl_loss_coef: float = 0.0) -> None:
        if not (clip_range > 0 and clip_range_value > 0):
            raise ConfigError(f"clip_range and clip_range_value must be > 0, got {clip_range}, {clip_range_value}")
        self.clip_range, self.clip_range_value = clip_range, clip_range_value
        self.vf_coef, self.ent_coef = vf_coef, ent_coef
        self.temperature, self.vocab_limit = temperature, vocab_limit
        self.kl_loss_coef = kl_loss_coef  # GRPO: KL to the reference in the loss (k3 estimate) instead of the reward

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        mask = batch["mask"]
        logprobs, entropy, values = response_forward(model, batch, self.temperature, self.vocab_limit)
        if values is None:
            raise ByollmError("PPOObjective needs a PolicyWithValue (a GPT with a value head) as the model")
        if "returns" in batch:
            critic = (values.float(), batch["old_values"], batch["returns"])
        else:  # rloo / grpo: no critic, so no value loss (zeros: the value head gets no gradient)
            critic = (torch.zeros_like(logprobs),) * 3
        out = ppo_losses(logprobs, batch["old_logprobs"], batch["advantages"], *critic, mask, self.clip_range,
                         self.clip_range_value)
        mean_entropy = masked_mean(entropy, mask)
        loss = out.policy_loss + self.vf_coef * out.value_loss - self.ent_coef * mean_entropy
        extra: dict[str, float] = {}
        if self.kl_loss_coef:
            # k3 = e^d - d - 1 with d = ref_logp - logp: >= 0, unbiased for KL(policy || ref) (Schulman 2020)
            d = batch["ref_logprobs"] - logprobs
            kl_loss = masked_mean(torch.exp(d) - d - 1, mask)
            loss = loss + self.kl_loss_coef * kl_loss
            extra["kl_loss"] = kl_loss.item()
        metrics: dict[str, Any] = {
            "policy_loss": out.policy_loss.item(), "value_loss": out.value_loss.item(),
            "entropy": mean_entropy.item(), "clipfrac": out.clipfrac.item(),
            "value_clipfrac": out.value_clipfrac.item(), "approx_kl": out.approx_kl.item(),
            **extra, **batch.get("stats", {}), "tokens": int(mask.sum().item()),
        }
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# Rewards: a trained reward model, or any function
# --------------------------------------------------------------------------------------------------


class RewardModelScorer:
    """Turns a reward model into a reward_fn: scores prompt + response in batches with
    `model(input_ids, attention_mask=..., position_ids=...) -> (B,)` (byollm's `RewardModel`, which reads the
    score at each row's last real token). Rows are right-padded by default; positions count real tokens
    only, so padding_side="left" gives the same scores (for a model that reads the last column)."""

    def __init__(self, model: nn.Module, *, pad_id: int = 0, padding_side: Literal["right", "left"] = "right",
                 batch_size: int = 32, autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.pad_id, self.padding_side = model, pad_id, padding_side
        self.batch_size, self.autocast_dtype = batch_size, autocast_dtype

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(seqs), self.batch_size):
                chunk = seqs[start:start + self.batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for i, s in enumerate(chunk):
                    where = slice(0, len(s)) if self.padding_side == "right" else slice(width - len(s), width)
                    ids[i, where], mask[i, where] = torch.tensor(s, dtype=torch.long), 1
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                with autocast_context(device, self.autocast_dtype):
                    scores = self.model(ids.to(device), attention_mask=mask.to(device),
                                        position_ids=positions.to(device))
                out.append(torch.as_tensor(scores).float().reshape(-1))
        finally:
            self.model.train(was_training)
        return torch.cat(out)


def token_fraction_reward(token_ids: Sequence[int]) -> RewardFn:
    """A programmatic reward for demonstrations and tests: the fraction of the answer's tokens that are in
    `token_ids` (a stop token counts as a token of the answer)."""
    wanted = set(token_ids)

    def reward_fn(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor([sum(t in wanted for t in r) / max(len(r), 1) for r in response_ids])

    return reward_fn


# --------------------------------------------------------------------------------------------------
# Held-out evaluation and the plot
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_policy(policy: GPT, reference: GPT, reward_fn: RewardFn, prompts: list[list[int]], *,
                    max_new_tokens: int = 32, temperature: float = 1.0, stop_token_ids: Sequence[int] = (),
                    seed: int = 0, batch_size: int = 32, pad_id: int = 0,
                    tokenizer: Any = None) -> dict[str, float]:
    """Sample one answer per prompt (seeded: every evaluation of a run draws with the same randomness) and
    report the mean score, the mean per-sequence KL to the reference (the same quantity PPO penalises) and
    the mean answer length."""
    scores, kls, lengths = [], [], []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_token_ids=tuple(stop_token_ids), seed=seed)
    vocab_limit = vocab_limit_of(policy.config, tokenizer)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        responses = generate(policy, chunk, params, tokenizer=tokenizer).token_ids
        scores.append(torch.as_tensor(reward_fn(chunk, responses), dtype=torch.float32).reshape(-1).cpu())
        batch = pack_sequences(chunk, responses, pad_id, next(policy.parameters()).device)
        mask = response_mask(batch["response_ids"], batch["response_lengths"], stop_token_ids)
        was_training = policy.training
        policy.eval()
        try:
            lp, _, _ = response_forward(policy, batch, temperature, vocab_limit)
            ref, _, _ = response_forward(reference, batch, temperature, vocab_limit)
        finally:
            policy.train(was_training)
        kls.append(((lp - ref) * mask).sum(dim=1).cpu())
        lengths.append(mask.sum(dim=1).float().cpu())
    return {"score": torch.cat(scores).mean().item(), "kl": torch.cat(kls).mean().item(),
            "response_len": torch.cat(lengths).mean().item(), "prompts": len(prompts)}


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
        head = {k: v.detach().cpu() for k, v in _unwrap(model).value_head.state_dict().items()}
        return super().save_checkpoint(step, _unwrap(model).policy, tokenizer, {**train_state, "value_head": head},
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


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None else 0  # pads are masked everywhere, so any id in range works


def prompt_encoder(tokenizer: Any, chat: bool | None = None) -> Callable[[Any], list[int]]:
    """How a prompt becomes ids. Token ids stay as they are; a list of messages goes through the chat template
    (ending in the assistant header, so the policy writes the reply); a string is one user turn of the chat
    template when `chat` (None: when the tokenizer has the chat tokens, i.e. after SFT), else plain text."""
    from byollm.tokenizer.chat import encode_prompt, has_chat_tokens

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


def load_reward_model(path: str | Path, device: torch.device | str = "cpu",
                      tokenizer: Any = None) -> nn.Module:
    """A reward model checkpoint (written by `byollm reward`) as a RewardModel; with the policy's tokenizer
    given, a reward model that reads other token ids is refused (its scores would be of nonsense)."""
    loaded = load_checkpoint(path, device=device, reward=True)
    theirs = loaded.tokenizer
    if tokenizer is not None and theirs is not None:
        probe = "Hello, world! 123"
        if theirs.vocab_size != tokenizer.vocab_size or theirs.encode(probe) != tokenizer.encode(probe):
            raise CheckpointError(f"the reward model {loaded.path} uses another tokenizer than the policy "
                                  f"({theirs.vocab_size} vs {tokenizer.vocab_size} ids): train it from the same "
                                  "base model (for example the SFT checkpoint)")
    return loaded.model.requires_grad_(False)


__all__ = [
    "PPOConfig", "PPOLosses", "PPOObjective", "PPOResult", "PPORun", "PolicyOutput", "PolicyWithValue", "RewardFn",
    "RewardModelScorer", "RolloutConfig", "RolloutSource", "disable_dropout", "evaluate_policy", "gae",
    "grpo_advantages", "kl_penalized_rewards", "load_reward_model", "masked_mean", "masked_whiten", "pack_sequences",
    "plot_ppo_curves", "ppo", "ppo_losses", "prompt_encoder", "read_prompts", "response_forward", "response_mask",
    "rloo_advantages", "token_entropy", "token_fraction_reward", "token_logprobs", "vocab_limit_of",
]
