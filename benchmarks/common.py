"""Shared helpers for the benchmarks: the machine, interleaved timing, matmul peaks, tables, JSON.

A shared 2-core machine is noisy: the same run can take twice as long on another day. So nothing here
times one contender in a block and the other later; `interleaved` alternates them step by step (and
flips the order every round) and the benchmarks report medians and ratios measured in the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What a results table needs to be read later: CPU, cores, threads, versions, date, load."""
    import transformers  # optional for byollm, required for the benchmarks

    flags = cpu_flags()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_hardware": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")) or "none",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_1min_at_start": load_average(),
    }


def warn_if_busy(threads: int) -> None:
    load = load_average()
    if load is not None and load > 0.5:
        print(f"note: 1-minute load average is {load} before starting: other processes share these cores, so "
              f"absolute numbers will be low and noisy (ratios, measured interleaved, hold up better). "
              f"With {threads} threads on a busy machine, --threads 1 may even be faster.")


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """'wall' (default) or 'cpu': CPU seconds of this process. With one thread, CPU time does not count the
    time the OS gives the core to other processes, so it is the steadier measure on a busy shared machine;
    with several threads it counts threads spinning while they wait for each other, so prefer 'wall' then."""
    global clock
    clock = CLOCKS[name]


def interleaved(contenders: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, alternating A B, B A, A B, ... so that a slow spell on a shared
    machine hits all of them alike. `warmup` untimed rounds first (allocator, caches, lazy init)."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = clock()
            contenders[name]()
            times[name].append(clock() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def reps_for(fn: Callable[[], Any], budget_s: float, lo: int = 3, hi: int = 50) -> int:
    """How many repetitions of `fn` fit in `budget_s` (one untimed call to measure it; also a warm-up)."""
    start = clock()
    fn()
    once = max(clock() - start, 1e-6)
    return max(lo, min(hi, int(budget_s / once)))


def matmul_peak(dtype: torch.dtype, max_n: int = 2048, tries: int = 5, max_call_s: float = 0.5) -> dict[str, Any]:
    """Measured matmul throughput (FLOP/s), best of `tries`, for an n x n by n x n product in `dtype`: the
    ceiling MFU is quoted against. n doubles from 512 up to `max_n` while one product stays under `max_call_s`
    (CPUs without bf16 hardware run bf16 products orders of magnitude slower than fp32). F.linear is what
    nn.Linear calls, so this is the kernel the models use."""
    n, best = 256, float("inf")
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        F.linear(a, b)  # warm-up
        best = float("inf")
        for _ in range(tries):
            start = clock()
            F.linear(a, b)
            best = min(best, clock() - start)
        if 2 * n > max_n or best * 8 > max_call_s:  # doubling n multiplies the time by ~8
            break
        n *= 2
    return {"n": n, "flops": 2 * n**3 / best, "seconds": best}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal too) of dict rows."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(path: str | Path, results: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")
