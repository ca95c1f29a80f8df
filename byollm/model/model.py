"""The Transformer, in one file.

A decoder-only language model: token embeddings -> N x (norm, attention, residual; norm, MLP, residual)
-> final norm -> logits. Every architectural choice (positions, norm, MLP, number of key/value heads,
biases, tying) is read from `ModelConfig`, so GPT-2, Llama, SmolLM2 and Qwen2-style models are the
same class. Parameter names are ours; `byollm.interop` maps them to and from Hugging Face's.

Shapes: B batch, T new tokens, S keys (cached + new), C width, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.model.config import ModelConfig

# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without re-centring or bias (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean of squares in fp32: bf16 would lose small activations
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# --------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# --------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """theta_i = base^(-2i/D) for i < D/2: each pair of channels rotates at its own speed."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":  # positions squeezed by `factor` (Code Llama style)
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1+: slow (long-wavelength) channels are stretched by `factor`, fast ones are kept,
        # and the band between is interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle = position * theta_i, shape (B, 1, T, D), the two halves repeated."""
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): channel i and i + D/2 form a rotating pair
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x_i, x_{i+D/2}) by its angle: the 'rotate half' layout Hugging Face uses."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded (B, S) mask (1 real, 0 pad): each row counts its real tokens from 0, as
    Hugging Face does (cumsum - 1), so a left- or right-padded sequence gets the numbers it would get alone.
    Padding positions get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class KVCache:
    """Keys and values of every layer, pre-allocated as (B, G, max_len, D), filled left to right.

    Prefill writes T positions at once; each decode step writes one. Layers write at `length` and the
    model advances `length` once after the last layer, so all layers agree on where the next token goes.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch_size, max_len or c.block_size, c.n_kv_head, c.head_dim,
                   device=p.device, dtype=dtype or p.dtype)

    @property
    def nbytes(self) -> int:
        """Memory held: 2 (k and v) x layers x B x G x max_len x D x bytes per element."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {k.size(2)} at {self.length}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Forget everything after `length` (for example to re-generate from an earlier point)."""
        self.length = min(self.length, length)

    def reset(self) -> None:
        self.length = 0


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, S, D) -> (B, G * n_rep, S, D): each key/value head serves n_rep query heads (GQA/MQA)."""
    if n_rep == 1:
        return x
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, n_rep, s, d).reshape(b, g * n_rep, s, d)


# `enable_gqa` arrived in torch 2.5; older versions take the repeat_kv path.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def causal_mask(t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) bool, True where query i (at absolute position S - T + i) may look at key j: j <= S - T + i."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D) + mask) v, written out. Returns the output and the attention weights."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S): how well each query matches each key
    if is_causal:
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # the future (and padding) gets zero weight
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)  # each row sums to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (B, H, T, D): a weighted average of the values


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.use_rope = config.pos_embedding == "rope"
        self.naive = config.attention == "naive"
        self.dropout = config.dropout
        self.last_weights: torch.Tensor | None = None  # set by the naive path when `record_weights` is on
        self.record_weights = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # now (B, G, S, D): the past plus these T positions
        n_rep = self.n_head // self.n_kv_head
        dropout_p = self.dropout if self.training else 0.0
        naive = self.naive or self.record_weights
        # SDPA can share each key/value head among its n_rep query heads itself (`enable_gqa`: no copies, ~4%
        # faster training on CPU). The naive path, and SDPA with a mask (some GPU kernels lack GQA then),
        # repeat the heads explicitly.
        sdpa_gqa = n_rep > 1 and mask is None and not naive and _SDPA_HAS_GQA
        if not sdpa_gqa:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if naive:
            y, weights = naive_attention(q, k, v, mask, is_causal, dropout_p)
            if self.record_weights:
                self.last_weights = weights.detach()
        elif sdpa_gqa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # heads side by side again
        return self.o_proj(y)


# --------------------------------------------------------------------------------------------------
# MLP and block
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """GELU: down(gelu(up(x))) as in GPT-2. SwiGLU: down(silu(gate(x)) * up(x)) as in Llama."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # GPT-2 used the tanh approximation


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = Attention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_1(x), rope, mask, is_causal, cache, layer))
        return x + self.drop(self.mlp(self.norm_2(x)))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix reads tokens in and scores them out
        if config.pos_embedding == "rope":
            self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.reset_parameters()

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms, and the two projections
        that write into the residual stream scaled by 1/sqrt(2 * n_layer) so its variance stays ~constant
        with depth (each layer adds two terms)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        self.init_buffers()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # .to(bf16) / .half() would round the RoPE frequencies and skew angles at long positions
        # (~0.6 rad by position 1000); keep them fp32 on whatever device the model moved to.
        super()._apply(fn, recurse)
        if self.config.pos_embedding == "rope" and self.rope_inv_freq.dtype != torch.float32:
            self.rope_inv_freq = rope_inverse_frequencies(self.config).to(self.rope_inv_freq.device)
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute non-learned buffers (needed after building on the meta device and `to_empty`)."""
        if self.config.pos_embedding == "rope":
            self.rope_inv_freq.copy_(rope_inverse_frequencies(self.config))

    # ---- forward -------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C): what the LM head, a reward head or a value head reads.

        attention_mask: (B, S) with 1 for real tokens and 0 for padding (S = cached + new positions), or a
            ready (B, 1, T, S) boolean mask (True = may attend), e.g. block-diagonal for packed sequences.
        position_ids: (B, T) absolute positions; default: continue from the cache (0, 1, ... without one).
        kv_cache: keys/values of earlier positions; this call appends T positions to it.
        """
        b, t = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if self.pos_emb is not None and past + t > self.config.block_size:
                raise ValueError(f"sequence of {past + t} tokens exceeds block_size={self.config.block_size}")
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, t)
        mask = self._attention_mask(t, past, attention_mask, input_ids.device)
        is_causal = mask is None and t > 1  # without a cache or padding, SDPA builds the causal mask itself

        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        rope = rope_cos_sin(position_ids, self.rope_inv_freq) if self.pos_emb is None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, logits_to_keep: int = 0, ignore_index: int = -100) -> ModelOutput:
        """Logits (B, T, V) and, given `targets` (B, T) (the next token at each position, `ignore_index` where
        no loss is wanted, e.g. prompt or padding), the mean cross-entropy over the other positions.
        `logits_to_keep=k` computes logits for the last k positions only (generation needs just one)."""
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               kv_cache=kv_cache)
        if targets is None and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
        return ModelOutput(logits, loss)

    @staticmethod
    def _attention_mask(t: int, past: int, attention_mask: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
        """Combine causality and padding into one (B|1, 1, T, S) boolean mask, or None when causality alone
        (handled by `is_causal`) or nothing (one new token sees every cached one) is needed."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool()
        if attention_mask is None and (past == 0 or t == 1):
            return None
        s = past + t
        allowed = causal_mask(t, s, device)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            if attention_mask.shape[-1] != s:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {s} "
                                 f"({past} cached + {t} new)")
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            # A padding position may see itself, so no softmax row is all -inf (its output is never used).
            itself = torch.arange(s, device=device)[None, :] == torch.arange(s - t, s, device=device)[:, None]
            allowed = allowed | itself[None, None]
        return allowed

    # ---- accounting ----------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied matrix once; `non_embedding` leaves out the token and position tables
        (the convention of the scaling-law papers; a tied LM head is then left out too)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6 per weight a token multiplies through (each
        multiply-add is 2 FLOPs forward and 4 backward), plus the attention scores and weighted sum,
        12 * L * H * D * T (the estimate of the PaLM paper, appendix B; used by nanoGPT for MFU)."""
        c = self.config
        t = seq_len or c.block_size
        matmul_params = self.num_params(non_embedding=True)  # an untied LM head is already in here
        if c.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()  # tied: the table is used as a matmul once per token
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * t



@torch.no_grad()
def resize_token_embeddings(model: GPT, vocab_size: int) -> GPT:
    """Give `model` a vocabulary of `vocab_size` ids, in place (and return it): what adding tokens to its
    tokenizer (the chat control tokens) needs. Existing rows are kept; new rows of the embedding (and of an
    untied LM head) start at the mean of the existing rows, so a new token starts as an "average" token
    (a random row would put arbitrary logits on the new ids); removing rows cuts the table. A tied LM head
    stays tied to the embedding; config.vocab_size follows."""
    old = model.config.vocab_size
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    if vocab_size == old:
        return model

    def resized(weight: torch.Tensor) -> torch.Tensor:
        out = weight.new_empty(vocab_size, weight.shape[1])
        keep = min(old, vocab_size)
        out[:keep] = weight[:keep]
        if vocab_size > old:
            out[old:] = weight.float().mean(dim=0).to(weight.dtype)
        return out

    emb = model.tok_emb.weight
    model.tok_emb = nn.Embedding(vocab_size, emb.shape[1], device=emb.device, dtype=emb.dtype)
    model.tok_emb.weight.copy_(resized(emb))
    head = model.lm_head.weight
    model.lm_head = nn.Linear(head.shape[1], vocab_size, bias=False, device=head.device, dtype=head.dtype)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    else:
        model.lm_head.weight.copy_(resized(head))
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return model
