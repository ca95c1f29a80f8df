"""How fast training runs: tokens per second and MFU (model FLOPs utilisation).

MFU = (FLOPs the model needs per token x tokens per second) / (what the hardware could do per second).
The model's FLOPs per token are `GPT.flops_per_token` (6 per weight + attention, as in the PaLM paper).
The denominator is the device's peak:
  GPU  the datasheet's dense bf16 tensor-core peak (table below; override with `peak_flops`), so an MFU of
       0.40 on an H100 means 40% of 989 TFLOP/s, the number papers report;
  CPU  CPUs have no single agreed peak, so by default we MEASURE the best dense matmul rate this machine
       reaches in the training dtype (a large square matmul, ~0.2 s, once per process): MFU on a CPU is the
       fraction of "what torch.matmul gets here". Pass `peak_flops` to use a datasheet number instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from functools import lru_cache

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets. Matched as substrings of
# torch.cuda.get_device_name(), most specific first.
GPU_BF16_PEAK: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM ("NVIDIA H200")
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
]


def gpu_peak_flops(name: str) -> float | None:
    for key, flops in GPU_BF16_PEAK:
        if key in name:
            return flops
    return None


@lru_cache(maxsize=4)
def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n x n matmul on this CPU (2 n^3 FLOPs each), best of `repeats`.
    Uses a private generator, so the training RNG is untouched."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return override, "given (peak_flops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        return flops, f"{name} dense bf16 datasheet peak" if flops else f"unknown GPU {name}: set peak_flops"
    if device.type == "cpu":
        return measured_matmul_flops(dtype), f"measured 1024^3 {str(dtype).removeprefix('torch.')} matmul on this CPU"
    return None, f"no peak known for {device.type}: set peak_flops"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_large_frees_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation of `threshold_bytes` or more with its own memory map, returned to the
    OS as soon as it is freed. True if set (glibc only; elsewhere nothing happens).

    Why: glibc starts with that threshold but raises it (up to 32 MB) each time a mapped block is freed, so
    the per-step temporaries of a training step (dequantised weights, logits, activations, several MB each)
    soon come from the heap instead, and a freed heap block is kept for reuse: the process's resident memory
    ratchets up step after step. Measured on gpt2-124m QLoRA (benchmarks/bench_finetune.py): peak RSS
    1,019-1,100 MB with glibc's default, 727 MB with a fixed 128 KB threshold. Setting it also turns the
    dynamic adjustment off, as the MALLOC_MMAP_THRESHOLD_ environment variable would."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))


__all__ = ["GPU_BF16_PEAK", "gpu_peak_flops", "measured_matmul_flops", "peak_flops", "return_large_frees_to_os"]
