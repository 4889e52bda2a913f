"""The check's calls into training/ and rollout/: every call of ``srft check`` into those packages is in this
module, so a change of their signatures is adapted here only."""

from __future__ import annotations

from ..algorithms.presets import resolve
from ..config import AlgorithmConfig
from ..models.arch import load_arch
from ..rollout.base import engine_class, resolve_dtype, resolve_engine_settings, sequential_seeds
from ..rollout.sync import sync_weights
from ..training.step import forward_logprobs, sync_parameters, train_minibatch


def _srft_settings():
    return resolve(AlgorithmConfig(preset="srft"))


def train_step(handle, optimizer, micro_batches, groups) -> dict:
    """One optimizer step of the SRFT objective through the Megatron loss adapter."""
    return train_minibatch(handle.chunks, optimizer, micro_batches, _srft_settings(), groups,
                           handle.arch.vocab_size)


def trainer_logprobs(handle, micro_batches, groups) -> list:
    """Per micro-batch (logprob [T], entropy [T]) under the trainer (forward only)."""
    return forward_logprobs(handle.chunks, micro_batches, groups, handle.arch.vocab_size)


def release_optimizer(handle) -> None:
    """Drop the references the loss adapter keeps to the optimizer (its fp32 master weights and Adam moments
    are then freed), keeping the model for checks 4-5."""
    handle.tf_config.grad_scale_func = None


def start_engine(cfg):
    """The rollout engine on the config (dummy weights: the first sync brings the trainer's), settings resolved
    by the one resolver the training run uses."""
    s = resolve_engine_settings(cfg.rollout, cfg.model.params_dtype, load_arch(cfg.model.path),
                                cfg.data.max_prompt_length + cfg.data.max_response_length)
    return engine_class(cfg.rollout.engine)(cfg.rollout, cfg.model.path, dtype=s.dtype, seed=s.seed,
                                            max_model_len=s.max_model_len, kv_cache_bytes=s.kv_cache_bytes,
                                            load_format="dummy")


def engine_dtype(cfg) -> str:
    return resolve_dtype(cfg.rollout.dtype, cfg.model.params_dtype)


def sync_engine_weights(handle, groups, engine, bucket_mb: int) -> dict:
    """Fresh parameters (overlapped param gather), then the trainer's weights into this rank's engine shard."""
    sync_parameters(handle.chunks)
    return sync_weights(handle.chunks, handle.arch, groups, engine, bucket_mb)


def generate_one_each(engine, prompts: list[list[int]], max_tokens: int, seed: int) -> list:
    """One sample per prompt at temperature 1: [num_prompts] Completions (token_ids, logprobs)."""
    out = engine.generate(prompts, n=1, temperature=1.0, max_tokens=max_tokens,
                          seeds=sequential_seeds(seed, len(prompts), 1))
    return [per[0] for per in out]

