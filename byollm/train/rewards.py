"""Rewards for PPO: a trained reward model or any function, and the held-out evaluation of a policy.

A reward function is `reward_fn(prompt_ids, response_ids) -> (B,)` scores: `RewardModelScorer` wraps a
`RewardModel` (written by `byollm reward`, loaded by `load_reward_model`), `token_fraction_reward` is a
programmatic one for demonstrations and tests. `evaluate_policy` samples answers to held-out prompts and
reports their mean score and KL to the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from byollm.checkpoint import load_checkpoint
from byollm.errors import CheckpointError
from byollm.generate import generate
from byollm.model import GPT, position_ids_from_mask
from byollm.sampling import SamplingParams
from byollm.tokenizer import Tokenizer
from byollm.train.loop import autocast_context
from byollm.train.policy import pack_sequences, response_forward, vocab_limit_of
from byollm.train.rl_objectives import response_mask

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
"""reward_fn(prompt_ids, response_ids) -> (B,) float scores. response_ids are the generated tokens, a final
stop token included when the answer stopped; a reward model scores prompt + response."""


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
                positions = position_ids_from_mask(mask)
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


def load_reward_model(path: str | Path, device: torch.device | str = "cpu",
                      tokenizer: Tokenizer | None = None) -> nn.Module:
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


# --------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_policy(policy: GPT, reference: GPT, reward_fn: RewardFn, prompts: list[list[int]], *,
                    max_new_tokens: int = 32, temperature: float = 1.0, stop_token_ids: Sequence[int] = (),
                    seed: int = 0, batch_size: int = 32, pad_id: int = 0,
                    tokenizer: Tokenizer | None = None) -> dict[str, float]:
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


__all__ = ["RewardFn", "RewardModelScorer", "evaluate_policy", "load_reward_model", "token_fraction_reward"]
