"""Colocated engines come and go inside one training process without taking the trainer's world with them."""

from tests.dist import run_ranks


def _two_engines_in_one_world(model_dir):
    import torch.distributed as dist

    from megatron_srft.distributed import groups as parallel
    from megatron_srft.config import ParallelConfig, RolloutConfig
    from megatron_srft.rollout.vllm_engine import VllmEngine

    parallel.init_distributed(ParallelConfig())
    out = []
    for _ in range(2):
        engine = VllmEngine(RolloutConfig(), model_dir, dtype="fp32", seed=0, max_model_len=64)
        comps = engine.generate([[5, 6, 7]], n=1, temperature=0.0, max_tokens=4)
        out.append(list(comps[0][0].token_ids))
        engine.close()
        assert dist.is_initialized(), "closing the engine destroyed the trainer's process group"
        t = __import__("torch").ones(1)
        dist.all_reduce(t)  # the world still works
    return out


def test_engine_close_keeps_the_training_world(tiny_qwen2):
    (first, second), = run_ranks(_two_engines_in_one_world, 1, str(tiny_qwen2))
    assert first == second and len(first) == 4
