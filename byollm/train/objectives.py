"""Instruction tuning and preference learning: objectives that plug into the one `Trainer`.

Each is an `Objective` (loss(model, batch) -> (loss, metrics)) over batches that the collators here build
from lists of examples, served by `ExampleSource` (a `BatchSource`). Nothing else about the loop changes.

    SFT            mean cross-entropy over the response tokens only (labels -100 elsewhere)
    RewardBT       reward model, Bradley-Terry: -log sigmoid(r(chosen) - r(rejected))
    DPO            -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))])
    ORPO           SFT loss on chosen + lambda * -log sigmoid(log odds(y_c) - log odds(y_r)), no reference

Examples (what the data converters produce; lists of token ids):

    SFT          {"input_ids": [...], "labels": [...]}   labels[i] = input_ids[i] where trained, -100 elsewhere;
                                                          same length, NOT shifted (Hugging Face's convention)
    preference   {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}   responses end with their
                                                          end token, so the model also learns where to stop

Batches are right-padded:

    input_ids       [ A  B  C  D  pad pad ]   labels    [-100 -100  C  D -100 -100]   (the prompt A B masked)
    attention_mask  [ 1  1  1  1   0   0  ]   positions [ 0  1  2  3  4  5 ]

Logits at position i predict token i + 1, so the loss pairs logits[:, i] with labels[:, i + 1] (`shift_labels`).
With right padding every real token comes before every pad, so causal attention alone already keeps real
tokens from seeing padding, and positions 0, 1, 2, ... are right for every row: padding cannot change a loss.

Packed SFT (`pack_sft_examples`): several examples share one row; position ids restart at each example and
a block-diagonal (B, 1, T, T) mask keeps attention inside each example, so a packed row computes exactly
what the examples would alone, with no compute wasted on padding.

A preference batch puts the B chosen sequences (prompt + chosen) in rows 0..B-1 and the B rejected ones in
rows B..2B-1, so one forward pass scores both (as TRL's "concatenated forward" does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ConfigError, DataError
from byollm.train.distributed import DistInfo, gather_objects
from byollm.train.loop import autocast_context, to_device

logger = logging.getLogger("byollm.train")

IGNORE_INDEX = -100  # the label of a position that is not trained (PyTorch's and Hugging Face's default)

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Checking examples: bad data is an error that names the example, never a silent drop
# --------------------------------------------------------------------------------------------------


def _ids(example: Example, key: str, what: str) -> list[int]:
    if not isinstance(example, dict) or key not in example:
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise DataError(f"{what} example has no '{key}' (it has {keys}); convert the data with byollm.data first")
    ids = example[key]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
        raise DataError(f"{what} example's '{key}' must be a list of token ids (ints)")
    return list(ids)


def check_sft_example(example: Example, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of an SFT example, or a DataError saying what is wrong with it."""
    ids, labels = _ids(example, "input_ids", "SFT"), _ids(example, "labels", "SFT")
    if len(ids) != len(labels):
        raise DataError(f"SFT example has {len(ids)} input_ids but {len(labels)} labels; they must align")
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"SFT example has {len(ids)} tokens, more than max_length={max_length}; drop or "
                        "truncate such examples when preparing the data")
    if all(label == IGNORE_INDEX for label in labels[1:]):  # (labels[0] is never predicted: nothing comes before)
        raise DataError(f"SFT example of {len(ids)} tokens has no trained token (every label after the first is "
                        f"{IGNORE_INDEX}); an empty response? drop it when preparing the data")
    return ids, labels


def check_preference_example(example: Example, max_length: int | None = None) -> tuple[list[int], ...]:
    """(prompt_ids, chosen_ids, rejected_ids), or a DataError saying what is wrong with the example."""
    prompt = _ids(example, "prompt_ids", "preference")
    chosen, rejected = _ids(example, "chosen_ids", "preference"), _ids(example, "rejected_ids", "preference")
    if not prompt:
        raise DataError("preference example has an empty prompt: the first response token needs a token before it")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise DataError(f"preference example has an empty {name} response; drop it when preparing the data")
        if max_length is not None and len(prompt) + len(response) > max_length:
            raise DataError(f"preference example's prompt + {name} is {len(prompt) + len(response)} tokens, more "
                            f"than max_length={max_length}; drop or truncate such pairs when preparing the data")
    return prompt, chosen, rejected


