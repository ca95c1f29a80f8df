"""Plan a training run before renting it: memory per device, the largest micro-batch, tokens/s, time, cost and
communication, and the simplest parallel strategy that fits (`byollm plan`). Arithmetic only: a preset is built
on the meta device for its counts, nothing is allocated. GB = 1e9 bytes.

Model states (ZeRO, Rajbhandari et al. 2020, section 3.1 and Figure 1), Psi parameters, Nd data-parallel ranks:
  bf16      mixed precision as in the paper: bf16 weights 2 Psi + bf16 gradients 2 Psi + optimizer state K Psi,
            K = 12 (fp32 master weights, Adam's m and v: 4 + 4 + 4): 16 bytes per parameter.
  fp32      fp32 weights 4 Psi + gradients 4 Psi + Adam m, v 8 Psi: also 16 bytes, split 4 + 4 + 8 (the CPU).
  autocast  this project's Trainer on a GPU (torch.autocast bf16 over fp32 weights): fp32 weights 4 Psi plus the
            bf16 copies autocast keeps through backward 2 Psi, fp32 gradients 4 Psi, Adam 8 Psi: 18 bytes.
  ddp       every rank holds everything                       (2 + 2 + K) Psi        7.5B params: 120 GB
  zero1     optimizer state sharded (P_os)                     2 Psi + 2 Psi + K Psi / Nd     on 64: 31.4 GB
  zero2     + gradients sharded (P_os+g)                       2 Psi + (2 + K) Psi / Nd              16.6 GB
  fsdp      + parameters sharded (ZeRO-3, P_os+g+p)            (2 + 2 + K) Psi / Nd                  1.9 GB
  fsdp+tp   tensor parallelism of degree t inside a node first (each rank's share of every layer: Psi / t),
            then FSDP over Nd = N / t.
  FSDP also gathers whole units while it runs: about the largest unit (a block, or the embeddings and head) plus
  the next block in weights' bytes, and one unit's unsharded gradients ("FSDP gather buffers").

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.1:
s*b*h*(34 + 5*a*s/h) bytes per layer with 2-byte activations), adapted to OUR model (byollm/model/model.py: pre-norm
blocks, SDPA attention, no dropout). Bytes kept for backward per token of each layer, h = n_embd, hq = n_head *
head_dim, hkv = n_kv_head * head_dim, i = MLP width, a = heads, V = vocab; Bc = bytes of the matmul inputs (2 bf16
and autocast, 4 fp32), Br = bytes of the residual stream (2 bf16, 4 autocast and fp32):
  each norm, twice     LayerNorm: its input Br*h + mean and 1/std 8;  RMSNorm (written out): its input in fp32
                       4*h, the normalised x Br*h, 1/rms 4
  attention input      the norm's output, read by q/k/v projections           Bc*h
  q, k, v              kept by SDPA (after RoPE; RoPE's products keep only the  Bc*(hq + 2*hkv)
                       shared cos/sin)
  attention output     SDPA's output, also o_proj's input (a view) and its     Bc*hq + 4*a
                       fp32 log-sum-exp; no s x s scores: SDPA's flash kernels (CPU, CUDA) recompute them, which
                       removes Korthikanti's 5*a*s/h term; no dropout masks (their 2 of the 34)
  MLP input            the norm's output                                       Bc*h
  MLP                  GELU: its input and output 2*Bc*i; SwiGLU: gate out, SiLU out, up out, their product 4*Bc*i
For GPT-2 in bf16 this is 32*h (+16 + 4a bytes) per token per layer: Korthikanti's 34*s*b*h less the dropout masks.
Once per token, the head: the final norm, lm_head's input Bc*h, and the fp32 log-softmax output 4*V; at the start
of backward the fp32 gradients of the log-probs and of the logits add 8*V: 12*V in all (a training loop keeps the
loss, not the logits; the bf16 logits and their fp32 copy, 6*V, are gone by then). RoPE's cos and sin: 8*head_dim.
While a block's backward runs, its working set: the gradient in the residual stream Br*h and the MLP's gradients,
Bc*i (GELU) or 2*Bc*i (SwiGLU's product), the freed inputs making room for the rest.
  without checkpointing   L * layer + max(head, working set)
  with checkpointing      L * Br*h (each block's input; torch.utils.checkpoint around each block) + max(head, one
                          block recomputed + its working set): backward recomputes one block at a time
  tensor parallel t       everything / t (Megatron tensor + sequence parallelism; vocab-parallel logits)
Checked against measured peak memory on a CPU (tests/test_plan.py, `measure_peak_memory`).

Throughput: tokens/s = MFU * peak FLOP/s * N / flops_per_token, with flops_per_token = GPT.flops_per_token
(6 * matmul weights + 12 * L * H * D * T; --params: 6 * Psi + 12 * L * hidden * T). MFU counts model FLOPs only
(PaLM's definition): recomputation under checkpointing is extra hardware work, so it lowers the MFU you will reach.
Peaks: the datasheet bf16 table of byollm.train.perf; a CPU's is measured (byollm.train.perf.measured_matmul_flops).

Communication sent per GPU per step (one micro-batch each), ring collectives over Nd ranks, G = gradient bytes,
P = weight bytes of the rank's share: ddp all-reduce 2 (Nd-1)/Nd G; zero1/zero2 reduce-scatter of gradients +
all-gather of weights (Nd-1)/Nd (G + P) (= ddp when P = G); fsdp all-gather forward and backward + reduce-scatter
(Nd-1)/Nd (2P + G) (= 1.5 x ddp); tensor parallel (Megatron): per layer 2 all-reduces of b*s*h*Bc bytes forward and
2 backward (3 with checkpointing's recomputed forward), each sending 2 (t-1)/t of it: 8 (12) b*s*h*Bc (t-1)/t per
layer, that is 4 b*s*h*Bc (t-1)/t forward and as much backward.

Overhead, a separate allowance: 1 GB per GPU (CUDA context, cuBLAS and NCCL workspaces; 0.5 GB on a CPU for the
Python process) + 10% of everything else for the allocator's fragmentation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from byollm.errors import ByollmError, ConfigError
from byollm.model.config import ModelConfig, preset

GB = 1e9
STRATEGIES = ("ddp", "zero1", "zero2", "fsdp", "fsdp+tp")
DEFAULT_GPU = "H100"

# Memory of one GPU in GB, matched (case and spaces ignored) as substrings of the name, most specific first. A size in
# the name wins ("A100 40GB", "V100-16GB"): A100 also comes with 40 GB, V100 with 16.
GPU_MEMORY_GB: list[tuple[str, float]] = [
    ("H200", 141), ("H100 NVL", 94), ("H100", 80), ("A100", 80), ("A10G", 24), ("A10", 24), ("L40S", 48), ("L4", 24),
    ("RTX 4090", 24), ("RTX 3090", 24), ("V100", 32), ("T4", 16),
]
_OVERHEAD = {"gpu": (1.0 * GB, 0.10), "cpu": (0.5 * GB, 0.10)}  # (fixed bytes, fraction of the rest)


class Precision(NamedTuple):
    params: float  # bytes per parameter held as weights
    grads: float
    optimizer: float
    residual: float  # Br: bytes of the residual stream (what the norms keep)
    compute: float  # Bc: bytes of the matmul inputs and outputs
    weights: float  # bytes of the weights the collectives move
    note: str


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision(2, 2, 12, 2, 2, 2, "bf16 mixed precision as in ZeRO: bf16 weights 2 + bf16 gradients 2 + "
                      "fp32 master weights and Adam m, v 12 (K) = 16 bytes/param; bf16 activations"),
    "autocast": Precision(6, 4, 8, 4, 2, 4, "torch.autocast bf16 over fp32 weights: fp32 weights 4 + their bf16 "
                          "copies 2 + fp32 gradients 4 + Adam m, v 8 = 18 bytes/param; bf16 matmul activations, "
                          "fp32 residual stream"),
    "fp32": Precision(4, 4, 8, 4, 4, 4, "fp32: weights 4 + gradients 4 + Adam m, v 8 = 16 bytes/param; fp32 "
                      "activations"),
}


def _one_of(what: str, name: str, choices: Sequence[str]) -> str:
    if name not in choices:
        raise ConfigError(f"{what} '{name}' is not one of {', '.join(choices)}")
    return name


def _precision(name: str) -> Precision:
    return PRECISIONS[_one_of("precision", name, list(PRECISIONS))]


def model_state_bytes(n_params: float, strategy: str = "ddp", gpus: int = 1, precision: str = "bf16",
                      tp: int = 1) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer state (ZeRO's model states) under `strategy` on `gpus`
    GPUs, `tp` of them splitting each layer (the rest, gpus / tp, are data-parallel)."""
    p, strategy = _precision(precision), _one_of("strategy", strategy, STRATEGIES)
    local, dp = n_params / tp, gpus // tp
    params, grads, optimizer = p.params * local, p.grads * local, p.optimizer * local
    if strategy != "ddp":
        optimizer /= dp
    if strategy in ("zero2", "fsdp", "fsdp+tp"):
        grads /= dp
    if strategy in ("fsdp", "fsdp+tp"):
        params /= dp
    return {"params": params, "grads": grads, "optimizer": optimizer}


