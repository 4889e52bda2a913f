"""GPU tier: the vLLM engine on CUDA (skipped without vLLM; the whole tier is skipped, and counted, without CUDA).

The GPU memory dance of a training step, on a real engine: generate, sleep at level 2 (weights and KV cache
released: free GPU memory grows), wake the weights, sync the trainer's weights into them (rollout/sync.py, from a
Megatron model built from the same HF directory), wake the KV cache, generate again: the same greedy tokens, and
the engine's log-probs of them agree with the trainer's within the bf16 bound.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.dist import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not importable")]


def _sleep_wake_sync(hf_dir: str) -> dict:
    from megatron_srft.config import ModelConfig, ParallelConfig, RolloutConfig
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_model
    from megatron_srft.models.mapping import load_hf_into_model
    from megatron_srft.rollout.sync import sync_weights
    from megatron_srft.rollout.vllm_engine import VllmEngine
    from megatron_srft.training.batch import Sample, pack_micro_batches, per_sequence_values
    from megatron_srft.training.step import forward_logprobs

    pcfg = ParallelConfig()
    groups = init_distributed(pcfg, seed=0)
    arch = load_arch(hf_dir)
    handle = build_model(arch, ModelConfig(params_dtype="bf16", transformer_impl="local",
                                           make_vocab_size_divisible_by=64), pcfg)
    load_hf_into_model(handle.chunks, arch, hf_dir, groups)
    engine = VllmEngine(RolloutConfig(sleep_level=2, gpu_memory_utilization=0.3), hf_dir, dtype="bf16", seed=0,
                        max_model_len=64)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    first = [c[0] for c in engine.generate(prompts, n=1, temperature=0.0, max_tokens=8)]
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep(2)
    free_asleep = torch.cuda.mem_get_info()[0]
    engine.wake_up(["weights"])
    stats = sync_weights(handle.chunks, arch, groups, engine, 16)
    engine.wake_up(["kv_cache"])
    second = [c[0] for c in engine.generate(prompts, n=1, temperature=0.0, max_tokens=8)]
    samples = [Sample(prompt_ids=p, response_ids=list(c.token_ids), advantage=0.0, is_demo=False, group=i,
                      reward=0.0) for i, (p, c) in enumerate(zip(prompts, second))]
    mbs = pack_micro_batches(samples, 256)
    per_mb = forward_logprobs(handle.chunks, mbs, groups, arch.vocab_size)
    trainer = torch.cat(per_sequence_values(mbs, [lp for lp, _ in per_mb], len(samples))).double()
    eng = torch.cat([torch.tensor(c.logprobs, dtype=torch.float64) for c in second])
    engine.close()
    return {"first": [list(c.token_ids) for c in first], "second": [list(c.token_ids) for c in second],
            "freed": free_asleep - free_awake, "sync_bytes": stats["bytes"],
            "mismatch": float((eng - trainer).abs().mean())}


def test_sleep_wake_and_weight_sync_on_cuda(tiny_qwen2):
    from megatron_srft.check.vllm_engine import MISMATCH_LIMIT

    (res,) = run_ranks(_sleep_wake_sync, 1, str(tiny_qwen2))
    assert res["freed"] > 0, res  # level 2 released the weights and the KV cache
    assert res["sync_bytes"] > 0
    assert res["second"] == res["first"], res  # the synced weights are the ones the engine loaded
    assert res["mismatch"] <= MISMATCH_LIMIT["bf16"], res
