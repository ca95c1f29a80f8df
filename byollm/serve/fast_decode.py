"""A decode step written for decoding: one new token per row, fused weights, few small ops.

`GPT.forward` serves training, prefill and decode alike; a decode step (one token per sequence) pays for that
generality in small ops: on smollm2-135m about 60 per layer, each a few microseconds of PyTorch dispatch, next to
matrix products that are a read of the weights. `FastDecoder` computes the same function for T = 1 only:

- Q, K and V come from ONE product with a fused (C, (H + 2G) D) weight, and gate and up from one (C, 2I) weight:
  two products per layer instead of five, each a longer stream over memory.
- Every weight is stored transposed, (in, out) contiguous: the one-row product `x @ Wt` streams it at nearly
  the machine's read bandwidth, where nn.Linear's (out, in) layout was half as fast (`byollm.serve.layout`).
- The residual additions ride on the products (`torch.addmm(x, h, Wt)`: x + h Wt in one call); RMSNorm is
  `F.rms_norm`, one op; RoPE rotates Q and K together with cos and sin computed once per step (the sign of the
  rotation folded into sin); keys and values are written straight into the cache (`SlotKVCache.update`);
  attention multiplies each key/value head with its group of query heads directly (no repeated keys).

The products are the same sums as the model's in another order, so logits agree to float rounding and greedy
tokens agree with `byollm.generate.generate` (tests/test_fast_decode.py). The model's own linear layers are
re-pointed at views of the fused weights, so prefill (which still runs `GPT.forward`) shares their memory; the
transposed LM head of a tied embedding is the one extra copy. Rows are independent, so a request gives the same
tokens alone or in a batch as far as the matrix kernels keep rows apart (tested on the real model).

Llama-style fp32 models only (RoPE, RMSNorm, SwiGLU; biases allowed): `fast_decoder` raises for others.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ByollmError
from byollm.model import GPT
from byollm.serve.slot_cache import SlotKVCache


class FastDecodeError(ByollmError):
    """The model cannot take the fast decode path."""


def _weight_t(linear: nn.Module) -> torch.Tensor:
    """W^T (in, out) of an nn.Linear or a TransposedLinear (byollm.serve.layout)."""
    if isinstance(linear, nn.Linear):
        return linear.weight.detach().t()
    if hasattr(linear, "weight_t"):
        return linear.weight_t.detach()
    raise FastDecodeError(f"fast decode needs float linear layers, got {type(linear).__name__} "
                          "(int8 weights are another path: use int8 or fast_decode, not both)")


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _fused(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (in, sum of outs) contiguous weight for several products of the same input, and the joined biases."""
    weight_t = torch.cat([_weight_t(m) for m in linears], dim=1).contiguous()
    biases = [_bias(m) for m in linears]
    if all(b is None for b in biases):
        return weight_t, None
    return weight_t, torch.cat([b if b is not None else weight_t.new_zeros(m.out_features)
                                for b, m in zip(biases, linears, strict=True)])


def _repoint(linears: list[nn.Module], weight_t: torch.Tensor) -> None:
    """Make each layer's weight a view of its columns of the fused weight: prefill then reads the same memory."""
    start = 0
    for m in linears:
        cols = weight_t[:, start:start + m.out_features]
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(cols.t(), requires_grad=False)  # (out, in) view; F.linear takes it as it is
        else:
            m.weight_t = nn.Parameter(cols, requires_grad=False)
        start += m.out_features


class FastLayer(nn.Module):
    """One block's weights in decode layout."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.norm_1, self.norm_2 = block.norm_1.weight.detach(), block.norm_2.weight.detach()
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv_t, self.qkv_bias = _fused(qkv)
        _repoint(qkv, self.qkv_t)
        self.o_t, self.o_bias = _weight_t(attn.o_proj).contiguous(), _bias(attn.o_proj)
        _repoint([attn.o_proj], self.o_t)
        gate_up = [mlp.gate_proj, mlp.up_proj]
        self.gate_up_t, self.gate_up_bias = _fused(gate_up)
        _repoint(gate_up, self.gate_up_t)
        self.down_t, self.down_bias = _weight_t(mlp.down_proj).contiguous(), _bias(mlp.down_proj)
        _repoint([mlp.down_proj], self.down_t)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight_t (+ bias) (+ residual), with the residual folded into the product when there is no bias."""
    if residual is not None and bias is None:
        return torch.addmm(residual, x, weight_t)
    y = x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)
    return y if residual is None else residual + y


