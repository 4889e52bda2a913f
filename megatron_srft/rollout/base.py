"""What every rollout engine provides, the table of engines, and the one resolver of an engine's settings.

A second engine (SGLang, an asynchronous server) is a new module implementing :class:`Engine` plus one line in
:data:`ENGINES`; the rollout service (rollout/service.py) and the training loop do not change.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol

import torch

from ..distributed.layout import resolve_cpu_kv_cache_bytes
from ..dtypes import DTYPES

#: rollout.engine name -> "module:class" implementing :class:`Engine` (imported only when used).
ENGINES: dict[str, str] = {
    "vllm": "megatron_srft.rollout.vllm_engine:VllmEngine",
}


@dataclass
class Completion:
    """One sampled continuation.

    token_ids: [T] generated token ids (stop token included when the model emitted it).
    logprobs: [T] log-prob of each generated token under the raw policy (temperature 1), as the engine computed it.
    finish_reason: "stop" (EOS / stop token / stop string) or "length" (hit max_tokens / max_model_len).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class Engine(Protocol):
    """A generation engine colocated with the trainer. Every rank of an engine (rollout TP > 1) calls every method
    with the same arguments (SPMD); each rank holds one engine object."""

    #: the dtype the engine holds its weights in; the weight sync (rollout/sync.py) sends tensors in it
    weight_dtype: torch.dtype

    def generate(self, prompt_token_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seeds: Optional[list[int]] = None, stop_token_ids: Optional[list[int]] = None,
                 stop: Optional[list[str]] = None) -> list[list[Completion]]:
        """``n`` completions per prompt ([num_prompts][n]); prompt i's sample j uses seed ``seeds[i] + j``; a
        response ends after the token that completes a ``stop`` string."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load ``(hf_name, full tensor)`` pairs covering the whole model (consumed lazily); returns the count."""

    def sleep(self, level: int) -> None:
        """Release device memory: 1 = offload weights, drop the KV cache; 2 = drop both."""

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocate ``tags`` ("weights", "kv_cache"; None = all)."""

    def close(self) -> None:
        """Shut down and release everything."""


def engine_class(name: str):
    """The :class:`Engine` implementation registered as ``name`` in :data:`ENGINES`."""
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def sequential_seeds(seed: Optional[int], num_prompts: int, n: int) -> Optional[list[int]]:
    """Seeds for one call: prompt i gets ``seed + i * n`` (its samples ``+ j``), so every sample has its own stream."""
    return None if seed is None else [seed + i * n for i in range(num_prompts)]


@dataclass(frozen=True)
class EngineSettings:
    """An engine's dtype, seed and context length with every ``auto`` / null resolved."""

    dtype: str  # fp32 | bf16 | fp16
    seed: int
    max_model_len: int
    kv_cache_bytes: Optional[int] = None  # CPU KV cache per engine rank; None = the engine's default (GPU: vLLM's)


def resolve_dtype(rollout_dtype: str, params_dtype: str) -> str:
    """``rollout.dtype`` with ``auto`` resolved: the model's params dtype on GPU, fp32 on CPU (vLLM's CPU kernels
    are exact and fastest in fp32, and the engine/trainer mismatch stays at fp32 noise)."""
    if rollout_dtype != "auto":
        return rollout_dtype
    return params_dtype if torch.cuda.is_available() else "fp32"


def resolve_engine_settings(rollout_cfg, params_dtype: str, arch, needed_len: int,
                            num_seqs: int = 256) -> EngineSettings:
    """The one resolver of an engine's settings (training, `srft eval`, `srft generate`, `srft check`).

    ``arch``: the model's ArchSpec. ``needed_len``: prompt + response tokens the caller needs;
    ``rollout.max_model_len`` null takes it, capped by the model's positions. ``num_seqs``: sequences generated at
    once (training: distributed/layout.py ``rollout_sequences_per_engine``); on CPU a null
    ``rollout.cpu_kvcache_space_gib`` sizes the KV cache for them (``cpu_kv_cache_bytes``).
    """
    max_len = int(rollout_cfg.max_model_len or min(int(needed_len), int(arch.max_position_embeddings)))
    dtype = resolve_dtype(rollout_cfg.dtype, params_dtype)
    kv = None if torch.cuda.is_available() else resolve_cpu_kv_cache_bytes(rollout_cfg, arch, DTYPES[dtype].bytes,
                                                                           max_len, num_seqs)
    return EngineSettings(dtype=dtype, seed=int(rollout_cfg.seed), max_model_len=max_len, kv_cache_bytes=kv)
