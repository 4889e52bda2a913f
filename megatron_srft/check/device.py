"""Checks 1b and 1c, this device's rates: dense matmul, pinned host-to-device copies; and the device memcpy rate
that check 5b compares the weight sync with."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .. import dtypes
from .context import MIB, Context, skip_reason
from .measure import cpu_kernels, free_device_memory, sync
from .results import PASS, Result, Skip


def measure_matmul(ctx: Context) -> Iterator[Result]:
    """1b: the best dense matmul rate over several square sizes, 2 n^3 FLOPs per product."""
    s, dev = ctx.sizes, ctx.device
    dtype_name = dtypes.dtype_name(s.matmul_dtype)
    best, best_n = 0.0, None
    with cpu_kernels():
        for n in s.matmul_sizes:
            a = torch.randn(n, n, device=dev, dtype=s.matmul_dtype)
            b = torch.randn(n, n, device=dev, dtype=s.matmul_dtype)
            c = torch.empty(n, n, device=dev, dtype=s.matmul_dtype)
            torch.matmul(a, b, out=c)  # warm-up (kernel selection)
            sync()
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            sync()
            one = max(time.perf_counter() - t0, 1e-6)
            iters = int(min(max(0.2 / one, 3), 100))  # ~0.2 s per size
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.matmul(a, b, out=c)
                sync()
                rate = 2.0 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12
                if rate > best:
                    best, best_n = rate, n
            del a, b, c
    free_device_memory()
    ctx.matmul_tflops = best
    yield Result("1b", "matmul", PASS,
                  f"{best:,.3g} TFLOP/s {dtype_name} (best of n={','.join(map(str, s.matmul_sizes))}: n={best_n})",
                  {"tflops": best, "dtype": dtype_name, "best_n": best_n, "sizes": list(s.matmul_sizes)})


def measure_h2d(ctx: Context) -> Iterator[Result]:
    """1c: pinned host -> device copy bandwidth, best of 5."""
    reason = skip_reason("1c", ctx.on_gpu)
    if reason:
        raise Skip(reason)
    nbytes = ctx.sizes.h2d_bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst.copy_(host, non_blocking=True)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        sync()
        best = min(best, time.perf_counter() - t0)
    del host, dst
    free_device_memory()
    gbps = nbytes / best / 1e9
    yield Result("1c", "host->device", PASS, f"{gbps:,.1f} GB/s (pinned, {nbytes // MIB} MiB, best of 5)",
                  {"gb_per_s": gbps, "bytes": nbytes})

def memcpy_gb_per_s(ctx: Context) -> float:
    nbytes = ctx.sizes.memcpy_bytes
    with cpu_kernels():
        src = torch.ones(nbytes // 4, device=ctx.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            dst.copy_(src)
            sync()
            best = min(best, time.perf_counter() - t0)
        del src, dst
    free_device_memory()
    return nbytes / best / 1e9

