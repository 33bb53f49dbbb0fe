"""What every runner shares: timing, the hardware ceilings benchmarks compare against, which
profiled kernels count as attention, and handing a finished run to the report.

GPU work is timed with CUDA events after warm-up; every figure is a median with its spread."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from sqt.utils import is_out_of_memory


def failure_of(error: BaseException) -> dict | None:
    """How a sweep records a run that failed and goes on: a loss that stopped being finite, or
    memory that ran out, as {"kind", "reason", "step"}. None for any other error, which is a bug
    and propagates."""
    from sqt.divergence import NonFiniteLoss
    if isinstance(error, NonFiniteLoss):
        return {"kind": "non-finite loss", "reason": str(error), "step": error.step}
    if is_out_of_memory(error):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # what the failed run held, for the runs after it
        return {"kind": "out of memory", "reason": str(error).strip().splitlines()[0][:300],
                "step": None}
    return None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_ms: list[float]) -> dict:
    """Median and spread of timing samples (milliseconds)."""
    s = sorted(samples_ms)
    n = len(s)
    q = statistics.quantiles(s, n=4) if n >= 2 else [s[0]] * 3
    return {"median_ms": statistics.median(s), "q1_ms": q[0], "q3_ms": q[2], "min_ms": s[0],
            "max_ms": s[-1], "n": n}


def time_fn(fn: Callable[[], object], device, warmup: int = 3, repeats: int = 10,
            max_seconds: float | None = None) -> dict:
    """Time `fn()` `repeats` times after `warmup` calls. On CUDA each call is bracketed by events
    (no host clock on asynchronous work); on CPU by perf_counter. `max_seconds` stops early once
    at least 3 samples are taken, for slow cases."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    samples, start_all = [], time.perf_counter()
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if max_seconds and len(samples) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return summarize(samples)


def matmul_peak_tflops(device, dtype=torch.bfloat16, n: int = 8192, repeats: int = 20) -> float:
    """The measured dense matmul rate on random data (never zeros: they run faster), the ceiling
    that '% of peak' figures are taken against."""
    device = torch.device(device)
    if device.type != "cuda":
        n = min(n, 1024)
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = time_fn(lambda: a @ b, device, warmup=5, repeats=repeats)
    return 2 * n ** 3 / (stats["median_ms"] * 1e-3) / 1e12


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The measured device-to-device copy rate in GB/s, counting the bytes read plus the bytes
    written: the ceiling that memory-bound work (a decode step reads every weight and the K/V
    cache once) is compared against. Smaller on the CPU, where the number is only indicative."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return 2 * src.numel() * 4 / (stats["median_ms"] * 1e-3) / 1e9


# Substrings of the kernel (or CPU op) names that belong to attention, across every backend: SDPA's
# flash, cuDNN, memory-efficient and math paths, FlexAttention's Triton templates, and the GEMV and
# softmax kernels a one-token decode step may run instead.
ATTENTION_KERNEL_HINTS = ("flash", "fmha", "cudnn", "attention", "attn", "efficient", "memeff",
                          "sdpa", "flex", "triton_tem", "softmax", "gemv")


def attention_kernel_names(names: Iterable[str]) -> list[str]:
    """The distinct names among `names` that look like attention, sorted."""
    return sorted({n for n in names if any(h in n.lower() for h in ATTENTION_KERNEL_HINTS)})


def show_run(summary_path, wall_s: float) -> None:
    """The end of a runner: its run as the report renders it, then its wall time and summary."""
    print()
    report_run(summary_path)
    print(f"\nWall time {wall_s:.1f} s. Summary: {summary_path}")


def report_run(path, *options: str) -> int:
    """Show a finished run the way the report renders it, without importing the report: data
    flows runner -> JSON -> report. Runs `python -m bench.report --run PATH [options]` in its own
    process and prints what it printed (so a caller's captured stdout holds it)."""
    root = str(Path(__file__).resolve().parent.parent)     # where the `bench` package lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    sys.stdout.flush()
    done = subprocess.run([sys.executable, "-m", "bench.report", "--run", str(path), *options],
                          env=env, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    print(done.stderr, end="", file=sys.stderr, flush=True)
    return done.returncode