def _norm_bytes(c: ModelConfig, p: Precision) -> float:
    if c.norm == "rmsnorm":
        return 4 * c.n_embd + p.residual * c.n_embd + 4
    return p.residual * c.n_embd + 8


def layer_activation_bytes(c: ModelConfig, precision: str = "bf16") -> float:
    """Bytes one block keeps for backward per token (the table in the module docstring)."""
    p = _precision(precision)
    hq, hkv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    mlp = (4 if c.mlp == "swiglu" else 2) * c.intermediate_size
    return 2 * _norm_bytes(c, p) + p.compute * (c.n_embd + hq + 2 * hkv + hq + c.n_embd + mlp) + 4 * c.n_head


def activation_bytes(c: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                     checkpointing: bool = False, tp: int = 1) -> float:
    """Peak activation memory of one forward + backward of `micro_batch` sequences of `seq_len` tokens, per GPU."""
    p = _precision(precision)
    layer = layer_activation_bytes(c, precision)
    head = _norm_bytes(c, p) + p.compute * c.n_embd + 12 * c.vocab_size  # log-probs + their and the logits' grads
    working = p.residual * c.n_embd + (2 if c.mlp == "swiglu" else 1) * p.compute * c.intermediate_size
    rope = 8 * c.head_dim if c.pos_embedding == "rope" else 0
    if checkpointing:
        per_token = c.n_layer * p.residual * c.n_embd + max(head, layer + working) + rope
    else:
        per_token = c.n_layer * layer + max(head, working) + rope
    return per_token * micro_batch * seq_len / tp


