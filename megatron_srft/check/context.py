"""What the checks of one run share: the sizes they allocate (:class:`Sizes`), this rank's state
(:class:`Context`), running a piece on every rank (:func:`together`), and when a check does not apply here
(:func:`skip_reason`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..distributed import collectives as cx
from ..distributed.layout import fp8_unsupported_reason
from .results import PeerFailed

GIB = 1024 ** 3
MIB = 1024 ** 2


@dataclass
class Sizes:
    """Everything the checks allocate or repeat, chosen once from the device, --quick and the config."""

    matmul_dtype: torch.dtype
    matmul_sizes: tuple[int, ...]
    h2d_bytes: int
    memcpy_bytes: int
    allreduce_bytes: int
    allreduce_iters: int
    warmup_steps: int
    measured_steps: int
    num_micro_batches: int
    logprob_tokens: int
    logprob_vocab: int
    logprob_dtype: torch.dtype
    logprob_repeats: int
    gen_prompts: int
    gen_prompt_tokens: int
    gen_max_tokens: int
    model_shape: Optional[str] = None  # key of MODEL_SHAPES when no --config


def choose_sizes(on_gpu: bool, quick: bool, pp_size: int) -> Sizes:
    if on_gpu:
        return Sizes(
            matmul_dtype=torch.bfloat16, matmul_sizes=(4096, 8192) if quick else (4096, 8192, 16384),
            h2d_bytes=(256 if quick else 1024) * MIB, memcpy_bytes=(256 if quick else 1024) * MIB,
            allreduce_bytes=(64 if quick else 256) * MIB, allreduce_iters=10 if quick else 20,
            warmup_steps=1, measured_steps=1 if quick else 3, num_micro_batches=max(pp_size, 2 if quick else 4),
            logprob_tokens=16384, logprob_vocab=152064, logprob_dtype=torch.bfloat16,
            logprob_repeats=2 if quick else 3,
            gen_prompts=16 if quick else 64, gen_prompt_tokens=128, gen_max_tokens=64 if quick else 256,
        )
    return Sizes(
        matmul_dtype=torch.float32, matmul_sizes=(256, 512) if quick else (256, 512, 1024),
        h2d_bytes=0, memcpy_bytes=(64 if quick else 256) * MIB,
        allreduce_bytes=(4 if quick else 16) * MIB, allreduce_iters=3 if quick else 5,
        warmup_steps=1, measured_steps=1 if quick else 2, num_micro_batches=max(pp_size, 1 if quick else 2),
        logprob_tokens=1024 if quick else 2048, logprob_vocab=8192 if quick else 16384,
        logprob_dtype=torch.float32, logprob_repeats=1 if quick else 2,
        gen_prompts=4, gen_prompt_tokens=12, gen_max_tokens=8 if quick else 16,
    )


@dataclass
class Context:
    """State shared by the checks of one run (this rank's view)."""

    args: argparse.Namespace
    cfg: Any  # SRFTConfig: the user's, or one built for the synthesized model
    sizes: Sizes
    on_gpu: bool
    device: torch.device
    workdir: Path
    rank: int = 0
    world_size: int = 1
    groups: Any = None  # ParallelGroups once the world is up
    world_error: Optional[str] = None
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    matmul_tflops: Optional[float] = None  # this device's measured rate (min over ranks once gathered)
    te_available: bool = False
    vllm_available: bool = False
    capability: Optional[tuple[int, int]] = None  # CUDA compute capability of this rank's GPU
    handle: Any = None  # step 3's model (ModelHandle), kept for checks 4-5
    arch: Any = None
    step3: dict = field(default_factory=dict)  # step 3's numbers, reused by check 6
    results: list = field(default_factory=list)

    @property
    def is_printer(self) -> bool:
        return self.rank == 0


def together(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; when it raises on any rank, raise on every rank (:class:`PeerFailed` where it
    did not), so that no rank walks on into a collective that the failed rank never joins."""
    error: Optional[BaseException] = None
    out = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if cx.agree(error is not None):
        raise error if error is not None else PeerFailed("failed on another rank")
    return out

def skip_reason(check_id: str, on_gpu: bool, te: bool = False, vllm: bool = True,
                capability: Optional[tuple[int, int]] = None, fp8_recipe: str = "delayed") -> Optional[str]:
    """Why a check that needs a GPU, Transformer Engine or vLLM does not run here (its SKIP line), None when it
    runs: 1c needs CUDA; 5 vLLM; 6 CUDA and TE; 6b also a card that runs the FP8 recipe (the rule training's
    layout validation applies: layout.fp8_unsupported_reason)."""
    if check_id == "1c" and not on_gpu:
        return "no CUDA device"
    if check_id == "5" and not vllm:
        return "vLLM not importable"
    if check_id in ("6", "6b") and not (on_gpu and te):
        return "Transformer Engine needs a CUDA GPU" if not on_gpu else "Transformer Engine not importable"
    if check_id == "6b":
        reason = fp8_unsupported_reason(fp8_recipe, capability)
        return None if reason is None else f"FP8 '{fp8_recipe}' recipe: {reason}"
    return None

