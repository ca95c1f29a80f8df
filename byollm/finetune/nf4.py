"""NF4 (4-bit NormalFloat) quantisation and QLoRA layers, written from scratch.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores each frozen weight matrix in 4 bits:

1. The weight is flattened (row-major) and cut into blocks of 64 values. Each block is divided by its
   absolute maximum (`absmax`), so every value lands in [-1, 1].
2. Each normalised value is replaced by the index (0..15) of the nearest of 16 fixed levels, the NF4 code.
   The levels are quantiles of a standard normal distribution, so for normally distributed weights each
   level is used about equally often: `nf4_levels_from_normal_quantiles` derives them.
3. Two 4-bit indices are packed into one byte: the first value in the high nibble, the second in the low.
4. Double quantisation: the fp32 `absmax` of every block (32 bits per 64 weights = 0.5 bit per weight) is
   itself quantised to 8 bits. Its mean is subtracted first (absmax values are all positive, so centring them
   uses the signed 8-bit code better), then blocks of 256 scales are absmax-quantised to the nearest value of
   bitsandbytes' "dynamic" 8-bit map (`dynamic_map_8bit`). Cost: 8 bits per 64 weights + 32 bits per
   64 * 256 weights, about 0.127 bit per weight instead of 0.5.

Dequantisation is the reverse: level[index] * absmax. The layout matches `bitsandbytes.functional.
quantize_4bit(..., quant_type="nf4")` byte for byte (tested in tests/test_nf4.py): weights whose size is not
a multiple of 64 end with a short block that has its own absmax; an odd number of values is padded with one
zero (code 7) in the low nibble of the last byte.

One documented difference: bitsandbytes' CPU kernel for the 8-bit (double) quantisation uses an approximate
binary search that, for values lying within ~1% of a step from the midpoint between two levels, sometimes
picks the farther level. We always pick the nearest level, so a small fraction (< 1%) of the 8-bit absmax codes
differ from bitsandbytes' by one step; the 4-bit codes are identical. The tests measure this.

`NF4Linear` is the frozen 4-bit layer (dequantises its weight on the fly in the compute dtype), `QLoRALinear`
puts a trainable low-rank adapter on top of any frozen layer, `quantize_model` swaps a model's linear layers
for either ours or bitsandbytes' `Linear4bit`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from byollm.errors import ByollmError, require

# The 16 NF4 levels as published with QLoRA (and hard-coded in bitsandbytes). They equal
# `nf4_levels_from_normal_quantiles()` to within one float32 rounding step (scipy vs torch's ndtri).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

NF4_BLOCKSIZE = 64  # weights per absmax scale
DQ_BLOCKSIZE = 256  # absmax scales per second-level scale (double quantisation)

# The outermost quantile used: halfway between 1 - 1/(2*15) and 1 - 1/(2*16), so the extreme levels of the
# 7-level negative half and the 8-level positive half sit at the centre of their last probability bin.
NF4_OFFSET = 0.9677083


# --------------------------------------------------------------------------------------------------
# The code tables
# --------------------------------------------------------------------------------------------------


def nf4_levels_from_normal_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, float64: quantiles of N(0, 1), normalised to [-1, 1], with an exact zero.

    An asymmetric split gives zero its own level: 8 positive quantiles (of 9 equally spaced probabilities
    from `offset` down to 0.5, the 0.5 itself dropped), 7 negative ones (of 8), and 0."""
    def quantile(p: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtri(p.double())

    positive = quantile(torch.linspace(offset, 0.5, 9)[:-1])
    negative = -quantile(torch.linspace(offset, 0.5, 8)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return levels / levels.abs().max()


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed "dynamic" 8-bit map (arXiv:1511.04561): 256 sorted values in [-0.993, 1].

    Each of 7 decades 10^-6 .. 10^0 gets 2^i linearly spaced values (the midpoints of 2^i equal bins of
    [0.1, 1]) times 10^(i-6), for i = 0..6, with both signs; then 0 and 1. Small magnitudes get fine steps,
    which suits the spread of absmax values after the mean is removed."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (i - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Block-wise absmax quantisation to a code table
# --------------------------------------------------------------------------------------------------


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each x: compare against the midpoints between
    neighbours (a value exactly on a midpoint goes to the lower level)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten x, cut it into blocks of `blocksize` (the last may be shorter), scale each block by
    1/absmax into [-1, 1] and store the index of the nearest code value.

    Returns (indices as int32, same number of elements as x, flat; absmax per block, fp32)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = F.pad(flat, (0, n_blocks * blocksize - n))  # zero padding never raises a block's absmax
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)  # an all-zero block stays zero
    return _nearest_code(scaled.reshape(-1)[:n], code), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int) -> torch.Tensor:
    """code[index] * absmax of its block, fp32, flat."""
    values = code.to(indices.device)[indices.long()]
    n = values.numel()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return values * scale


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble; an odd count is padded with code 7 (zero)."""
    idx = indices.to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])
    return (idx[0::2] << 4) | idx[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_4bit`: n indices (int64)."""
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return idx[:n].long()


