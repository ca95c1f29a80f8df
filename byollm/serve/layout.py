"""A weight layout for decoding on a CPU: linear weights stored transposed, (in, out), contiguous.

At decode time a linear layer multiplies ONE row x by its weight: y = x W^T (+ b). nn.Linear keeps W as
(out, in), and MKL's path for that product (x times a transposed matrix, one row) streamed the weight at only
~6-7 GB/s on our 2-core CI machine, while the same product with W^T stored contiguous, `x @ Wt`, streamed
~12 GB/s (a 49,152 x 576 LM head: 17.8 -> ~9 ms). Decode is memory-bound, so that is decode speed: the
smollm2-135m shape went 10.1 -> 13.8 tok/s at batch 1 with identical greedy tokens (`benchmarks/bench_decode.py`,
contender `engine-t`). The sums are the same, taken in another order, so logits agree to float rounding.

This is an inference-only layout: the model is changed in place, and a tied LM head gets its own transposed
copy of the embedding table (the table itself stays for the lookups).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TransposedLinear(nn.Module):
    """y = x @ weight_t (+ bias), weight_t = W^T of an nn.Linear, stored (in_features, out_features)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def transpose_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a TransposedLinear, in place. Returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, TransposedLinear(child))
                replaced += 1
    return replaced


__all__ = ["TransposedLinear", "transpose_linears"]
