"""Instruction tuning and preference learning: objectives that plug into the one `Trainer`.

Each is an `Objective` (loss(model, batch) -> (loss, metrics)) over the batches that `byollm.train.examples`
collates (the example formats, padding and packing are described there). Nothing else about the loop changes.

    SFT            mean cross-entropy over the response tokens only (labels -100 elsewhere)
    RewardBT       reward model, Bradley-Terry: -log sigmoid(r(chosen) - r(rejected))
    DPO            -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))])
    ORPO           SFT loss on chosen + lambda * -log sigmoid(log odds(y_c) - log odds(y_r)), no reference

Logits at position i predict token i + 1, so the loss pairs logits[:, i] with labels[:, i + 1] (`shift_labels`).
`token_logprobs` and `token_entropy` (per position, at a temperature) are also the building blocks of PPO
(`byollm.train.rl_objectives`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ConfigError, DataError
from byollm.model import position_ids_from_mask
from byollm.tokenizer.chat_template import IGNORE_INDEX
from byollm.train.distributed import DistInfo, gather_objects
from byollm.train.examples import Batch, Example, collate_preference
from byollm.train.loop import autocast_context, to_device

# --------------------------------------------------------------------------------------------------
# The building block: log-probability of the label tokens of each sequence
# --------------------------------------------------------------------------------------------------


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """targets[:, i] = labels[:, i + 1] (what position i predicts); the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def _model_inputs(attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The mask and positions to give the model. A right-padded (B, T) mask is left out: causality alone
    already hides the padding from every real token (see the module docstring), and without a mask SDPA
    can use its fused causal kernel. Anything else (left padding, a packed 4-D mask) is passed on."""
    if attention_mask is not None and attention_mask.dim() == 4 and position_ids is None:
        # Positions must restart in each packed example; 0..T-1 would silently be wrong for learned positions
        # (RoPE would not notice: it only sees differences of positions).
        raise ValueError("a packed (4-D) attention_mask needs the batch's position_ids")
    if attention_mask is not None and attention_mask.dim() == 2:
        if position_ids is None:  # count real tokens only, as Hugging Face does (right for left padding too)
            position_ids = position_ids_from_mask(attention_mask)
        if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):  # right-padded
            attention_mask = None
    return {"attention_mask": attention_mask, "position_ids": position_ids}


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None) -> torch.Tensor:
    out = model(input_ids, **_model_inputs(attention_mask, position_ids))
    return out.logits if hasattr(out, "logits") else out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature) at each position: (B, T, V), (B, T) -> (B, T) fp32, 0
    where the target is IGNORE_INDEX. `targets` are aligned with the logits (`shift_labels` of a batch's
    labels; or the sampled tokens, at the temperature they were sampled with, which PPO needs)."""
    logits = logits.float()  # in fp32: a bf16 log-softmax would round log-probs to ~2 significant digits
    if temperature != 1.0:
        logits = logits / temperature
    # cross_entropy is -log_softmax(logits)[target] without materialising a second (B, T, V) tensor, and 0 where
    # the target is ignore_index.
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view_as(targets)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each position's next-token distribution softmax(logits / temperature) (nats): (B, T, V) ->
    (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of log p(label token | everything before it) over the positions whose label is
    not -100, shape (B,) fp32, and how many such tokens, shape (B,) int64. log p(response | prompt) when the
    prompt is masked: the quantity DPO, ORPO and PPO are written in. Calls model(...), so DDP sees it."""
    targets = shift_labels(labels)
    logps = token_logprobs(_logits(model, input_ids, attention_mask, position_ids), targets)
    return logps.sum(1), (targets != IGNORE_INDEX).sum(1)


# --------------------------------------------------------------------------------------------------
# The losses as formulas on tensors (what the unit tests check against hand-computed values)
# --------------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_c - r_r) per pair: the negative log-likelihood of the human preference under the
    Bradley-Terry model P(c > r) = sigmoid(r_c - r_r). logsigmoid is stable for any margin."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) per pair, from sequence log-probabilities:
    -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]). Also returns the implicit rewards
    beta * (pi - ref) of chosen and rejected (detached: they are for logging)."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): near 0, 1 - exp(x) cancels
    catastrophically, so use log(-expm1(x)) there; far below, log1p(-exp(x))."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logp: torch.Tensor, max_logp: float = -1e-6) -> torch.Tensor:
    """log(p / (1 - p)) = log p - log(1 - p), from log p. ORPO's p is the length-normalised probability
    exp(mean token log-prob). log p is capped just below 0: at p = 1 the odds are infinite."""
    x = mean_logp.clamp(max=max_logp)
    return x - log1mexp(x)


def odds_ratio_loss(chosen_mean_logp: torch.Tensor,
                    rejected_mean_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's preference term (Hong et al. 2024, eq. 7) per pair: -log sigmoid(log odds(y_c) - log odds(y_r)),
    with odds from mean per-token log-probs. Returns the losses and the log odds ratios."""
    ratio = log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp)
    return -F.logsigmoid(ratio), ratio


# --------------------------------------------------------------------------------------------------
# The objectives
# --------------------------------------------------------------------------------------------------


class SFT:
    """Supervised fine-tuning: the mean cross-entropy over the label tokens of the batch (every response
    token of every example weighs the same; prompt and padding are not trained). Batches: `collate_sft`.
    metrics["tokens"] counts the trained tokens, so the loop's val loss is the exact per-token mean."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = _logits(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        targets = shift_labels(batch["labels"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, {"tokens": int((targets != IGNORE_INDEX).sum())}


def _pair_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _real_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


class RewardBT:
    """Reward model training with the Bradley-Terry loss -log sigmoid(r_c - r_r), averaged over pairs.
    The model is a `RewardModel` (rewards at each row's last real token). Batches: `collate_preference`.
    Metrics: accuracy (share of pairs with r_c > r_r), margin (mean r_c - r_r), tokens (real tokens)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        rewards = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        chosen, rejected = _pair_halves(rewards.float())
        margin = (chosen - rejected).detach()
        return bradley_terry_loss(chosen, rejected).mean(), {
            "accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
            "tokens": _real_tokens(batch)}


class DPO:
    """Direct Preference Optimisation with the sigmoid loss, averaged over pairs. Batches: `collate_preference`.

    The reference log-probabilities come from the batch (ref_chosen_logps / ref_rejected_logps, cached once
    per example by `precompute_reference_logprobs`: the reference is frozen, so computing them again every
    epoch would only repeat the same numbers, and the reference model need not stay in memory), or, when the
    batch has none, from `reference` (a frozen copy of the starting policy), run here without gradients.
    Metrics: rewards/chosen, rewards/rejected (mean implicit rewards beta * (pi - ref)), accuracy (share of
    pairs whose chosen reward is higher), margin (mean chosen - rejected reward), ranking_accuracy (share of
    pairs with pi(chosen) > pi(rejected): the reference-free ranking), tokens (real tokens)."""

    def __init__(self, beta: float = 0.1, reference: nn.Module | None = None) -> None:
        if beta <= 0:
            raise ConfigError(f"DPO beta must be positive, got {beta}")
        self.beta = beta
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)  # frozen: no dropout, no gradients, never in an optimizer

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        if self.reference is None:
            raise ConfigError("DPO needs reference log-probs: run precompute_reference_logprobs over the examples "
                              "or pass reference= (a frozen copy of the starting model)")
        with torch.no_grad():
            logps, _ = sequence_logprobs(self.reference, batch["input_ids"], batch["attention_mask"],
                                         batch["labels"], batch.get("position_ids"))
        return logps

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logps, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     batch.get("position_ids"))
        policy_chosen, policy_rejected = _pair_halves(logps)
        ref_chosen, ref_rejected = _pair_halves(self.reference_logprobs(batch).to(logps))
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                                            ref_rejected, self.beta)
        margin = chosen_rewards - rejected_rewards
        return losses.mean(), {
            "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
            "ranking_accuracy": (policy_chosen > policy_rejected).float().mean().item(), "tokens": _real_tokens(batch)}


