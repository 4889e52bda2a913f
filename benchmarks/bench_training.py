"""Sequence packing vs one padded row per sequence: token efficiency, packing cost, and train-step throughput.

``run() -> dict`` measures
  - on a synthetic mini-batch with a long-tailed response-length distribution (reasoning-like: most responses
    short, a few near the limit): the fraction of computed positions that are real tokens, packed and padded,
    the number of micro-batches, and the seconds ``pack_micro_batches`` takes;
  - in a subprocess (Megatron's CPU layer stays out of this process), one ``train_minibatch`` step of the SRFT
    loss on a tiny Qwen2 (hidden 128, 2 layers, fp32, world size 1), packed and padded: seconds per step
    (best of ``repeats``) and real tokens per second.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, tempfile, time
import torch
from megatron_srft.config import AlgorithmConfig
from megatron_srft.algorithms.presets import resolve
from megatron_srft.training.batch import Sample, pack_micro_batches
from megatron_srft.training.step import train_minibatch
from tests.training.harness import make_model_dir, setup_rank

num_samples, budget, repeats, seed = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as d:
    hf = make_model_dir(d)
    groups, handle, opt, arch = setup_rank(hf, 1, 1)
    import random
    rng = random.Random(seed)
    samples = []
    for k in range(num_samples):
        R = min(int(rng.lognormvariate(3.5, 0.9)) + 1, 400)
        samples.append(Sample([rng.randint(4, 100) for _ in range(rng.randint(10, 40))],
                              [rng.randint(4, 100) for _ in range(R)], rng.choice([-1.0, 1.0]), k % 4 == 0,
                              k // 4, 0.0, old_logprobs=[-4.7] * R))
    settings = resolve(AlgorithmConfig(preset="srft"))
    out = {}
    for packing in (True, False):
        mbs = pack_micro_batches(samples, budget, packing=packing)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            train_minibatch(handle.chunks, opt, mbs, settings, groups, arch.vocab_size)
            best = min(best, time.perf_counter() - t0)
        real = sum(s.num_tokens for s in samples)
        out["packed" if packing else "padded"] = {"seconds": best, "tokens_per_s": real / best,
                                                  "num_micro_batches": len(mbs)}
print(json.dumps(out))
"""


def _synthetic_lengths(num_samples: int, seed: int, max_response: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(50, 300), min(int(rng.lognormvariate(6.0, 1.0)) + 1, max_response))
            for _ in range(num_samples)]


def _packing_numbers(num_samples: int, budget: int, max_response: int, seed: int) -> dict:
    from megatron_srft.training.batch import Sample, pack_micro_batches

    samples = [Sample([5] * p, [6] * r, 0.0, False, 0, 0.0) for p, r in
               _synthetic_lengths(num_samples, seed, max_response)]
    real = sum(s.num_tokens for s in samples)
    t0 = time.perf_counter()
    packed = pack_micro_batches(samples, budget)
    pack_s = time.perf_counter() - t0
    padded = pack_micro_batches(samples, budget, packing=False)
    return {
        "training/pack_num_samples": num_samples,
        "training/pack_budget_tokens": budget,
        "training/packed_real_token_frac": real / sum(mb.num_tokens for mb in packed),
        "training/padded_real_token_frac": real / sum(mb.num_tokens for mb in padded),
        "training/packed_num_micro_batches": len(packed),
        "training/padded_num_micro_batches": len(padded),
        "training/pack_seconds": pack_s,
    }


def run(num_samples: int = 512, budget: int = 16384, max_response: int = 8192, step_samples: int = 32,
        step_budget: int = 1024, repeats: int = 2, seed: int = 0) -> dict:
    out = _packing_numbers(num_samples, budget, max_response, seed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(step_samples), str(step_budget), str(repeats),
                           str(seed)], capture_output=True, text=True, env=env, cwd=root, check=True)
    step = json.loads(proc.stdout.strip().splitlines()[-1])
    for layout in ("packed", "padded"):
        for k, v in step[layout].items():
            out[f"training/step_{layout}_{k}"] = v
    out["training/step_speedup_packed_over_padded"] = step["padded"]["seconds"] / step["packed"]["seconds"]
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(), indent=2))