# --------------------------------------------------------------------------------------------------
# NF4 tensors (the quantised weight and its scales)
# --------------------------------------------------------------------------------------------------


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE,
                 double_quant: bool = True) -> dict[str, torch.Tensor]:
    """Quantise `weight` to NF4. Returns the tensors that hold it:

    - "codes": uint8, ceil(numel / 2) bytes of packed 4-bit indices;
    - without double quantisation, "absmax": fp32, one per block of `blocksize`;
    - with it, "absmax": uint8 (8-bit index into `dynamic_map_8bit`, one per block), "absmax_scale":
      fp32 (one per 256 blocks) and "absmax_offset": fp32 scalar (the mean subtracted before quantising).
    """
    # A chunk of whole blocks at a time: the temporaries (fp32 copies, indices) stay a few MB whatever the
    # weight's size, instead of several times the matrix. Chunks hold an even count, so packing is per chunk.
    flat, levels = weight.detach().reshape(-1), NF4_LEVELS.to(weight.device)
    chunk = blocksize * 4096
    codes, scales = [], []
    for start in range(0, flat.numel(), chunk):
        indices, absmax = quantize_blockwise(flat[start:start + chunk], levels, blocksize)
        codes.append(pack_4bit(indices))
        scales.append(absmax)
    codes_t, absmax = torch.cat(codes), torch.cat(scales)
    out = {"codes": codes_t}
    if not double_quant:
        out["absmax"] = absmax
        return out
    offset = absmax.mean()
    absmax_idx, absmax_scale = quantize_blockwise(absmax - offset, dynamic_map_8bit().to(weight.device),
                                                  DQ_BLOCKSIZE)
    out.update(absmax=absmax_idx.to(torch.uint8), absmax_scale=absmax_scale, absmax_offset=offset)
    return out