def communication_bytes(n_params: float, strategy: str, gpus: int, precision: str = "bf16", tp: int = 1,
                        config: ModelConfig | None = None, micro_batch: int = 1, seq_len: int = 1,
                        checkpointing: bool = False) -> dict[str, float | None]:
    """Bytes each GPU sends per step (one micro-batch): data parallel and tensor parallel (module docstring)."""
    p, strategy = _precision(precision), _one_of("strategy", strategy, STRATEGIES)
    dp, local = gpus // tp, n_params / tp
    ring = (dp - 1) / dp
    g, w = p.grads * local, p.weights * local
    dp_bytes = {"ddp": 2 * ring * g, "zero1": ring * (g + w), "zero2": ring * (g + w)}.get(strategy, ring * (2 * w + g))
    tp_bytes: float | None = 0.0
    if tp > 1:
        per_layer = None if config is None else (12 if checkpointing else 8) * micro_batch * seq_len * config.n_embd
        tp_bytes = None if per_layer is None else per_layer * p.compute * (tp - 1) / tp * config.n_layer
    return {"data_parallel": dp_bytes, "tensor_parallel": tp_bytes,
            "total": None if tp_bytes is None else dp_bytes + tp_bytes}


def _squash(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).upper()


def gpu_memory_gb(name: str) -> float | None:
    """Memory of the GPU `name` in GB: a size written in the name ("A100 40GB"), else the table; None if unknown."""
    size = re.search(r"(?<![A-Z\d])(\d+)\s*GB?\b", name.upper().replace("-", " ").replace("_", " "))
    if size and gpu_flops(name):
        return float(size.group(1))
    return next((gb for key, gb in GPU_MEMORY_GB if _squash(key) in _squash(name)), None)


