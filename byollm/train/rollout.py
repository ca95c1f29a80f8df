"""PPO's batch source: `RolloutSource` makes its own data, every rollout_size prompts:

    1. generate     the policy answers them with our KV-cache generator (batched, left-padded prompts)
    2. score        reward_fn(prompt_ids, response_ids) -> (B,) scores (a reward model or any function)
    3. evaluate     one no-grad pass each: the policy's log-probs and values, the reference's log-probs
    4. rewards      r_t = -kl_coef * (logp_t - ref_logp_t) on every response token, + score on the last
    5. advantages   GAE(gamma, lam) over the response tokens, whitened over the rollout; returns = A + V
   then serves the rollout as shuffled minibatches for ppo_epochs epochs, and only then generates anew.

The same machinery runs two critic-free variants (`RolloutConfig.advantage`): each prompt is answered
samples_per_prompt times and each answer's advantage comes from comparing it with its siblings: RLOO (the
mean reward of the others as baseline, KL in the reward) and GRPO (scores standardised within the group, KL
to the reference as a loss term).

Resume: the source's state holds its counters and the current rollout itself (a few small tensors), so a run
resumed from a checkpoint in the middle of a rollout continues with exactly the minibatches it would have
seen. Everything random is seeded from (seed, rollout number, rank): prompt order, sampling, minibatch order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from byollm.config import Section
from byollm.errors import ByollmError, ConfigError, DataError
from byollm.generate import generate
from byollm.sampling import SamplingParams
from byollm.tokenizer import Tokenizer
from byollm.train.loop import autocast_context
from byollm.train.policy import PolicyWithValue, pack_sequences, response_forward, vocab_limit_of
from byollm.train.rewards import RewardFn
from byollm.train.rl_objectives import (
    gae,
    grpo_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    response_mask,
    rloo_advantages,
)


@dataclass
class RolloutConfig(Section):
    """What a rollout is made with (the PPO hyper-parameters that act before the loss): `rollout.*`."""

    rollout_size: int = 16
    """answers per rollout (per process)"""
    mini_batch_size: int = 4
    """sequences per minibatch (one Trainer micro-batch)"""
    ppo_epochs: int = 2
    """passes over each rollout before generating the next"""
    max_new_tokens: int = 32
    """longest answer, in tokens"""
    temperature: float = 1.0
    """sampling temperature of the answers; the log-probs use the same one"""
    kl_coef: float = 0.05
    """weight of the KL to the reference (per-token penalty in the reward; GRPO: in the loss)"""
    gamma: float = 1.0
    """discount of future rewards (GAE)"""
    lam: float = 0.95
    """GAE's lambda: bias/variance trade-off of the advantages"""
    whiten_advantages: bool = True
    """normalise the advantages over the rollout (gae only: rloo/grpo ones are already centred per prompt)"""
    # The advantage estimator. gae: PPO with the value head. rloo / grpo: no critic; samples_per_prompt answers
    # per prompt, each judged against the others (RLOO: Ahmadian et al. 2024, KL in the reward like PPO; GRPO:
    # Shao et al. 2024, group-normalised scores and kl_coef times the k3 KL estimate in the loss instead).
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    """gae (PPO with the value head), rloo or grpo (no critic: answers judged against their siblings)"""
    samples_per_prompt: int = 1
    """answers per prompt (rloo/grpo need >= 2); rollout_size counts answers"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of answers that never stopped (default: none)"""
    generation_batch_size: int | None = None
    """prompts generated at once (default: the whole rollout)"""
    seed: int | None = None
    """seed of the answers' sampling and the minibatch order; default: the run's seed (1337 outside a run)"""

    def check(self) -> None:
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
                 pad_id: int = 0, tokenizer: Tokenizer | None = None, rank: int = 0, world_size: int = 1,
                 autocast_dtype: torch.dtype | None = None) -> None:
        config.validate()
        if config.seed is None:
            config = dataclasses.replace(config, seed=1337)
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


__all__ = ["RolloutConfig", "RolloutSource"]