def supports_fast_decode(model: nn.Module) -> bool:
    """Whether `fast_decoder(model)` applies: a Llama-style GPT with floating-point linear layers."""
    c = getattr(model, "config", None)
    llama = c is not None and (c.pos_embedding, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu")
    fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    return llama and fp32 and all(isinstance(m, nn.Linear) or hasattr(m, "weight_t") for m in model.modules()
                                  if hasattr(m, "out_features"))


class FastDecoder(nn.Module):
    """The decode step of a Llama-style GPT: `forward(ids, position_ids, cache, mask)` -> (B, V) logits for one
    new token per row. Build it with `fast_decoder(model)`; the model keeps working (prefill) on shared weights."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        c = model.config
        if c.pos_embedding != "rope" or c.norm != "rmsnorm" or c.mlp != "swiglu":
            raise FastDecodeError("fast decode supports Llama-style models (RoPE, RMSNorm, SwiGLU); this one has "
                                  f"{c.pos_embedding} positions, {c.norm}, {c.mlp}: use the default decode path")
        if model.tok_emb.weight.dtype != torch.float32:
            raise FastDecodeError(f"fast decode is written and tested for fp32 weights, got "
                                  f"{model.tok_emb.weight.dtype}: use the default decode path for other precisions")
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.eps = c.norm_eps
        self.tok_emb = model.tok_emb.weight.detach()
        self.inv_freq = model.rope_inv_freq
        self.layers = [FastLayer(block) for block in model.blocks]
        self.norm_f = model.norm_f.weight.detach()
        self.head_t = _weight_t(model.lm_head).contiguous()  # tied: a transposed copy of the embedding table

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every layer's products and norms, the LM head, one table row."""
        tensors = [self.norm_f, self.head_t]
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        row = self.tok_emb[0].numel() * self.tok_emb.element_size()
        return sum(t.numel() * t.element_size() for t in tensors) + row

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, D) for each row's position; sin carries the rotation's sign: (-sin, +sin) halves."""
        angles = position_ids.float()[:, None] * self.inv_freq[None, :]  # (B, D/2)
        sin = angles.sin()
        return torch.cat([angles, angles], -1).cos()[:, None], torch.cat([-sin, sin], -1)[:, None]

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, cache: SlotKVCache,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, position_ids: (B,); cache bound to the B rows (`cache.bind(0, B, 1)`); mask (B, 1, 1, S) bool
        (True = may attend) when rows have different lengths. Advances the cache by one position."""
        b = ids.size(0)
        h, g, d = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = self.rope(position_ids)
        scale = d ** -0.5
        bias = None  # the mask as 0 / -inf, added to the scores
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=cos.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        x = F.embedding(ids, self.tok_emb)  # (B, C)
        for i, layer in enumerate(self.layers):
            qkv = _linear(F.rms_norm(x, x.shape[-1:], layer.norm_1, self.eps), layer.qkv_t, layer.qkv_bias)
            qk = qkv[:, :(h + g) * d].view(b, h + g, d)  # Q and K heads side by side: one rotation for both
            qk = torch.addcmul(qk * cos, torch.cat([qk[..., d // 2:], qk[..., :d // 2]], -1), sin)
            k = qk[:, h:].view(b, g, 1, d)
            v = qkv[:, (h + g) * d:].view(b, g, 1, d)
            keys, values = cache.update(i, k, v)  # (B, G, S, D), this token's key and value written in place
            q = qk[:, :h].view(b, g, h // g, d)  # each key/value head's group of query heads
            scores = q @ keys.transpose(-1, -2) * scale  # (B, G, H/G, S)
            if bias is not None:
                scores = scores + bias
            y = (torch.softmax(scores, dim=-1) @ values).view(b, h * d)
            x = _linear(y, layer.o_t, layer.o_bias, residual=x)
            gate_up = _linear(F.rms_norm(x, x.shape[-1:], layer.norm_2, self.eps), layer.gate_up_t,
                              layer.gate_up_bias)
            gate, up = gate_up.chunk(2, dim=-1)
            x = _linear(F.silu(gate) * up, layer.down_t, layer.down_bias, residual=x)
        cache.advance(1)
        return F.rms_norm(x, x.shape[-1:], self.norm_f, self.eps) @ self.head_t


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step of `model` reads: every parameter (and a submodule's buffers: int8 codes and
    scales) once, a tied table once, but of an embedding table only the one row it looks up (unless the LM head
    reads the whole of it). The model's own buffers (RoPE frequencies) are not weights."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        buffers = [] if module is model else list(module.buffers(recurse=False))
        for t in [*module.parameters(recurse=False), *buffers]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            rows = t[:1] if isinstance(module, nn.Embedding) else t
            total += rows.numel() * t.element_size()
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and isinstance(getattr(model, "tok_emb", None), nn.Embedding) \
            and head.weight is model.tok_emb.weight:  # tied: the head reads all of the table the lookup saw a row of
        total += head.weight[1:].numel() * head.weight.element_size()
    return total


@torch.no_grad()
def fast_decoder(model: GPT) -> FastDecoder:
    """The decode-optimised equivalent of `model` (same logits to float rounding). Re-points the model's linear
    layers at the fused weights (inference only from now on)."""
    return FastDecoder(model)


__all__ = ["FastDecodeError", "FastDecoder", "decode_weight_bytes", "fast_decoder", "supports_fast_decode"]