def gpu_flops(name: str) -> float | None:
    """Dense bf16 peak of the GPU `name` (byollm.train.perf's datasheet table, case and spaces ignored)."""
    from byollm.train.perf import GPU_BF16_PEAK

    return next((flops for key, flops in GPU_BF16_PEAK if _squash(key) in _squash(name)), None)


def _device(cpu: bool, gpu: str | None, memory_gb: float | None, peak: float | None,
            precision: str) -> tuple[str, float, float, str]:
    """(name, memory bytes, peak FLOP/s, where the peak comes from) of one device."""
    if cpu:
        import torch

        from byollm.train.perf import measured_matmul_flops

        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        source = "given (--peak-flops)" if peak else f"measured 1024^3 {str(dtype)[6:]} matmul on this CPU"
        memory_gb = memory_gb or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
        return "CPU", memory_gb * GB, peak or measured_matmul_flops(dtype), source
    name = gpu or DEFAULT_GPU
    table_peak, memory_gb = gpu_flops(name), memory_gb or gpu_memory_gb(name)
    if (table_peak is None and peak is None) or memory_gb is None:
        known = ", ".join(sorted({k for k, _ in GPU_MEMORY_GB}))
        raise ConfigError(f"unknown GPU '{name}': choose one of {known}, or give --memory GB and --peak-flops")
    source = "given (--peak-flops)" if peak else "dense bf16 datasheet peak"
    return name, memory_gb * GB, peak or table_peak, source


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """What stays fixed while strategies are compared."""

    n_params: float
    config: ModelConfig | None  # None: a bare parameter count (no activations)
    precision: str
    gpus: int
    gpus_per_node: int
    seq_len: int
    kind: str  # "gpu" or "cpu"
    capacity: float  # bytes per device
    layer_params: float | None  # one block's parameters (FSDP units)
    root_params: float | None  # the rest: embeddings, final norm, head


def _memory(s: _Setup, strategy: str, tp: int, checkpointing: bool, micro_batch: int) -> dict[str, float | None]:
    m: dict[str, float | None] = dict(model_state_bytes(s.n_params, strategy, s.gpus, s.precision, tp))
    m["model_states"] = m["params"] + m["grads"] + m["optimizer"]
    m["activations"] = None if s.config is None else activation_bytes(
        s.config, micro_batch, s.seq_len, s.precision, checkpointing, tp)
    buffers: float | None = 0.0
    if strategy in ("fsdp", "fsdp+tp") and s.gpus // tp > 1:  # None: no layer count to size the units by
        p, unit = PRECISIONS[s.precision], max(s.layer_params or 0.0, s.root_params or 0.0)
        buffers = None if s.layer_params is None else ((unit + s.layer_params) * p.params + unit * p.grads) / tp
    m["gather_buffers"] = buffers
    fixed, fraction = _OVERHEAD[s.kind]
    rest = m["model_states"] + (m["activations"] or 0.0) + (buffers or 0.0)
    m.update(overhead=fixed + fraction * rest, total=rest + fixed + fraction * rest, capacity=s.capacity)
    return m


def _fits(s: _Setup, strategy: str, tp: int, checkpointing: bool, micro_batch: int) -> bool:
    return _memory(s, strategy, tp, checkpointing, micro_batch)["total"] <= s.capacity


def _max_micro_batch(s: _Setup, strategy: str, tp: int, checkpointing: bool) -> int | None:
    """The largest micro-batch that fits (0: not even one sequence); None without a model shape."""
    if s.config is None:
        return None
    if not _fits(s, strategy, tp, checkpointing, 1):
        return 0
    lo, hi = 1, 2
    while _fits(s, strategy, tp, checkpointing, hi) and hi < 1 << 30:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(s, strategy, tp, checkpointing, mid) else (lo, mid)
    return lo