# --------------------------------------------------------------------------------------------------
# Collators: examples -> one padded batch
# --------------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], fill: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _padded_batch(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> Batch:
    t = max(len(r) for r in ids)
    lengths = torch.tensor([len(r) for r in ids])
    return {
        "input_ids": _pad(ids, pad_id, t),
        "labels": _pad(labels, IGNORE_INDEX, t),  # padding is never trained
        "attention_mask": (torch.arange(t)[None, :] < lengths[:, None]).long(),
        "position_ids": torch.arange(t)[None, :].expand(len(ids), t).contiguous(),  # right padding: 0, 1, 2, ...
    }


def collate_sft(examples: Sequence[Example], pad_id: int = 0, max_length: int | None = None) -> Batch:
    """SFT examples (or packed rows from `pack_sft_examples`) -> {input_ids, labels, attention_mask,
    position_ids}, right-padded to the longest. Packed rows get a (B, 1, T, T) block-diagonal mask."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    if "segment_ids" in examples[0]:
        return _collate_packed(examples, pad_id, max_length)
    pairs = [check_sft_example(e, max_length) for e in examples]
    return _padded_batch([p[0] for p in pairs], [p[1] for p in pairs], pad_id)


def pack_sft_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedily pack consecutive SFT examples into rows of at most max_length tokens.

    Each row holds input_ids, labels, position_ids (restarting at 0 for each example) and segment_ids (which
    example a token belongs to, 0, 1, ...). The first token of each example gets label -100: in a packed row
    it would be predicted from the end of the previous example, which it has nothing to do with (alone, it
    is never predicted either). Greedy in order keeps it simple and deterministic; rows are shuffled later."""
    rows: list[Example] = []
    row: Example | None = None
    for example in examples:
        ids, labels = check_sft_example(example, max_length)
        if row is None or len(row["input_ids"]) + len(ids) > max_length:
            row = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
            rows.append(row)
        segment = row["segment_ids"][-1] + 1 if row["segment_ids"] else 0
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + labels[1:]
        row["position_ids"] += list(range(len(ids)))
        row["segment_ids"] += [segment] * len(ids)
    return rows


def _collate_packed(rows: Sequence[Example], pad_id: int, max_length: int | None) -> Batch:
    for row in rows:
        if "segment_ids" not in row or "position_ids" not in row:
            raise DataError("a batch mixes packed rows and plain SFT examples; pack all of them or none")
        if max_length is not None and len(row["input_ids"]) > max_length:
            raise DataError(f"packed row has {len(row['input_ids'])} tokens, more than max_length={max_length}")
    t = max(len(r["input_ids"]) for r in rows)
    segments = _pad([r["segment_ids"] for r in rows], -1, t)  # padding is segment -1
    # Query i may see key j when both are in the same example and j <= i. Padding positions only see
    # padding (themselves included, so no softmax row is empty); real tokens never see padding.
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return {
        "input_ids": _pad([r["input_ids"] for r in rows], pad_id, t),
        "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, t),
        "attention_mask": (same & causal)[:, None],  # (B, 1, T, T)
        "position_ids": _pad([r["position_ids"] for r in rows], 0, t),
    }


