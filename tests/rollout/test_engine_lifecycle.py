"""Colocated engines come and go inside one training process without taking the trainer's world with them, and
an engine closed while asleep is woken before vLLM releases it."""

from tests.dist import run_ranks


def _engines_closed_asleep_then_a_new_one(model_dir):
    import torch
    import torch.distributed as dist

    from megatron_srft.distributed import groups as parallel
    from megatron_srft.config import ParallelConfig, RolloutConfig
    from megatron_srft.rollout.vllm_engine import VllmEngine

    parallel.init_distributed(ParallelConfig())
    out, asleep_at_close, asleep_after_close = [], [], []
    # closed asleep at each level (the rollout service leaves the engine asleep after a step), then one more engine
    for level in (1, 2, "last"):
        engine = VllmEngine(RolloutConfig(), model_dir, dtype="fp32", seed=0, max_model_len=64)
        comps = engine.generate([[5, 6, 7]], n=1, temperature=0.0, max_tokens=4)
        out.append(list(comps[0][0].token_ids))
        if level == "last":
            engine.close()
            break
        llm = engine.llm
        engine.sleep(level)
        # vLLM's own state (its executor's sleeping tags, its scheduler's pause), not our bookkeeping
        asleep_at_close.append(llm.llm_engine.is_sleeping())
        engine.close()
        asleep_after_close.append(llm.llm_engine.is_sleeping())
        assert dist.is_initialized(), "closing the engine destroyed the trainer's process group"
        t = torch.ones(1)
        dist.all_reduce(t)  # the world still works
    return out, asleep_at_close, asleep_after_close


def test_engine_closed_asleep_is_woken_and_the_next_one_generates(tiny_qwen2):
    (out, asleep_at_close, asleep_after_close), = run_ranks(_engines_closed_asleep_then_a_new_one, 1,
                                                            str(tiny_qwen2))
    assert asleep_at_close == [True, True]  # vLLM itself was put to sleep (its CPU worker frees nothing)
    # On CUDA vLLM's allocator releases a sleeping allocation's memory a second time when the engine's tensors are
    # freed at shutdown (guarded on ROCm only): close() must have woken vLLM before shutting it down.
    assert asleep_after_close == [False, False]
    assert all(o == out[0] for o in out) and len(out[0]) == 4