def _recommend(s: _Setup, micro_batch: int) -> dict[str, Any]:
    """The simplest strategy that fits `micro_batch`: ddp, then ZeRO-1, ZeRO-2, FSDP, then FSDP + tensor parallel
    (smallest degree first), and only then the same again with activation checkpointing. Simpler means less
    communication and fewer moving parts: ddp sends 2x the gradients per step, FSDP 3x, tensor parallelism
    adds collectives inside every layer (fast only within a node), checkpointing ~33% more compute."""
    heads = s.config.n_head if s.config else 2**10
    degrees = [2**k for k in range(1, 10) if 2**k <= s.gpus_per_node and s.gpus % 2**k == heads % 2**k == 0]
    candidates = [(name, 1) for name in ("ddp", "zero1", "zero2", "fsdp")] + [("fsdp+tp", t) for t in degrees]
    tried = []
    for checkpointing in (False, True):
        for strategy, tp in candidates:
            total = _memory(s, strategy, tp, checkpointing, micro_batch)["total"]
            label = _label(strategy, tp, checkpointing)
            if total <= s.capacity:
                why = "; ".join(tried[:6] + (["..."] if len(tried) > 6 else []))
                reason = (f"{label} fits micro-batch {micro_batch} x {s.seq_len} tokens in {total / GB:.1f} of "
                          f"{s.capacity / GB:.1f} GB: the simplest that fits (less sharding = less communication)"
                          + (f"; {why}" if why else ""))
                return {"strategy": strategy, "tp": tp, "checkpointing": checkpointing, "fits": True,
                        "total_gb": total / GB, "reason": reason}
            tried.append(f"{label} needs {total / GB:.1f} GB")
    strategy, tp = candidates[-1]
    total = _memory(s, strategy, tp, True, micro_batch)["total"]
    return {"strategy": strategy, "tp": tp, "checkpointing": True, "fits": False, "total_gb": total / GB,
            "reason": f"nothing fits micro-batch {micro_batch} x {s.seq_len} tokens in {s.capacity / GB:.1f} GB; the "
                      f"closest, {_label(strategy, tp, True)}, needs {total / GB:.1f} GB: use more GPUs, GPUs with "
                      "more memory, a smaller micro-batch or a shorter sequence"}


def _label(strategy: str, tp: int, checkpointing: bool) -> str:
    return (f"fsdp+tp{tp}" if strategy == "fsdp+tp" else strategy) + (" + checkpointing" if checkpointing else "")


@dataclass
class Plan:
    """The answer of `plan()`: memory in GB per device, throughput, time, cost, communication, recommendation."""

    model: str
    n_params: float
    device: str
    gpus: int
    nodes: int
    gpus_per_node: int
    memory_per_device_gb: float
    peak_flops: float
    peak_source: str
    precision: str
    strategy: str
    tp: int
    dp: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    memory_gb: dict[str, float | None]
    fits: bool
    max_micro_batch: int | None
    flops_per_token: float
    mfu: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    tokens_per_step: int
    target_tokens: float
    hours: float
    price_per_gpu_hour: float | None
    cost: float | None
    communication_gb: dict[str, float | None]
    recommendation: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(**values: float | None) -> None:
    for name, v in values.items():
        if v is not None and not v > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")


@functools.lru_cache(maxsize=16)
def _meta_gpt(config_json: str) -> Any:
    """The GPT of a config on the meta device (shapes, no memory), kept for the next plan of the same model."""
    import torch

    from byollm.model.model import GPT

    with torch.device("meta"):
        return GPT(ModelConfig.from_dict(json.loads(config_json)))


def _model(model: str | ModelConfig | None, params: float | None, layers: int | None, hidden: int | None,
           vocab: int | None, seq_len: int | None) -> tuple[str, float, ModelConfig | None, float | None, float, float]:
    """(name, parameters, config or None, one block's parameters, the rest's, FLOPs per token)."""
    if (model is None) == (params is None):
        raise ConfigError("give a model preset (--model gpt2-124m) or a parameter count (--params 7.5e9), one of them")
    if model is not None:
        if layers is not None or hidden is not None or vocab is not None:
            raise ConfigError("--layers, --hidden and --vocab describe a --params model; a preset has its own shape")
        config = model if isinstance(model, ModelConfig) else preset(model)
        net = _meta_gpt(json.dumps(config.to_dict()))
        layer, n = float(sum(p.numel() for p in net.blocks[0].parameters())), float(net.num_params())
        fpt = net.flops_per_token(seq_len or config.block_size)
        return (model if isinstance(model, str) else "custom"), n, config, layer, n - config.n_layer * layer, fpt
    _positive(params=params, layers=layers, hidden=hidden, vocab=vocab)
    if layers is None or hidden is None:
        if hidden is not None:
            raise ConfigError("--hidden needs --layers too (activations need both)")
        return "--params model", params, None, (params / layers if layers else None), 0.0, 6 * params
    head_dim = next((d for d in (128, 64) if hidden % d == 0), hidden)
    config = ModelConfig(n_layer=layers, n_embd=hidden, n_head=hidden // head_dim, vocab_size=vocab or 50257,
                         block_size=seq_len or 2048)
    layer = 12.0 * hidden * hidden  # GPT-2 shape: qkv + proj 4h^2, MLP 8h^2
    fpt = 6 * params + 12 * layers * hidden * (seq_len or 2048)
    return "--params model", params, config, layer, max(params - layers * layer, 0.0), fpt