class ORPO:
    """Odds Ratio Preference Optimisation (Hong et al. 2024): L = L_SFT(chosen) + lam * L_OR, no reference.

    L_SFT is the mean cross-entropy over the chosen responses' tokens (as in SFT); L_OR is the mean over pairs
    of -log sigmoid(log odds(y_c) - log odds(y_r)), where odds(y) = p / (1 - p) with p = exp(mean token log-prob
    of y). Batches: `collate_preference`. Metrics: nll (L_SFT), or_loss (L_OR), log_odds_ratio (mean),
    logps/chosen and logps/rejected (mean per-token log-probs), accuracy (share of pairs with the chosen
    response more probable per token), tokens (real tokens)."""

    def __init__(self, lam: float = 0.1) -> None:
        if lam < 0:
            raise ConfigError(f"ORPO lambda must be >= 0, got {lam}")
        self.lam = lam

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         batch.get("position_ids"))
        (sum_chosen, sum_rejected), (n_chosen, n_rejected) = _pair_halves(sums), _pair_halves(counts)
        nll = -sum_chosen.sum() / n_chosen.sum()  # per token over the batch, like SFT
        mean_chosen, mean_rejected = sum_chosen / n_chosen, sum_rejected / n_rejected
        or_losses, ratio = odds_ratio_loss(mean_chosen, mean_rejected)
        loss = nll + self.lam * or_losses.mean()
        return loss, {
            "nll": nll.item(), "or_loss": or_losses.mean().item(), "log_odds_ratio": ratio.mean().item(),
            "logps/chosen": mean_chosen.mean().item(), "logps/rejected": mean_rejected.mean().item(),
            "accuracy": (mean_chosen > mean_rejected).float().mean().item(), "tokens": _real_tokens(batch)}


