"""Int8 weights for inference: each nn.Linear weight stored as int8 plus one scale per
output channel (row); with the default kernel the activations stay in floating point (weight-only).

    scale[n] = max_k |W[n, k]| / 127          one number per output channel: a row's largest weight -> 127
    Q[n, k]  = round(W[n, k] / scale[n])       in -127..127 (symmetric: zero stays exactly zero)
    y        = x @ (Q * scale[:, None])^T + b  = (x @ Q^T) * scale + b

The rounding error of a weight is at most scale/2 = max|row| / 254, so a row with one large weight loses
precision on its small ones; per-channel scales (rather than one per tensor) keep that damage within a row.
The weights take a quarter of fp32's memory. Whether it is faster depends on the kernel: decoding at batch 1
reads every weight once per token, so a kernel that multiplies int8 weights directly reads 4x fewer bytes.
Three kernels are available here:

    "dequant":  F.linear(x, Q.to(x.dtype)) * scale: converts the int8 rows to floats on every call
    "int8pack": torch._weight_int8pack_mm, PyTorch's fused int8-weight matmul (used by gpt-fast/torchao)
    "fbgemm":   torch.ops.quantized.linear_dynamic (FBGEMM): the same int8 weights, and the activations are
                quantised too, to 7-bit unsigned per call (dynamic, one scale per call: reduce_range avoids the
                int16 overflow of AVX2's multiply-add), so the product runs on integer SIMD. Not weight-only:
                activation rounding adds error, and a row's result depends slightly on the other rows of the
                batch (they share the activation scale), so batched greedy output may differ from alone.

Measured with the engine (random weights, 2 threads of a 16-core Xeon, torch 2.11, 64 new tokens after a
32-token prompt, prefill included, interleaved runs): smollm2-135m fp32 22.8 tok/s, "fbgemm" 26.7 (1.17x);
gpt2-124m fp32 30.3, "fbgemm" 58.9 (1.94x; its wider, fewer layers spend more time in matmuls); batch 8,
gpt2-124m: 88 -> 268 tok/s in all. "dequant" (20 vs 27 fp32 in another run) and "int8pack" (15) lose to fp32's
MKL matmul: dequant writes a float copy of every weight on each call, and the int8pack CPU kernel is not
vectorised for this case. Quality, val loss of a small trained Llama (llama-nano, 143k held-out tokens):
fp32 3.75210, "dequant" 3.75204, "fbgemm" 3.75825 (+0.006: the activation rounding).
"dequant" stays the default: exact to the rounded weights and batch-invariant; "fbgemm" is the fast choice.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ByollmError

Backend = Literal["dequant", "int8pack", "fbgemm"]
BACKENDS = ("dequant", "int8pack", "fbgemm")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 codes and (N,) fp32 scales, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights and per-output-channel scales (inference only)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 backend: Backend = "dequant") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ByollmError(f"unknown int8 backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.backend = backend
        self._packed = None
        if backend == "fbgemm":
            if codes.device.type != "cpu":
                raise ByollmError("the int8 'fbgemm' backend runs on the CPU only; use 'dequant' on other devices")
            # FBGEMM's own layout of the same codes and per-channel scales (zero points 0: symmetric).
            # torch warns that quantized-tensor creation is deprecated; it is the only way in to FBGEMM's
            # kernel in torch 2.13, so the warning is silenced here and the backend stays opt-in.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(
                    codes, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: Backend = "dequant") -> Int8Linear:
        codes, scale = quantize_per_channel(linear.weight)
        return cls(codes, scale, linear.bias, backend)

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # bias already added
        if self.backend == "int8pack":
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.codes, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            # Scaling the outputs rather than the weights: N multiplies instead of N * K.
            y = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


@torch.no_grad()
def quantize_int8(model: nn.Module, backend: Backend = "dequant") -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear, in place (and return the model). A tied LM head
    gets its own int8 copy; the embedding table it shares stays in floating point (a lookup, not a matmul)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child, backend))
    return model


__all__ = ["Int8Linear", "quantize_int8", "quantize_per_channel"]