def plan(model: str | ModelConfig | None = None, *, params: float | None = None, layers: int | None = None,
         hidden: int | None = None, vocab: int | None = None, gpus: int | None = None, nodes: int | None = None,
         gpus_per_node: int | None = None, gpu: str | None = None, memory_gb: float | None = None,
         peak_flops: float | None = None, device: str = "gpu", strategy: str | None = None, tp: int | None = None,
         micro_batch: int = 1, seq_len: int | None = None, checkpointing: bool = False, precision: str | None = None,
         mfu: float = 0.4, target_tokens: float | None = None, price_per_gpu_hour: float | None = None) -> Plan:
    """Plan training `model` (a preset name or config) or a bare `params` count on `gpus` GPUs. `strategy` None:
    the recommended one (and its checkpointing, if it needs it). `target_tokens` None: 20 per parameter
    (Chinchilla). See the module docstring for every formula."""
    cpu = _one_of("device", device, ("gpu", "cpu")) == "cpu"
    precision = precision or ("fp32" if cpu else "bf16")
    _precision(precision)
    if strategy is not None:
        _one_of("strategy", strategy, STRATEGIES)
    for name, v in (("gpus", gpus), ("nodes", nodes), ("gpus_per_node", gpus_per_node), ("micro_batch", micro_batch),
                    ("seq_len", seq_len), ("tp", tp)):
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    _positive(memory=memory_gb, peak_flops=peak_flops, target_tokens=target_tokens, price=price_per_gpu_hour)
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    assumed_nodes = gpus is not None and nodes is None and gpus_per_node is None and gpus > 8 and gpus % 8 == 0
    per_node = gpus_per_node or (8 if assumed_nodes else (gpus or 1) // (nodes or 1) or 1)
    gpus = gpus or (nodes or 1) * per_node
    nodes = nodes or max(gpus // per_node, 1)
    if nodes * per_node != gpus:
        raise ConfigError(f"{gpus} GPUs do not make {nodes} node(s) of {per_node}: give --gpus = --nodes x "
                          "--gpus-per-node")
    name, n_params, config, layer_params, root_params, fpt = _model(model, params, layers, hidden, vocab, seq_len)
    seq_len = seq_len or (config.block_size if config is not None else 2048)
    dev_name, capacity, peak, source = _device(cpu, gpu, memory_gb, peak_flops, precision)
    s = _Setup(n_params, config, precision, gpus, per_node, seq_len, "cpu" if cpu else "gpu", capacity,
               layer_params, root_params)
    if tp is not None and strategy != "fsdp+tp":
        raise ConfigError(f"--tp {tp} needs --strategy fsdp+tp")
    if strategy == "fsdp+tp":
        if tp is None or tp < 2:
            raise ConfigError("--strategy fsdp+tp needs --tp DEGREE (2 or more GPUs splitting each layer)")
        if gpus % tp:
            raise ConfigError(f"--tp {tp} must divide the {gpus} GPUs")
        if config is not None and config.n_head % tp:
            raise ConfigError(f"--tp {tp} must divide the {config.n_head} attention heads of {name}")
    rec = _recommend(s, micro_batch)
    notes = [PRECISIONS[precision].note]
    if assumed_nodes:
        notes.append(f"nodes: {nodes} of 8 GPUs assumed (give --nodes or --gpus-per-node)")
    if not cpu and gpu is None:
        notes.append(f"GPU: {DEFAULT_GPU} (the default; give --gpu NAME or --memory GB)")
    if strategy is None:
        strategy, tp = rec["strategy"], rec["tp"]
        checkpointing = checkpointing or rec["checkpointing"]
        notes.append(f"strategy: the recommended {_label(strategy, tp, checkpointing)} (give --strategy to choose)")
    tp = tp or 1
    mem = _memory(s, strategy, tp, checkpointing, micro_batch)
    if config is None:
        notes.append("activations not counted: give --layers and --hidden (and --vocab) for them")
    elif config.pos_embedding == "learned" and seq_len > config.block_size:
        notes.append(f"{name} has learned positions for {config.block_size} tokens; --seq-len {seq_len} is longer")
    if tp > per_node:
        notes.append(f"tensor parallelism over {tp} GPUs crosses nodes ({per_node} per node): slow over the network")
    if strategy == "ddp" and gpus > 1:
        notes.append("ddp: gradient_as_bucket_view=True assumed (else DDP's buckets copy the gradients once more)")
    if checkpointing:
        notes.append("checkpointing recomputes each block's forward (~1/3 more FLOPs, not in MFU): expect a lower MFU")
    tokens_s = mfu * peak * gpus / fpt
    target = target_tokens or 20 * n_params
    if target_tokens is None:
        notes.append("target tokens: 20 per parameter (Chinchilla-optimal); give --tokens N")
    hours = target / tokens_s / 3600
    comm = communication_bytes(n_params, strategy, gpus, precision, tp, config, micro_batch, seq_len, checkpointing)
    return Plan(
        model=name, n_params=n_params, device=dev_name, gpus=gpus, nodes=nodes, gpus_per_node=per_node,
        memory_per_device_gb=capacity / GB, peak_flops=peak, peak_source=source, precision=precision,
        strategy=strategy, tp=tp, dp=gpus // tp, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing,
        memory_gb={k: (None if v is None else v / GB) for k, v in mem.items()}, fits=mem["total"] <= capacity,
        max_micro_batch=_max_micro_batch(s, strategy, tp, checkpointing), flops_per_token=fpt, mfu=mfu,
        tokens_per_s=tokens_s, tokens_per_s_per_gpu=tokens_s / gpus, tokens_per_step=micro_batch * seq_len * gpus // tp,
        target_tokens=target, hours=hours, price_per_gpu_hour=price_per_gpu_hour,
        cost=None if price_per_gpu_hour is None else hours * gpus * price_per_gpu_hour,
        communication_gb={k: (None if v is None else v / GB) for k, v in comm.items()}, recommendation=rec,
        notes=notes)


def _num(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(p: Plan) -> str:
    """The plan as the table `byollm plan` prints."""
    m, c, r, unit = p.memory_gb, p.communication_gb, p.recommendation, "GPU" if p.device != "CPU" else "device"
    where = f"{p.gpus} x {p.device}" + (f" on {p.nodes} nodes" if p.nodes > 1 else "")
    tp = f" x tensor-parallel {p.tp}" if p.tp > 1 else ""
    lines = [f"{p.model} ({_num(p.n_params)} parameters) on {where} ({p.memory_per_device_gb:.0f} GB, peak "
             f"{p.peak_flops / 1e12:,.3g} TFLOP/s: {p.peak_source})",
             f"{_label(p.strategy, p.tp, p.checkpointing)}: data-parallel {p.dp}{tp}, micro-batch {p.micro_batch} x "
             f"{p.seq_len} tokens, precision {p.precision}", "", f"memory per {unit:<22}GB"]
    for text, key in (("parameters", "params"), ("gradients", "grads"), ("optimizer state", "optimizer"),
                      ("  model states", "model_states"), ("activations", "activations"),
                      ("FSDP gather buffers", "gather_buffers"), ("overhead allowance", "overhead"),
                      ("total", "total")):
        lines.append(f"  {text:<24}{'not counted' if m[key] is None else f'{m[key]:>10.2f}'}")
    lines.append(f"  {'of':<24}{p.memory_per_device_gb:>10.2f}  {'fits' if p.fits else 'does NOT fit'}")
    if p.max_micro_batch is not None:
        lines.append(f"largest micro-batch that fits: {p.max_micro_batch}")
    tp_comm = "" if p.tp == 1 else " + tensor-parallel " + (
        "? (give --layers, --hidden)" if c["tensor_parallel"] is None else f"{c['tensor_parallel']:.3f} GB")
    lines += [
        "", f"throughput at MFU {p.mfu:.2f}: {p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s_per_gpu:,.0f} per "
        f"{unit}), {p.flops_per_token / 1e9:,.2f} GFLOP per token",
        f"time to {_num(p.target_tokens)} tokens: {p.hours:,.1f} h ({p.hours / 24:,.1f} days)"
        + ("" if p.cost is None else f"; cost at ${p.price_per_gpu_hour:,.2f}/GPU-hour: ${p.cost:,.0f}"),
        f"communication per GPU per step ({p.tokens_per_step:,} tokens): data-parallel {c['data_parallel']:.3f} GB"
        + tp_comm, "", f"recommended: {_label(r['strategy'], r['tp'], r['checkpointing'])} ({r['reason']})",
        "assumptions:", *(f"  - {n}" for n in p.notes),
        "  - overhead: 1 GB per GPU (0.5 GB on a CPU) + 10% fragmentation; formulas: byollm/scale/plan.py docstring"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Checking the activation formula: measured peak memory on this CPU
# --------------------------------------------------------------------------------------------------


class MemoryCase(NamedTuple):
    config: ModelConfig
    batch_size: int
    seq_len: int
    checkpointing: bool = False


def measure_peak_memory(cases: Sequence[MemoryCase], threads: int = 1) -> list[float]:
    """Measured activation memory in bytes of one fp32 forward + backward per case, on this CPU, in a fresh Python
    process (Linux): the rise of its peak resident memory above the memory before the step. Large allocations
    are served by their own memory maps (byollm.train.perf.return_large_frees_to_os), so resident memory follows
    the live tensors; a warm-up step first allocates the gradients (the measured step accumulates into them) and
    each kernel's one-time buffers; the peak is reset (/proc/self/clear_refs) just before the measured step."""
    payload = json.dumps([{"config": c.config.to_dict(), "batch_size": c.batch_size, "seq_len": c.seq_len,
                           "checkpointing": c.checkpointing} for c in cases])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "byollm.scale.plan", payload, str(threads)], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    if done.returncode:
        raise ByollmError(f"measuring peak memory failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return [float(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]


def _measure_here(cases: list[dict[str, Any]], threads: int) -> list[float]:
    import torch
    from torch.utils.checkpoint import checkpoint

    from byollm.model.model import GPT
    from byollm.train.perf import return_large_frees_to_os

    if not os.path.exists("/proc/self/clear_refs"):
        raise ByollmError("measure_peak_memory needs Linux (/proc/self/clear_refs)")
    return_large_frees_to_os()
    torch.set_num_threads(threads)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    out = []
    for case in cases:
        config = ModelConfig.from_dict(case["config"])
        torch.manual_seed(0)
        model = GPT(config)
        for block in model.blocks if case["checkpointing"] else []:  # as the Trainer does it
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        x, y = torch.randint(0, config.vocab_size, (2, case["batch_size"], case["seq_len"]))
        model(x[:1, :16], y[:1, :16]).loss.backward()  # warm-up: the gradients, kernels' one-time buffers
        gc.collect()  # the previous case's model, held by reference cycles, must not be freed mid-step
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)  # free heap pages back to the OS: reusing them would not show in resident memory
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident memory
        model(x, y).loss.backward()
        with open("/proc/self/status") as f:
            out.append(int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024.0 - before)
        del model, x, y
    return out


if __name__ == "__main__":  # measure_peak_memory's fresh process
    print(json.dumps(_measure_here(json.loads(sys.argv[1]), int(sys.argv[2]))))


__all__ = ["GPU_MEMORY_GB", "PRECISIONS", "STRATEGIES", "MemoryCase", "Plan", "Precision", "activation_bytes",
           "communication_bytes", "format_plan", "gpu_flops", "gpu_memory_gb", "layer_activation_bytes",
           "measure_peak_memory", "model_state_bytes", "plan"]
