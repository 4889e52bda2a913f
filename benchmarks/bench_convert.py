"""Conversion benchmark: a >= 1 GB Qwen2-architecture model (random bf16 weights written directly with
safetensors, one shard per layer), converted HF -> Megatron and back. Reports GB/s and peak RSS / model bytes
of each conversion process (each runs in its own process, measured with getrusage)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=32000, hidden_size=2048,
              intermediate_size=5632, num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4,
              max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
              hidden_act="silu", dtype="bfloat16")


def write_random_qwen2(out: Path, cfg: dict = CONFIG) -> int:
    """Write random bf16 weights shard by shard (never the whole model in memory). Returns the model bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rnd(v, h)}]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": rnd(h) + 1, p + "post_attention_layernorm.weight": rnd(h) + 1,
                       p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.q_proj.bias": rnd(q),
                       p + "self_attn.k_proj.weight": rnd(kv, h), p + "self_attn.k_proj.bias": rnd(kv),
                       p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.v_proj.bias": rnd(kv),
                       p + "self_attn.o_proj.weight": rnd(h, q), p + "mlp.gate_proj.weight": rnd(f, h),
                       p + "mlp.up_proj.weight": rnd(f, h), p + "mlp.down_proj.weight": rnd(h, f)})
    shards.append({"model.norm.weight": rnd(h) + 1, "lm_head.weight": rnd(v, h)})
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shards[k] = None  # free as we go
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return total


# Peak RSS from VmHWM: it belongs to the process image after exec. (ru_maxrss would not do: Linux carries it over
# exec from the forked parent, so it would count the benchmark process that generated the model.)
_HWM = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
_CHILD = ("import sys; from megatron_srft.cli import main; rc = main(sys.argv[1:]); "
          f"print('MAXRSS_KB', {_HWM}); sys.exit(rc)")
# The same interpreter with what a conversion imports and the 1-rank world it starts, converting nothing: the
# fixed cost that a small benchmark model makes look large (0.5 GB against 15 GB for a 7B model).
_BASELINE = ("import sys; import megatron_srft.checkpoint.convert, megatron.core.dist_checkpointing; "
             "from megatron_srft.distributed import groups as parallel; from megatron_srft.config import ParallelConfig; "
             f"parallel.init_distributed(ParallelConfig()); print('MAXRSS_KB', {_HWM})")


def _run_child(argv: list[str], code: str = _CHILD) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB")))
    return seconds, kb * 1024


def run() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        model_bytes = write_random_qwen2(work / "hf")
        t1, rss1 = _run_child(["convert", "hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mc")])
        t2, rss2 = _run_child(["convert", "mcore-to-hf", "--ckpt", str(work / "mc"), "--out", str(work / "back"),
                               "--max-shard-mb", "128"])
        _, base = _run_child([], _BASELINE)
        gb = model_bytes / 1e9
        return {
            "baseline_rss_gb": round(base / 1e9, 3),
            "hf_to_mcore_peak_rss_minus_baseline_over_model": round((rss1 - base) / model_bytes, 3),
            "mcore_to_hf_peak_rss_minus_baseline_over_model": round((rss2 - base) / model_bytes, 3),
            "model_gb": round(gb, 3),
            "hf_to_mcore_s": round(t1, 2), "hf_to_mcore_gb_per_s": round(gb / t1, 3),
            "hf_to_mcore_peak_rss_over_model": round(rss1 / model_bytes, 3),
            "mcore_to_hf_s": round(t2, 2), "mcore_to_hf_gb_per_s": round(gb / t2, 3),
            "mcore_to_hf_peak_rss_over_model": round(rss2 / model_bytes, 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