# --------------------------------------------------------------------------------------------------
# Reference log-probs, once; exact held-out preference metrics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def precompute_reference_logprobs(reference: nn.Module, examples: Sequence[Example], *, batch_size: int = 8,
                                  pad_id: int = 0, max_length: int | None = None,
                                  device: torch.device | str | None = None,
                                  autocast_dtype: torch.dtype | None = None) -> list[Example]:
    """Copies of the preference examples with "ref_chosen_logp" and "ref_rejected_logp" (floats): the frozen
    reference's sequence log-probs, computed once in eval mode. Use the same autocast dtype as training, so
    that at the start (policy == reference) the log-ratios are zero and not rounding noise.
    A rank needs the values of every example its sampler may give it; a run that reads fewer examples than it
    holds passes only those (`byollm.train.align.drawn_indices`)."""
    device = torch.device(device) if device is not None else next(reference.parameters()).device
    was_training = reference.training
    reference.eval()
    out: list[Example] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = to_device(collate_preference(chunk, pad_id, max_length), device)
            with autocast_context(device, autocast_dtype):
                logps, _ = sequence_logprobs(reference, batch["input_ids"], batch["attention_mask"],
                                             batch["labels"], batch["position_ids"])
            chosen, rejected = _pair_halves(logps.double().cpu())
            out += [{**e, "ref_chosen_logp": c, "ref_rejected_logp": r}
                    for e, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True)]
    finally:
        reference.train(was_training)
    return out


@torch.no_grad()
def evaluate_pairs(model: nn.Module, objective: Any, batches: Iterator[Batch] | Sequence[Batch], *,
                   device: torch.device, autocast_dtype: torch.dtype | None = None,
                   dist: DistInfo | None = None) -> dict[str, float]:
    """The objective's loss and metrics on preference batches, each an exact mean over pairs (over all ranks):
    held-out pairwise accuracy for a reward model, implicit-reward accuracy for DPO. (The loop's `evaluate`
    weights batches by metrics["tokens"], which for pairs is a length-weighted mean.) Returns {"loss", ...,
    "pairs"}."""
    dist = dist or DistInfo(device=device)
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        for batch in batches:
            with autocast_context(device, autocast_dtype):
                loss, metrics = objective.loss(model, to_device(batch, device))
            pairs = batch["input_ids"].shape[0] // 2
            metrics.pop("tokens", None)
            for name, value in {"loss": loss.item(), **metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * pairs
            totals["pairs"] = totals.get("pairs", 0.0) + pairs
    finally:
        model.train(was_training)
    result: dict[str, float] = {}
    for rank_totals in gather_objects(totals, dist):  # a few floats per rank; a rank may have had no batch
        for name, value in rank_totals.items():
            result[name] = result.get(name, 0.0) + value
    pairs = result.pop("pairs", 0.0)
    if pairs == 0:
        raise DataError("evaluate_pairs got no batches; is the held-out set empty?")
    return {**{n: v / pairs for n, v in result.items()}, "pairs": pairs}


__all__ = ["DPO", "ORPO", "SFT", "RewardBT", "bradley_terry_loss", "dpo_loss", "evaluate_pairs", "log1mexp",
           "log_odds", "odds_ratio_loss", "precompute_reference_logprobs", "sequence_logprobs", "shift_labels",
           "token_entropy", "token_logprobs"]
