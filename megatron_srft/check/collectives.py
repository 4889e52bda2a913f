"""Check 2: the distributed world starts for the config's layout, and an all-reduce over it is right and fast."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ..distributed import collectives as cx
from ..distributed.groups import init_distributed
from .context import MIB, Context
from .measure import cpu_kernels, free_device_memory, sync
from .results import PASS, Result, Skip, one_line


def start_world(ctx: Context) -> None:
    """Start torch.distributed and Megatron's parallel state for the config's layout (groups.py)."""
    try:
        ctx.groups = init_distributed(ctx.cfg.parallel, seed=ctx.cfg.train.seed)
        ctx.rank, ctx.world_size = ctx.groups.rank, ctx.groups.world_size
    except Exception as e:  # noqa: BLE001 - reported as check 2's FAIL
        ctx.world_error = one_line(e)


def measure_all_reduce(ctx: Context) -> Iterator[Result]:
    """2: correctness (sum of rank+1) and bus bandwidth of an all-reduce over the world (nccl-tests' busbw:
    algbw x 2(n-1)/n, algbw = bytes / seconds)."""
    if ctx.world_error:
        raise RuntimeError(f"the distributed world did not start: {ctx.world_error}")
    n = cx.world_size()
    backend = ctx.cfg.parallel.backend if ctx.cfg.parallel.backend != "auto" else ("nccl" if ctx.on_gpu else "gloo")
    if n == 1:
        raise Skip(f"world of 1 rank ({backend} started): run under torchrun --nproc-per-node N to measure")
    dev = cx.device_of()
    probe = torch.full((4,), float(cx.rank() + 1), device=dev)
    cx.all_reduce(probe)
    want = n * (n + 1) / 2
    if not torch.all(probe == want):
        raise RuntimeError(f"all-reduce of rank+1 gave {probe.tolist()}, expected {want}")
    numel = ctx.sizes.allreduce_bytes // 4
    buf = torch.zeros(numel, dtype=torch.float32, device=dev)  # zeros: repeated sums stay finite
    cx.all_reduce(buf)  # warm-up: the first NCCL call builds the communicator
    best = float("inf")
    with cpu_kernels():
        for _ in range(ctx.sizes.allreduce_iters):
            cx.barrier()
            sync()
            t0 = time.perf_counter()
            cx.all_reduce(buf)
            sync()
            best = min(best, time.perf_counter() - t0)
    # the slowest rank's best time is the collective's time
    best = float(cx.all_reduce(torch.tensor([best], dtype=torch.float64), "max")[0])
    del buf
    free_device_memory()
    algbw = numel * 4 / best / 1e9
    busbw = algbw * 2 * (n - 1) / n
    yield Result("2", "all-reduce", PASS,
                  f"{busbw:,.3g} GB/s bus bandwidth ({backend}, {n} ranks, {numel * 4 // MIB} MiB fp32, "
                  f"best of {ctx.sizes.allreduce_iters})",
                  {"bus_gb_per_s": busbw, "alg_gb_per_s": algbw, "bytes": numel * 4, "backend": backend,
                   "world_size": n})

