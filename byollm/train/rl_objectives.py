"""PPO's per-token arithmetic and its objective (Schulman et al. 2017), beside the objectives of SFT and DPO.

Pure functions on (B, R) tensors, each tested against numbers worked by hand, and `PPOObjective`, the loss
of a `PolicyWithValue` on a minibatch of `RolloutSource`:

    rewards     r_t = -kl_coef * (logp_t - ref_logp_t) on every response token, + score on the last
    advantages  GAE(gamma, lam) over the response tokens, whitened over the rollout; returns = A + V
                (critic-free: RLOO's leave-one-out baseline, GRPO's group-standardised scores)
    clipped surrogate   max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),  ratio = exp(logp - logp_old)
    clipped value loss  0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2)
    loss = policy loss + vf_coef * value loss - ent_coef * entropy

Shapes: B sequences, R response width. Every per-token tensor is (B, R) and comes with `mask` (1 on real
response tokens, the stop token included; 0 on padding and anything after a stop token), and every mean
over tokens is a masked mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from byollm.errors import ByollmError, ConfigError
from byollm.train.policy import response_forward

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


__all__ = ["PPOLosses", "PPOObjective", "gae", "grpo_advantages", "kl_penalized_rewards", "masked_mean",
           "masked_whiten", "ppo_losses", "response_mask", "rloo_advantages"]
