"""Check 5, the rollout engine beside the trainer: 5a engine start and generation throughput, 5b the weight sync
of step 3's model into the engine against the device memcpy rate, 5c engine vs trainer log-probs of the
engine's samples (:data:`MISMATCH_LIMIT`)."""

from __future__ import annotations

import random
import time
from typing import Iterator

import torch

from ..algorithms.mismatch import mismatch_stats
from ..distributed import collectives as cx
from ..training.batch import Sample, per_sequence_values
from . import calls
from .context import Context, skip_reason, together
from .device import memcpy_gb_per_s
from .measure import free_device_memory, sync
from .results import FAIL, PASS, Result, Skip
from .train_step import micro_batch_tokens, pack

#: Engine/trainer log-prob mismatch that passes: mean |logp_engine - logp_trainer| over the sampled tokens.
#: Measured on CPU (tiny model, fp32): 1.8e-7 after the sync, 0.165 when the sync is skipped (the engine keeps its
#: dummy weights). The bf16 limit is a loose bound until a GPU run measures the usual bf16 mismatch.
MISMATCH_LIMIT = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}


def mismatch_limit(engine_dtype: str, trainer_dtype: str) -> float:
    """The limit of the less precise side: an fp32 engine beside a bf16 trainer differs by bf16 rounding."""
    return max(MISMATCH_LIMIT.get(engine_dtype, 0.1), MISMATCH_LIMIT.get(trainer_dtype, 0.1))


def check_vllm(ctx: Context) -> Iterator[Result]:
    """5a engine start + generation, 5b weight sync vs memcpy, 5c engine/trainer mismatch.

    Every rank builds its engine on the config's rollout section, syncs step 3's model into it, and generates
    the same prompts (rollout TP > 1 needs that). Numbers are rank 0's; a FAIL on any rank fails the line.
    """
    reason = skip_reason("5", ctx.on_gpu, vllm=ctx.vllm_available)
    if reason:
        raise Skip(reason)
    if ctx.handle is None:
        raise RuntimeError("needs step 3's model, which was not built")
    s, cfg = ctx.sizes, ctx.cfg
    box: dict = {}
    try:
        t0 = time.perf_counter()
        together(lambda: box.update(engine=calls.start_engine(cfg)))
        engine = box["engine"]
        start_s = time.perf_counter() - t0
        bucket_mb = cfg.rollout.sync_bucket_mb
        # dummy weights -> the trainer's (every rank: the export is a collective over TP/PP)
        first = together(lambda: calls.sync_engine_weights(ctx.handle, ctx.groups, engine, bucket_mb))
        rng = random.Random(5)  # the same prompts on every rank (rollout TP > 1 needs them equal)
        max_len = engine.max_model_len
        max_tokens = min(s.gen_max_tokens, max_len // 2)
        p_len = min(s.gen_prompt_tokens, max_len - max_tokens)
        prompts = [[rng.randrange(ctx.arch.vocab_size) for _ in range(p_len)] for _ in range(s.gen_prompts)]

        def generate():
            calls.generate_one_each(engine, prompts[:1], 2, seed=1)  # warm-up
            sync()
            t0 = time.perf_counter()
            out = calls.generate_one_each(engine, prompts, max_tokens, seed=0)
            sync()
            if not any(c.token_ids for c in out):
                raise RuntimeError("the engine generated no tokens")
            return out, time.perf_counter() - t0

        completions, gen_s = together(generate)
        num_gen = sum(len(c.token_ids) for c in completions)
        yield Result(
            "5a", "vllm engine", PASS,
            f"started in {start_s:.1f} s; {num_gen / gen_s:,.0f} tokens/s generating ({s.gen_prompts} prompts of "
            f"{p_len} tokens, up to {max_tokens} new; one engine per rank, rollout TP "
            f"{cfg.rollout.tensor_parallel_size})",
            {"startup_seconds": start_s, "generated_tokens": num_gen, "generate_seconds": gen_s,
             "tokens_per_s_per_engine": num_gen / gen_s})

        # the steady state: a second sync (the first one also pays the engine's one-time set-up)
        stats = first if ctx.args.quick else together(
            lambda: calls.sync_engine_weights(ctx.handle, ctx.groups, engine, bucket_mb))
        memcpy = memcpy_gb_per_s(ctx)
        gbps = stats["bytes"] / stats["seconds"] / 1e9
        yield Result(
            "5b", "weight sync", PASS,
            f"{gbps:,.3g} GB/s = {gbps / memcpy:.2g}x the device memcpy ({memcpy:,.3g} GB/s); "
            f"{stats['bytes'] / 1e9:,.3g} GB in {stats['num_buckets']} bucket(s) of <= {bucket_mb} MiB"
            + (" (first sync)" if ctx.args.quick else ""),
            {"gb_per_s": gbps, "memcpy_gb_per_s": memcpy, "fraction_of_memcpy": gbps / memcpy,
             "bytes": stats["bytes"], "seconds": stats["seconds"], "num_buckets": stats["num_buckets"],
             "first_sync_seconds": first["seconds"]})

        def mismatch():
            kept = [(p, c) for p, c in zip(prompts, completions) if c.token_ids]
            samples = [Sample(prompt_ids=p, response_ids=list(c.token_ids), advantage=0.0, is_demo=False,
                              group=i, reward=0.0) for i, (p, c) in enumerate(kept)]
            budget = max(micro_batch_tokens(ctx), max(x.num_tokens for x in samples))
            mbs = pack(ctx, samples, ctx.cfg.model, budget=budget)
            per_mb = calls.trainer_logprobs(ctx.handle, mbs, ctx.groups)
            trainer = torch.cat([t.double() for t in per_sequence_values(mbs, [lp for lp, _ in per_mb],
                                                                         len(samples))])
            eng = torch.cat([torch.tensor(c.logprobs, dtype=torch.float64) for _, c in kept])
            return mismatch_stats(eng, trainer, torch.ones_like(eng, dtype=torch.bool))

        st = together(mismatch)
        dtype = calls.engine_dtype(cfg)
        limit = mismatch_limit(dtype, cfg.model.params_dtype)
        worst = float(cx.all_reduce(torch.tensor([st["abs_diff_mean"]], dtype=torch.float64), "max")[0])
        text = (f"{dtype} engine vs {cfg.model.params_dtype} trainer: mean |d logp| {st['abs_diff_mean']:.2g}, "
                f"max {st['abs_diff_max']:.2g}, k3 KL {st['kl_k3']:.2g} over {int(st['num_tokens'])} sampled tokens")
        numbers = {"engine_dtype": dtype, "trainer_dtype": cfg.model.params_dtype, "limit": limit,
                   "abs_diff_mean_max_over_ranks": worst, **{k: float(v) for k, v in st.items()}}
        status = PASS if worst <= limit else FAIL
        if status == FAIL:
            text = f"mean |d logp| {worst:.3g} > {limit:g} (did the sync reach the engine?); " + text
        yield Result("5c", "mismatch", status, text, numbers)
    finally:
        if box.get("engine") is not None:
            box["engine"].close()
        free_device_memory()

