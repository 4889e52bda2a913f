"""Check 6: step 3 on the Transformer Engine spec, 6a in bf16 and 6b in FP8 (the config's format and recipe),
and the FP8 speed-up. SKIPs without TE or a GPU; 6b also on a card that cannot run the recipe."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from .context import Context, skip_reason
from .measure import free_device_memory
from .results import PASS, SKIP, Result, Skip
from .train_step import prepare_model, time_training_step


def check_transformer_engine(ctx: Context) -> Iterator[Result]:
    """6a: step 3 on the TE spec in bf16; 6b: in FP8 (the config's format and recipe), and the speed-up."""
    reason = skip_reason("6", ctx.on_gpu, te=ctx.te_available)
    if reason:
        raise Skip(reason)
    base = ctx.cfg.model
    ctx.handle = None  # step 3's model is done with: free it for these builds
    free_device_memory()
    if ctx.arch is None:  # step 3 failed before reading the shapes
        prepare_model(ctx)
    bf16_cfg = dataclasses.replace(base, transformer_impl="transformer_engine", params_dtype="bf16", fp8=None,
                                   fp8_param=False)
    step3_is_te_bf16 = ctx.step3.get("spec") == "TE spec, bf16"
    if step3_is_te_bf16:
        bf16 = ctx.step3
    else:
        bf16, handle = time_training_step(ctx, bf16_cfg)
        del handle
        free_device_memory()
    yield Result("6a", "TE bf16 step", PASS,
                 f"{bf16['step_seconds']:.3g} s/step, {bf16['tokens_per_s_per_device']:,.0f} tokens/s/device"
                 + (" (= step 3)" if step3_is_te_bf16 else ""), bf16)
    fp8_cfg = dataclasses.replace(bf16_cfg, fp8=base.fp8 or "hybrid", fp8_recipe=base.fp8_recipe)
    reason = skip_reason("6b", ctx.on_gpu, te=ctx.te_available, capability=ctx.capability,
                         fp8_recipe=fp8_cfg.fp8_recipe)
    if reason:
        yield Result("6b", "TE FP8 step", SKIP, reason)
        return
    try:
        fp8, handle = time_training_step(ctx, fp8_cfg)
        del handle
    finally:
        free_device_memory()
    speedup = bf16["step_seconds"] / fp8["step_seconds"]
    fp8["speedup_over_bf16"] = speedup
    yield Result("6b", "TE FP8 step", PASS,
                 f"{fp8['step_seconds']:.3g} s/step, {fp8['tokens_per_s_per_device']:,.0f} tokens/s/device, "
                 f"{speedup:.2f}x the bf16 step ({fp8_cfg.fp8}, {fp8_cfg.fp8_recipe} recipe)", fp8)

