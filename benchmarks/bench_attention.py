"""Packed attention on the CPU path: per segment (models/local_spec.py) vs the dense [T, T] block-causal mask.

``run() -> dict``: for packed rows of T tokens made of toy-like sequences (lengths 40-96: prompt + response of the
demo), forward + backward of one attention core with the toy's heads (4 query heads, 2 KV heads, head_dim 32,
fp32, one thread): seconds (best of ``repeats``) and the peak memory beyond the inputs (VmHWM in a fresh
subprocess per case). ``dense`` is what Megatron's local DotProductAttention computes for a packed row (scores
[heads, T, T], a boolean mask, softmax, probabilities kept for backward); ``segments`` is PackedSegmentAttention
(torch SDPA per sequence, THD). Dense stops at 8192 tokens (its scores alone are 1 GiB there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, random, sys, time
import torch
torch.set_num_threads(1)
variant, T, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from types import SimpleNamespace
from megatron.core.packed_seq_params import PackedSeqParams
from megatron_srft.models.local_spec import PackedSegmentAttention
from megatron_srft.training.batch import block_causal_mask

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

rng = random.Random(0)
lens = []
while sum(lens) < T:
    lens.append(min(rng.randint(40, 96), T - sum(lens)))
cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
nq, nkv, d = 4, 2, 32
q = torch.randn(T, nq, d, requires_grad=True)
k = torch.randn(T, nkv, d, requires_grad=True)
v = torch.randn(T, nkv, d, requires_grad=True)
g = torch.randn(T, nq * d)
scale = d ** -0.5
if variant == "dense":
    mask = block_causal_mask(cu, T)[0, 0]  # True = masked

    def attend():
        kk, vv = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        s = torch.baddbmm(torch.empty(nq, T, T), q.transpose(0, 1), kk.transpose(0, 1).transpose(1, 2), beta=0.0,
                          alpha=scale)
        p = torch.softmax(s.masked_fill(mask, -10000.0), dim=-1)
        return torch.bmm(p, vv.transpose(0, 1)).transpose(0, 1).reshape(T, nq * d)
else:
    cfg = SimpleNamespace(num_attention_heads=nq, num_query_groups=nkv, kv_channels=d, attention_dropout=0.0,
                          apply_query_key_layer_scaling=False, sequence_parallel=False, context_parallel_size=1)
    core = PackedSegmentAttention(cfg, 1, pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                             max_seqlen_kv=max(lens))

    def attend():
        return core(q, k, v, None, packed_seq_params=params)

base = hwm()
best = float("inf")
for _ in range(repeats):
    t0 = time.perf_counter()
    attend().backward(g)
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"seconds": best, "peak_extra_bytes": hwm() - base, "num_segments": len(lens)}))
"""


def _case(variant: str, tokens: int, repeats: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, variant, str(tokens), str(repeats)], capture_output=True,
                          text=True, env=env, cwd=root, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(tokens=(1024, 4096, 8192, 16384), dense_max: int = 8192, repeats: int = 3) -> dict:
    out = {}
    for t in tokens:
        for variant in ("segments", "dense"):
            if variant == "dense" and t > dense_max:
                continue
            r = _case(variant, t, repeats)
            out[f"attention/{variant}_T{t}_seconds"] = r["seconds"]
            out[f"attention/{variant}_T{t}_peak_extra_gb"] = r["peak_extra_bytes"] / 1e9
            out[f"attention/T{t}_num_segments"] = r["num_segments"]
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(), indent=1))
