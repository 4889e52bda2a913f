"""Check 4: the fused vocab-parallel log-prob + entropy (ops/logprob.py) against the naive op: extra memory
over the logits, time, and the values."""

from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from .. import dtypes
from ..distributed import collectives as cx
from ..ops.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy
from .context import MIB, Context
from .measure import PeakMemory, cpu_kernels, free_device_memory, sync
from .results import PASS, Result, fmt_seconds


def check_logprob_op(ctx: Context) -> Iterator[Result]:
    """4: fused vocab-parallel log-prob + entropy vs the naive op at [T, V / TP], forward + backward.

    Extra memory = peak during forward + backward minus the memory with the logits allocated, as a multiple of
    the logits' size; it includes the logits' gradient (1x), which both ops produce. At TP > 1 the naive op runs
    on this rank's shard (same cost, meaningless values); values are compared over the full vocabulary on the
    first 256 tokens (shards gathered).
    """
    s, dev = ctx.sizes, ctx.device
    tp_group = ctx.groups.tp_group if ctx.groups is not None else None
    tp = cx.world_size(tp_group) if tp_group is not None else 1
    tp_rank = cx.rank(tp_group) if tp_group is not None else 0
    T, V = s.logprob_tokens, s.logprob_vocab
    v_local = -(-V // tp)
    gen = torch.Generator().manual_seed(7)  # the same targets on every TP rank
    targets = torch.randint(0, V, (T,), generator=gen).to(dev)
    g_lp, g_h = torch.randn(T, generator=gen).to(dev), torch.randn(T, generator=gen).to(dev)
    shard_gen = torch.Generator(device=dev).manual_seed(100 + tp_rank)  # on the device: [16384, 152064] is 10 GB
    logits = torch.randn(T, v_local, generator=shard_gen, device=dev, dtype=s.logprob_dtype).mul_(3).requires_grad_()
    logits_bytes = logits.numel() * logits.element_size()
    dtype_name = dtypes.dtype_name(s.logprob_dtype)

    def run(x: torch.Tensor, fused: bool):
        x.grad = None
        if fused:
            lp, h = vocab_parallel_logprob_entropy(x, targets, tp_group=tp_group, vocab_size=V)
        else:
            lp, h = naive_logprob_entropy(x, targets % v_local)
        ((lp * g_lp).sum() + (h * g_h).sum()).backward()
        return lp.detach(), h.detach()

    def measure(x: torch.Tensor, fused: bool) -> tuple[float, Optional[int], tuple]:
        best, extra = float("inf"), None
        out = run(x, fused)  # warm-up: lazy initialisation, kernel selection, allocator
        for _ in range(s.logprob_repeats):
            x.grad, out = None, None  # the gradient is part of what is measured
            free_device_memory()
            with PeakMemory(dev) as mem:
                sync()
                t0 = time.perf_counter()
                out = run(x, fused)
                sync()
                best = min(best, time.perf_counter() - t0)
            if mem.extra is not None:
                extra = mem.extra if extra is None else max(extra, mem.extra)
        return best, extra, out

    with cpu_kernels():
        fused_s, fused_extra, (lp, ent) = measure(logits, True)
        try:
            naive_s, naive_extra, _ = measure(logits, False)
            naive_oom = False
        except torch.cuda.OutOfMemoryError:
            naive_s, naive_extra, naive_oom = float("nan"), None, True
        logits.grad = None
        free_device_memory()
        # values: the first k tokens over the full vocabulary, against the naive op
        k = min(256, T)
        head = logits.detach()[:k].contiguous()
        full = torch.cat(cx.all_gather(head, tp_group), dim=1) if tp > 1 else head
        ref_lp, ref_ent = naive_logprob_entropy(full, targets[:k], vocab_size=V)
    err = max(float((lp[:k] - ref_lp).abs().max()), float((ent[:k] - ref_ent).abs().max()))
    del logits, head, full
    free_device_memory()
    frac = (lambda b: None if b is None else b / logits_bytes)
    numbers = {"tokens": T, "vocab": V, "tp": tp, "dtype": dtype_name, "logits_mib": logits_bytes / MIB,
               "fused_seconds": fused_s, "naive_seconds": naive_s, "fused_extra_over_logits": frac(fused_extra),
               "naive_extra_over_logits": frac(naive_extra), "naive_out_of_memory": naive_oom,
               "time_ratio_fused_over_naive": fused_s / naive_s if not naive_oom else None, "max_abs_error": err}
    if err > 1e-3:
        raise RuntimeError(f"fused and naive log-prob/entropy differ by {err:.3g} (limit 1e-3) at "
                           f"[{T}, {V}/{tp}] {dtype_name}")

    def mem_text(x):
        return "n/a" if x is None else f"{x:.2f}x"

    naive_text = ("naive: out of memory" if naive_oom else
                  f"naive {mem_text(frac(naive_extra))}, {fmt_seconds(naive_s)}; "
                  f"time {fused_s / naive_s:.2f}x naive")
    detail = (f"[{T} x {V}/{tp}] {dtype_name} fwd+bwd, extra memory over the logits incl. their gradient: "
              f"fused {mem_text(frac(fused_extra))}, {fmt_seconds(fused_s)}; {naive_text}; max |error| {err:.1e}")
    yield Result("4", "logprob op", PASS, detail, numbers)

