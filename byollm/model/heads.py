"""Scalar heads on the Transformer: a reward model reads one number per sequence from its hidden states.

A reward model is the language model's body with the vocabulary projection replaced by a single linear
unit: it maps the final hidden state of a sequence to a score r(x, y). It is trained on pairs (chosen,
rejected) so that r(chosen) > r(rejected) (Bradley-Terry; see `byollm.train.objectives`).

Which hidden state? In a causal model only the LAST token has seen the whole sequence, so its state is the
summary the head reads (as in Ouyang et al. 2022 and Hugging Face's `*ForSequenceClassification`). In a
padded batch that is the last position whose attention_mask is 1, not the last column.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from byollm.model.config import ModelConfig
from byollm.model.model import GPT


class RewardModel(nn.Module):
    """A GPT backbone plus `score`, a bias-free Linear(n_embd, 1) (Hugging Face's name and shape, so the
    head maps onto `*ForSequenceClassification` with num_labels=1). The backbone's LM head is not used.

    forward(input_ids, attention_mask=None, position_ids=None) -> rewards (B,) at each row's last real token.
    token_scores(...) -> (B, T): the head applied at every position (what a PPO value head needs).
    """

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.n_embd, 1, bias=False)  # a bias cancels in r_c - r_r
        self.reset_head()
        if not backbone.config.tie_embeddings:
            # An untied LM head gets no gradient here; frozen, DDP does not wait for it and AdamW skips it.
            # (A tied one is the token embedding, which is used, so it stays trainable.)
            backbone.lm_head.weight.requires_grad_(False)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config  # what checkpoint.save_checkpoint writes as config.json

    @torch.no_grad()
    def reset_head(self) -> None:
        # N(0, 1/(d_model + 1)) as in Stiennon et al. 2020: rewards start at O(1) scale, not ~0 as with the
        # LM's 0.02, so the backbone gets a useful gradient from the first step.
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(self.backbone.config.n_embd + 1))

    def token_scores(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.score(h).squeeze(-1)  # (B, T)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("RewardModel needs a (B, T) padding mask: packed rows hold several sequences, "
                             "and each needs its own score")
        scores = self.token_scores(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return scores.gather(1, last_token_index(input_ids, attention_mask)[:, None]).squeeze(1)

    def num_params(self, non_embedding: bool = False) -> int:
        """The backbone's count (its unused LM head included when untied) plus the head's n_embd weights."""
        return self.backbone.num_params(non_embedding) + self.score.weight.numel()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.backbone.flops_per_token(seq_len)  # (an overestimate by the unused LM head's matmul)


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) index of each row's last real token: the highest position with mask 1 (right or left padding)."""
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.full((b,), t - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(t, device=input_ids.device)[None, :]
    return (attention_mask.long() * positions).amax(dim=1)


__all__ = ["RewardModel", "last_token_index"]
