"""Q4_1, llama.cpp's 4-bit block format, as a frozen layer: QLoRA on the very weights of a Q4_1 GGUF file.

A model imported from a quantised GGUF file (`byollm convert from-gguf`) is dequantised to fp32. QLoRA's NF4
(`nf4.py`) would then quantise those values a second time, on a different grid, and the two rounding errors add
up: measured on SmolLM2-135M-Instruct, NF4 of the dequantised Q4_1 weights raises the loss of a short chat from
3.28 to 4.05 nats. Storing the weights in Q4_1 itself loses nothing: the fp32 values *are* Q4_1 values, and
quantising them again gives back the file's bytes (the tests check this against the file).

A Q4_1 block holds 32 consecutive weights of a row as

    d  (fp16)  the step:    (max - min) / 15
    m  (fp16)  the minimum
    qs (16 bytes) 32 codes q in 0..15: byte j holds q[j] in its low nibble and q[j + 16] in its high nibble

and a weight is w = d * q + m: 20 bytes per 32 weights, 5 bits per weight (NF4 with double quantisation:
4.127). Quantising a block: q = trunc((w - min) / d + 0.5), clipped to 0..15, with d computed in fp32 and stored
in fp16, exactly as llama.cpp's `quantize_row_q4_1_ref` (and the `gguf` library's `Q4_1.quantize_blocks`) do.
So every block's minimum gets code 0 and its maximum code 15; a block that is already Q4_1 values has that
minimum and maximum again, the same d and m after fp16 rounding, and the same codes.

`Q4_1Linear` dequantises its weight on the fly in forward and backward (nf4.py's `dequantized_linear`), so
training keeps only the 5-bit weights plus one dequantised matrix at a time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from byollm.errors import ByollmError
from byollm.finetune.nf4 import dequantized_linear

Q4_1_BLOCK = 32  # weights per block (llama.cpp's QK4_1)
Q4_1_BYTES = 20  # bytes per block: d, m (2 each), 16 bytes of codes


def quantize_q4_1(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """(out, in) weight, in % 32 == 0 -> {"d": fp16 (blocks,), "m": fp16 (blocks,), "qs": uint8 (blocks, 16)},
    blocks in row-major order (llama.cpp's layout)."""
    blocks = weight.detach().to(torch.float32).reshape(-1, Q4_1_BLOCK)
    low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (high - low) / 15
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((blocks - low) * inverse + 0.5).clamp(0, 15).to(torch.uint8)
    qs = q[:, : Q4_1_BLOCK // 2] | (q[:, Q4_1_BLOCK // 2 :] << 4)
    return {"d": d.squeeze(1).to(torch.float16), "m": low.squeeze(1).to(torch.float16), "qs": qs.contiguous()}


def dequantize_q4_1(d: torch.Tensor, m: torch.Tensor, qs: torch.Tensor, shape: tuple[int, ...],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = d * q + m for every block, reshaped to `shape`."""
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(dtype)  # codes 0..15 of weights 0..15, then 16..31
    return (q * d.to(dtype)[:, None] + m.to(dtype)[:, None]).reshape(shape)


def q4_1_bytes(layer: Q4_1Linear) -> bytes:
    """The layer's blocks as llama.cpp stores them (d, m, qs per block): comparable with a GGUF tensor's bytes."""
    d = layer.d.view(torch.uint8).reshape(-1, 2)
    m = layer.m.view(torch.uint8).reshape(-1, 2)
    return torch.cat([d, m, layer.qs], dim=1).numpy().tobytes()


class Q4_1Linear(nn.Module):
    """A frozen linear layer stored in Q4_1 (buffers d, m, qs); forward dequantises in `compute_dtype`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % Q4_1_BLOCK:
            raise ByollmError(f"Q4_1 needs in_features to be a multiple of {Q4_1_BLOCK} (blocks run along rows), "
                              f"got {in_features}; use lora.quant_type nf4 for this model")
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        n_blocks = in_features * out_features // Q4_1_BLOCK
        self.register_buffer("d", torch.zeros(n_blocks, dtype=torch.float16, device=device))
        self.register_buffer("m", torch.zeros(n_blocks, dtype=torch.float16, device=device))
        self.register_buffer("qs", torch.zeros(n_blocks, Q4_1_BLOCK // 2, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> Q4_1Linear:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit Q4_1Linear"
                             f"({self.in_features}, {self.out_features})")
        for name, value in quantize_q4_1(weight).items():
            getattr(self, name).copy_(value)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> Q4_1Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, device=linear.weight.device)
        layer.load_weight(linear.weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None, *, scratch: bool = False) -> torch.Tensor:
        """The (out, in) weight in `dtype`; `scratch` is accepted for DequantizedMatmul (a new tensor each call)."""
        return dequantize_q4_1(self.d, self.m, self.qs, (self.out_features, self.in_features),
                               dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantized_linear(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}")


__all__ = ["Q4_1_BLOCK", "Q4_1_BYTES", "Q4_1Linear", "dequantize_q4_1", "q4_1_bytes", "quantize_q4_1"]
