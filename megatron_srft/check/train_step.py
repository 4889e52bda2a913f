"""Check 3: one Megatron training step of the SRFT objective (our builder, training/step.py's adapter) on
synthetic sequences: 3a s/step, tokens/s/device and MFU against 1b's measured rate; 3b MFU against the card's
datasheet peak (perf.py). Also the model the checks build without --config (:func:`synthesize_model_dir`)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..checkpoint.convert import resolve_source
from ..distributed import collectives as cx
from ..distributed.layout import config_token_pad_multiple, resolve_micro_batch_tokens
from ..dtypes import dtype_name
from ..experiments.tiny import make_char_tokenizer, tiny_hf_config
from ..models.builder import build_model, build_optimizer
from ..perf import KNOWN_CARDS, datasheet_peak, mfu, model_flops
from ..training.batch import Sample, pack_micro_batches
from . import calls
from .context import GIB, Context, together
from .measure import PeakMemory, free_device_memory, sync
from .results import PASS, SKIP, Result, short_count

#: Qwen2.5 shapes built without --config (random weights), and the tiny CPU model.
MODEL_SHAPES = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         intermediate_size=4864, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6),
    # head_dim 32: the smallest vLLM's CPU attention kernel accepts
    "tiny": dict(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=256, tie_word_embeddings=True, max_position_embeddings=512),
}



def synthesize_model_dir(shape: str, out_dir: Path) -> Path:
    """A Qwen2 HF directory (config.json + a character tokenizer padded to the vocabulary), no weights."""
    kw = dict(MODEL_SHAPES[shape])
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_hf_config("qwen2", **kw).save_pretrained(out_dir)
    make_char_tokenizer(out_dir, vocab_size=kw["vocab_size"])
    return out_dir


def micro_batch_tokens(ctx: Context) -> int:
    """train.micro_batch_tokens as training resolves it on this device (null: distributed/layout.py)."""
    return resolve_micro_batch_tokens(ctx.cfg, ctx.arch, ctx.on_gpu)


def step_shape(ctx: Context) -> tuple[int, int, int]:
    """(prompt tokens, response tokens, sequences per micro-batch) of step 3's synthetic mini-batch."""
    cfg, arch = ctx.cfg, ctx.arch
    budget = micro_batch_tokens(ctx)
    seq = min(cfg.data.max_prompt_length + cfg.data.max_response_length, budget, arch.max_position_embeddings)
    prompt = max(1, min(cfg.data.max_prompt_length, seq // 4))
    return prompt, seq - prompt, max(1, budget // seq)


def step_samples(ctx: Context) -> list:
    """This DP rank's synthetic mini-batch: equal-length sequences (random ids), one demo per group of 8."""
    prompt, response, per_mb = step_shape(ctx)
    rng = random.Random(1000 + (ctx.groups.dp_rank if ctx.groups else 0))
    vocab = ctx.arch.vocab_size
    old = -math.log(vocab)  # a uniform policy's log-prob: what a random model gives
    samples = []
    for k in range(per_mb * ctx.sizes.num_micro_batches):
        samples.append(Sample(prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
                              response_ids=[rng.randrange(vocab) for _ in range(response)],
                              advantage=rng.choice([-1.0, 1.0]), is_demo=k % 8 == 0, group=k // 8,
                              reward=0.0, old_logprobs=[old] * response))
    return samples


def pack(ctx: Context, samples: list, mcfg, budget: Optional[int] = None) -> list:
    """Micro-batches for a model built from ``mcfg``, padded as training pads them (layout.py)."""
    return pack_micro_batches(samples, budget or micro_batch_tokens(ctx),
                              pad_to_multiple=config_token_pad_multiple(ctx.cfg.parallel, mcfg))


def spec_label(handle) -> str:
    tf = handle.tf_config
    spec = "TE spec" if getattr(tf, "transformer_impl", "local") == "transformer_engine" else "local spec"
    dtype = dtype_name(tf.params_dtype) or "?"
    if getattr(tf, "fp8", None):
        dtype = f"fp8 {tf.fp8}/{getattr(tf, 'fp8_recipe', '?')}"
    return f"{spec}, {dtype}"


def time_training_step(ctx: Context, mcfg) -> tuple[dict, Any]:
    """Build the model for ``mcfg`` on the config's layout, run warm-up + measured steps.

    Returns (numbers, handle); the slowest rank's mean step time is the step time. Every rank returns the same
    numbers (they are reduced over the world).
    """
    cfg, s, groups = ctx.cfg, ctx.sizes, ctx.groups

    def build():
        handle = build_model(ctx.arch, mcfg, cfg.parallel)
        return handle, build_optimizer(handle, cfg.optimizer, mcfg, cfg.parallel)

    handle, optimizer = together(build)
    samples = step_samples(ctx)
    mbs = pack(ctx, samples, mcfg)
    times, last = [], {}
    with PeakMemory(ctx.device) as mem:
        for i in range(s.warmup_steps + s.measured_steps):
            sync()
            t0 = time.perf_counter()
            last = calls.train_step(handle, optimizer, mbs, groups)
            sync()
            if i >= s.warmup_steps:
                times.append(time.perf_counter() - t0)
    if not math.isfinite(last.get("loss", float("nan"))):
        raise RuntimeError(f"the step's loss is {last.get('loss')}")
    calls.release_optimizer(handle)
    del optimizer
    free_device_memory()
    step_s = float(cx.all_reduce(torch.tensor([sum(times) / len(times)], dtype=torch.float64), "max")[0])
    dp = groups.dp_size
    tokens = sum(x.num_tokens for x in samples) * dp  # the whole world's trained tokens per step
    flops = model_flops(ctx.arch, [x.num_tokens for x in samples]) * dp
    peak = mem.peak if mem.peak is not None else -1
    peak = int(cx.all_reduce(torch.tensor([peak], dtype=torch.float64), "max")[0])
    numbers = {
        "step_seconds": step_s, "tokens_per_step": tokens, "tokens_per_s_per_device": tokens / step_s / groups.world_size,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops_per_device": flops / step_s / groups.world_size / 1e12,
        "peak_memory_gib": peak / GIB if peak >= 0 else None, "num_micro_batches": len(mbs),
        "sequence_tokens": samples[0].num_tokens, "spec": spec_label(handle), "loss": last.get("loss"),
        "grad_norm": last.get("grad_norm"), "params": ctx.arch.num_params(),
    }
    return numbers, handle


def prepare_model(ctx: Context) -> None:
    """The model's shapes from model.path (an HF directory, a converted or a training checkpoint)."""
    ctx.arch = resolve_source(ctx.cfg.model.path).arch


def check_train_step(ctx: Context) -> Iterator[Result]:
    """3a and 3b."""
    prepare_model(ctx)
    numbers, ctx.handle = time_training_step(ctx, ctx.cfg.model)
    ctx.step3 = numbers
    world = ctx.groups.world_size
    # the slowest device of the world bounds the step (a rank whose 1b failed contributes nothing)
    mine = ctx.matmul_tflops if ctx.matmul_tflops else math.inf
    measured = float(cx.all_reduce(torch.tensor([mine], dtype=torch.float64), "min")[0])
    measured = measured if math.isfinite(measured) else None
    flops = numbers["model_tflops_per_step"] * 1e12
    label = ctx.sizes.model_shape or Path(ctx.cfg.model.path).name
    mem = numbers["peak_memory_gib"]
    mem_text = "" if mem is None else (f"; peak {mem:.1f} GiB allocated" if ctx.on_gpu else f"; peak RSS {mem:.2f} GiB")
    detail = (f"{numbers['step_seconds']:.3g} s/step, {numbers['tokens_per_s_per_device']:,.0f} tokens/s/device")
    if measured:
        numbers["mfu_vs_measured"] = mfu(flops, numbers["step_seconds"], world, peak_tflops=measured)
        numbers["measured_matmul_tflops"] = measured
        detail += f", MFU {100 * numbers['mfu_vs_measured']:.1f}% of the measured {measured:,.3g} TFLOP/s"
    n_mb = numbers["num_micro_batches"]
    detail += (f" ({label}: {short_count(numbers['params'])} params; "
               f"{numbers['tokens_per_step'] // world:,} tokens/device"
               f" in {n_mb} micro-batch{'es' if n_mb > 1 else ''} of {numbers['sequence_tokens']}-token sequences; "
               f"{numbers['spec']}{mem_text})")
    yield Result("3a", "train step", PASS, detail, numbers)
    card = torch.cuda.get_device_name(ctx.device) if ctx.on_gpu else "cpu"
    sheet = datasheet_peak(card) if ctx.on_gpu else None
    if sheet is None:
        known = ", ".join(k[0] for k in KNOWN_CARDS)
        yield Result("3b", "MFU datasheet", SKIP, f"no datasheet peak for '{card}' (known: {known})")
    else:
        name, peak = sheet
        value = mfu(flops, numbers["step_seconds"], world, peak_tflops=peak)
        yield Result("3b", "MFU datasheet", PASS,
                     f"MFU {100 * value:.1f}% of {peak:,.0f} TFLOP/s ({name} dense bf16 datasheet peak)",
                     {"mfu_vs_datasheet": value, "datasheet_tflops": peak, "card": name})

