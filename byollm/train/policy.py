"""The policy that PPO trains, and its forward pass over (prompt, response) batches.

`PolicyWithValue` is a GPT (`policy`) plus a value head, one linear layer on its final hidden states: one
network in memory and one forward pass per minibatch (what TRL's classic PPOTrainer and the InstructGPT-era
recipes of small models did); the cost is that value gradients also move the shared trunk.

`pack_sequences` lays a batch out as [left-padded prompt | right-padded response], so every answer starts at
column P, and `response_forward` reads the response tokens' log-probs, entropies and (with a value head)
values from one forward pass. Shapes: B sequences, P prompt width, R response width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from byollm.model import GPT, position_ids_from_mask
from byollm.model.config import ModelConfig
from byollm.model.model import Attention
from byollm.tokenizer import Tokenizer
from byollm.train.objectives import token_entropy, token_logprobs


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
    def config(self) -> ModelConfig:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# --------------------------------------------------------------------------------------------------
# Packed (prompt, response) batches and the forward pass over their response tokens
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
    positions = position_ids_from_mask(mask)
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
    if isinstance(unwrap(model), PolicyWithValue):
        logits, values = model(ids, attention_mask=mask, position_ids=pos, start=p - 1)
    else:
        logits, values = model(ids, attention_mask=mask, position_ids=pos).logits[:, p - 1:], None
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    return token_logprobs(logits, targets, temperature), token_entropy(logits, temperature), values


def vocab_limit_of(config: ModelConfig, tokenizer: Tokenizer | None) -> int | None:
    """The tokenizer's vocab_size when the model's table is padded past it (50257 of 50304), else None."""
    n = getattr(tokenizer, "vocab_size", None)
    return n if n is not None and n < config.vocab_size else None


__all__ = ["PolicyOutput", "PolicyWithValue", "disable_dropout", "pack_sequences", "response_forward", "unwrap",
           "vocab_limit_of"]