def collate_preference(examples: Sequence[Example], pad_id: int = 0, max_length: int | None = None) -> Batch:
    """Preference examples -> one batch of 2B rows: prompt + chosen in rows 0..B-1, prompt + rejected in rows
    B..2B-1, with the prompt's labels -100. When the examples carry cached reference log-probabilities
    (`precompute_reference_logprobs`), the batch has them as ref_chosen_logps / ref_rejected_logps (B,)."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    checked = [check_preference_example(e, max_length) for e in examples]
    ids = [p + c for p, c, _ in checked] + [p + r for p, _, r in checked]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c, _ in checked] + [[IGNORE_INDEX] * len(p) + r for p, _, r in checked]
    batch = _padded_batch(ids, labels, pad_id)
    cached = ["ref_chosen_logp" in e for e in examples]
    if all(cached):
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logp"] for e in examples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logp"] for e in examples], dtype=torch.float32)
    elif any(cached):
        raise DataError("some preference examples have cached reference log-probs and some do not; "
                        "run precompute_reference_logprobs over all of them")
    return batch


# --------------------------------------------------------------------------------------------------
# Serving batches: shuffled epochs, exact resume, sharded over ranks
# --------------------------------------------------------------------------------------------------


class ExampleSource:
    """A `BatchSource` over a list of examples (or packed rows): shuffled epochs, resumable, sharded.

    Like `RandomWindowSampler`, the GLOBAL batch of step s is a pure function of (seed, s, global batch):
    epoch e is the permutation numpy.random.default_rng([seed, e]) draws, cut into global batches of
    batch_size * world_size examples (the last len % global of each epoch are left out of that epoch; another
    permutation leaves out others), and rank r takes its slice [r * batch_size, (r + 1) * batch_size). So a
    resumed run sees exactly the batches it would have, and 2 ranks x 4 see what 1 rank x 8 sees.
    `collate` turns a list of examples into a batch (e.g. functools.partial(collate_sft, pad_id=...))."""

    def __init__(self, examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], *,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
        if len(examples) < batch_size * world_size:
            raise DataError(f"{len(examples)} examples are fewer than one global batch ({batch_size} x "
                            f"{world_size} ranks); use a smaller batch_size or more data")
        self.examples, self.collate = examples, collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self.step = 0  # batches drawn so far

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch_size

    @property
    def epoch(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.step / self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """This rank's example indices at `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        start = i * self.global_batch_size + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def next_batch(self) -> Any:
        batch = self.collate([self.examples[int(j)] for j in self.indices(self.step)])
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. Another seed, global batch or data size still loads (you may change
        them on purpose), but the batches then differ from an uninterrupted run, which is logged."""
        now = {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_examples": len(self.examples)}
        for key, value in now.items():
            if key in state and state[key] != value:
                logger.warning("resuming the example source with %s=%s (saved: %s): batches differ from an "
                               "uninterrupted run", key, value, state[key])
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"example source state has no valid 'step' (got {step!r}); is it from another source?")
        self.step = step


def example_batches(examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], *,
                    rank: int = 0, world_size: int = 1) -> Iterator[Any]:
    """Every example once, in order, for evaluation: batch k is examples[k*B : (k+1)*B] (the last may be
    smaller); rank r takes batches r, r + world_size, ... Call again for a fresh pass."""
    starts = range(0, len(examples), batch_size)
    for k, start in enumerate(starts):
        if k % world_size == rank:
            yield collate(list(examples[start : start + batch_size]))


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
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):  # right-padded
            attention_mask = None
    return {"attention_mask": attention_mask, "position_ids": position_ids}


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None) -> torch.Tensor:
    out = model(input_ids, **_model_inputs(attention_mask, position_ids))
    return out.logits if hasattr(out, "logits") else out


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log p(label token) at each position that has one (0 elsewhere), and the (B, T) bool mask of
    those positions. `labels` are unshifted (aligned with the inputs); logits[:, i] scores labels[:, i + 1]."""
    targets = shift_labels(labels)
    # cross_entropy is -log_softmax(logits)[target] without materialising a second (B, T, V) tensor, and 0 where
    # the target is ignore_index. In fp32: a bf16 log-softmax would round log-probs to ~2 significant digits.
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view_as(targets), targets != IGNORE_INDEX


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of log p(label token | everything before it) over the positions whose label is
    not -100, shape (B,) fp32, and how many such tokens, shape (B,) int64. log p(response | prompt) when the
    prompt is masked: the quantity DPO, ORPO and PPO are written in. Calls model(...), so DDP sees it."""
    logps, mask = token_logprobs(_logits(model, input_ids, attention_mask, position_ids), labels)
    return logps.sum(1), mask.sum(1)


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
    pairs whose chosen reward is higher), margin (mean chosen - rejected reward), tokens (real tokens)."""

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
            "tokens": _real_tokens(batch)}


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
    Every rank needs all examples' values (the sampler may give it any of them)."""
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


__all__ = ["DPO", "IGNORE_INDEX", "ORPO", "SFT", "ExampleSource", "RewardBT", "bradley_terry_loss",
           "check_preference_example", "check_sft_example", "collate_preference", "collate_sft", "dpo_loss",
           "evaluate_pairs", "example_batches", "log1mexp", "log_odds", "odds_ratio_loss", "pack_sft_examples",
           "precompute_reference_logprobs", "sequence_logprobs", "shift_labels", "token_logprobs"]