def nf4_absmax(absmax: torch.Tensor, absmax_scale: torch.Tensor | None = None,
               absmax_offset: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 block scales: as stored, or decoded from their 8-bit double quantisation."""
    if absmax_scale is None:
        return absmax.float()
    decoded = dequantize_blockwise(absmax, absmax_scale, dynamic_map_8bit().to(absmax.device), DQ_BLOCKSIZE)
    return decoded + absmax_offset


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                   absmax_scale: torch.Tensor | None = None, absmax_offset: torch.Tensor | None = None,
                   blocksize: int = NF4_BLOCKSIZE, dtype: torch.dtype = torch.float32, *,
                   scratch: bool = False) -> torch.Tensor:
    """NF4 level of each packed index times the absmax of its block, reshaped to `shape`, in `dtype`
    (computed in fp32, rounded once at the end as bitsandbytes does).

    scratch=True writes into a buffer shared by every call of the same size and dtype (valid until the next
    such call): what a training step wants, since it needs one dequantised weight at a time, and allocating
    (and page-faulting) a fresh multi-MB matrix twice per layer per step costs both time and heap."""
    n = math.prod(shape)
    scales = nf4_absmax(absmax, absmax_scale, absmax_offset)
    if n % blocksize or blocksize % 2:  # a short last block: the general (slower, bigger) path
        flat = dequantize_blockwise(unpack_4bit(codes, n), scales, NF4_LEVELS.to(codes.device), blocksize)
        return flat.view(*shape).to(dtype)
    # Each byte holds two codes, so a 256-row table gives both levels of a byte in one lookup: no unpacked
    # int64 indices (8 bytes a weight) and no per-weight copy of the scales, just the fp32 result, scaled in place.
    table = _byte_to_level_pair(codes.device)
    if scratch:
        index = _scratch("index", codes.numel(), torch.int32, codes.device).copy_(codes)
        pairs = torch.index_select(table, 0, index, out=_scratch("fp32", n, torch.float32, codes.device).view(-1, 2))
    else:
        pairs = table[codes.int()]  # (n/2, 2): levels of the high, low nibble
    weight = pairs.view(-1, blocksize).mul_(scales[:, None]).view(*shape)  # each row is one block; times its absmax
    if dtype == torch.float32:
        return weight
    return _scratch("out", n, dtype, codes.device).view(*shape).copy_(weight) if scratch else weight.to(dtype)


_SCRATCH: dict[tuple[str, int, torch.dtype, torch.device], torch.Tensor] = {}


def _scratch(role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer per (role, size, dtype, device), made once and reused (see `dequantize_nf4(scratch=True)`)."""
    key = (role, numel, dtype, torch.device(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return _SCRATCH[key]


_LEVEL_PAIRS: dict[torch.device, torch.Tensor] = {}


def _byte_to_level_pair(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: for each byte value, the NF4 levels of its high and its low nibble."""
    if device not in _LEVEL_PAIRS:
        byte = torch.arange(256)
        _LEVEL_PAIRS[device] = torch.stack([NF4_LEVELS[byte >> 4], NF4_LEVELS[byte & 0x0F]], dim=1).to(device)
    return _LEVEL_PAIRS[device]


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W dequantised from NF4. Backward recomputes W instead of saving it, so a training step
    keeps only the 4-bit weights of all layers (plus one dequantised matrix at a time)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # noqa: ANN001
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype, scratch=True).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # noqa: ANN001
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized_weight(grad.dtype, scratch=True), None  # the weight itself is frozen


def dequantized_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a frozen quantised layer (NF4Linear, Q4_1Linear): x W^T + b with W dequantised on the fly in the
    layer's compute dtype (`layer.dequantized_weight`), the result in x's dtype."""
    y = DequantizedMatmul.apply(x.to(layer.compute_dtype), layer)
    if layer.bias is not None:
        y = y + layer.bias.to(layer.compute_dtype)
    return y.to(x.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: packed 4-bit codes plus (optionally double-quantised) scales,
    all buffers. Forward dequantises the weight in `compute_dtype` (fp32 or bf16) and multiplies.

    Like `bitsandbytes.nn.Linear4bit(..., quant_type="nf4")`; the bias (if any) stays in full precision."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = NF4_BLOCKSIZE,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("codes", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // DQ_BLOCKSIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
            self.absmax_scale = self.absmax_offset = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> NF4Linear:
        """Quantise a full-precision (out, in) weight into this layer's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit NF4Linear"
                             f"({self.in_features}, {self.out_features})")
        for name, value in quantize_nf4(weight, self.blocksize, self.double_quant).items():
            getattr(self, name).copy_(value)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> NF4Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, **kwargs)
        layer.load_weight(linear.weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None, *, scratch: bool = False) -> torch.Tensor:
        """The full-precision weight (out, in); scratch=True: in a shared buffer, valid until the next call."""
        return dequantize_nf4(self.codes, self.absmax, (self.out_features, self.in_features), self.absmax_scale,
                              self.absmax_offset, self.blocksize, dtype or self.compute_dtype, scratch=scratch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantized_linear(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class QLoRALinear(nn.Module):
    """A frozen (usually 4-bit) layer plus a trainable low-rank update: base(x) + (alpha/r) * B(A(dropout(x))).

    A starts like nn.Linear's default (Kaiming-uniform), B at zero, so training starts from the base model.
    The adapter weights are fp32 (the optimiser's master copy); they are cast to the compute dtype in forward."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r < 1:
            raise ByollmError(f"LoRA rank must be at least 1, got r={r}")
        self.base, self.r, self.scaling, self.compute_dtype = base, r, alpha / r, compute_dtype
        self.alpha, self.use_dora, self.merged = alpha, False, False  # what save_adapter writes (PEFT format)
        for p in base.parameters():
            p.requires_grad_(False)
        device = next(iter(base.buffers()), next(iter(base.parameters()), torch.zeros(()))).device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.compute_dtype)
        update = F.linear(F.linear(h, self.lora_A.to(self.compute_dtype)), self.lora_B.to(self.compute_dtype))
        return (self.base(x) + self.scaling * update.to(x.dtype)).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------

# Linear layers inside the transformer blocks; the embedding and the LM head stay in full precision (as QLoRA does).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bnb_linear4bit(linear: nn.Linear, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    bnb = require("bitsandbytes", "finetune")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     blocksize=NF4_BLOCKSIZE).to(linear.weight.device)  # .to() quantises
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # On CPUs with AVX-512-BF16, bitsandbytes (0.48-0.50) repacks the weight for a bf16 kernel the first time it
    # runs in eval mode: that changes the numbers between training and held-out evaluation (bf16 scales), and
    # fails outright when in_features is not a multiple of the block size (its scales are reshaped per row).
    # Keep the one fp32 dequantise path everywhere, as on CPUs without that instruction set.
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    check_bnb_dequantize(bnb, layer, linear.weight)
    return layer


# The largest distance from a value in [-1, 1] to its nearest NF4 level (half the widest gap, -1 .. -0.696),
# with room for the 8-bit rounding of double-quantised scales: a correct dequantisation is never further away.
NF4_MAX_ERROR = 0.5 * float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) + 0.02


@torch.no_grad()
def check_bnb_dequantize(bnb: object, layer: nn.Module, weight: torch.Tensor) -> None:
    """Refuse a bitsandbytes layer whose weight does not dequantise to within NF4's error of the original.

    bitsandbytes 0.50's AVX-512 CPU kernel for `dequantize_4bit` takes the block scales row by row, so a
    weight whose rows are not a whole number of 64-weight blocks (in_features % 64 != 0) comes back wrong
    (measured: max error 2.08 on a (64, 160) normal matrix, vs 0.45 for its generic path and for ours). Only
    such shapes are checked (real models' widths are multiples of 64)."""
    if weight.device.type != "cpu" or weight.shape[1] % NF4_BLOCKSIZE == 0:
        return
    flat = weight.detach().float().reshape(-1)
    got = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCKSIZE
    absmax = F.pad(flat, (0, pad)).view(-1, NF4_BLOCKSIZE).abs().amax(1).repeat_interleave(NF4_BLOCKSIZE)
    error = ((got - flat).abs() - NF4_MAX_ERROR * absmax[:flat.numel()]).max().item()
    if error > 1e-6:
        raise ByollmError(f"bitsandbytes dequantises this {tuple(weight.shape)} weight wrongly on this CPU (its "
                          f"AVX-512 kernel needs in_features to be a multiple of {NF4_BLOCKSIZE}); use "
                          "lora.quant_backend byollm, or leave such layers out of lora.targets")


@torch.no_grad()
def quantize_model(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, *, backend: str = "byollm",
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32, lora_r: int = 0,
                   lora_alpha: float = 16.0, lora_dropout: float = 0.0) -> nn.Module:
    """Replace, in place, every nn.Linear whose name ends with one of `targets` (a name suffix such as
    "q_proj" or a regular expression matched against the full module name) by a 4-bit NF4 layer, and
    freeze every other parameter. With `lora_r > 0` each quantised layer gets a trainable `QLoRALinear`
    adapter (QLoRA).

    Layer by layer: each full-precision weight is quantised and dropped before the next one is touched, so
    the conversion never holds more than the model plus one layer's extra copy.

    backend: "byollm" (our `NF4Linear`) or "bitsandbytes" (`bitsandbytes.nn.Linear4bit`, nf4)."""
    if backend not in ("byollm", "bitsandbytes"):
        raise ByollmError(f"unknown quantisation backend {backend!r}; choose 'byollm' or 'bitsandbytes'")
    patterns = list(targets)

    def wanted(name: str) -> bool:
        return any(name.split(".")[-1] == p or re.fullmatch(p, name) for p in patterns)

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and wanted(n)]
    if not names:
        raise ByollmError(f"no linear layer matches the targets {patterns}; layer names look like "
                          f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear: nn.Linear = getattr(parent, child)
        if backend == "bitsandbytes":
            layer = _bnb_linear4bit(linear, double_quant, compute_dtype)
        else:
            layer = NF4Linear.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype)
        if lora_r > 0:
            layer = QLoRALinear(layer, linear.in_features, linear.out_features, r=lora_r, alpha=lora_alpha,
                                dropout=lora_dropout, compute_dtype=compute_dtype)
        setattr(parent, child, layer)  # the fp32 weight is released here (unless something else holds it)
        del linear
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, each tensor counted once (tied weights, shared state)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    # bitsandbytes keeps its scales in a QuantState attached to the weight, outside buffers().
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            extra = [state.absmax, getattr(state, "offset", None)]
            if getattr(state, "state2", None) is not None:
                extra.append(state.state2.absmax)
            total += sum(t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor))
    return total
