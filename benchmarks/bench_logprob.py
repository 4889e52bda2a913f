"""Fused vocab-parallel log-prob/entropy vs the naive full-vocab computation, forward + backward, on CPU (TP=1).

``run() -> dict`` measures, each variant in a fresh subprocess (so one's memory cannot hide the other's):
  - peak extra memory beyond the logits, as a fraction of the logits' size: (peak RSS during forward+backward
    - RSS with the logits allocated) / logits bytes. This includes the logits' gradient (1.0 of the logits'
    size for fp32), which both variants must produce;
  - seconds per forward+backward (best of ``repeats``), and the ratio fused / naive.
Peak RSS (``VmHWM``, which starts afresh at exec, unlike ``ru_maxrss``) is used instead of tracemalloc, which does
not see torch's allocations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import torch
from megatron_srft.ops.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

mode, T, V, chunk, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
logits = torch.randn(T, V, generator=g).requires_grad_()
targets = torch.randint(0, V, (T,), generator=g)
g_lp, g_h = torch.randn(T, generator=g), torch.randn(T, generator=g)
base = rss_bytes()
times = []
for _ in range(repeats):
    logits.grad = None
    t0 = time.perf_counter()
    if mode == "fused":
        lp, h = vocab_parallel_logprob_entropy(logits, targets, chunk_tokens=chunk)
    else:
        lp, h = naive_logprob_entropy(logits, targets)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    times.append(time.perf_counter() - t0)
    del lp, h
peak = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) * 1024
print(json.dumps({"seconds": min(times), "peak_extra_bytes": max(0, peak - base),
                  "logits_bytes": logits.numel() * logits.element_size()}))
"""


def _measure(mode: str, num_tokens: int, vocab: int, chunk_tokens: int, repeats: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(num_tokens), str(vocab), str(chunk_tokens),
                          str(repeats), str(threads)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(num_tokens: int = 8192, vocab: int = 32768, chunk_sizes: tuple = (1024, 256), repeats: int = 2,
        threads: int = 1) -> dict:
    """Fused (at each chunk size) vs naive at [num_tokens, vocab] fp32, TP=1, forward + backward.

    ``*_peak_extra_frac`` counts everything beyond the logits, their gradient included (1.0 for fp32);
    ``*_beyond_grad_frac`` subtracts that unavoidable gradient: the op's own working memory.
    """
    naive = _measure("naive", num_tokens, vocab, 0, repeats, threads)
    size = naive["logits_bytes"]
    out = {"logprob/num_tokens": num_tokens, "logprob/vocab": vocab, "logprob/threads": threads,
           "logprob/logits_mib": size / 2**20,
           "logprob/naive_peak_extra_frac": naive["peak_extra_bytes"] / size,
           "logprob/naive_beyond_grad_frac": naive["peak_extra_bytes"] / size - 1.0,
           "logprob/naive_seconds": naive["seconds"]}
    for chunk in chunk_sizes:
        fused = _measure("fused", num_tokens, vocab, chunk, repeats, threads)
        tag = f"logprob/fused_chunk{chunk}"
        out[f"{tag}_peak_extra_frac"] = fused["peak_extra_bytes"] / size
        out[f"{tag}_beyond_grad_frac"] = fused["peak_extra_bytes"] / size - 1.0
        out[f"{tag}_seconds"] = fused["seconds"]
        out[f"{tag}_time_ratio_over_naive"] = fused["seconds"] / naive["seconds"]
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(), indent=2))
