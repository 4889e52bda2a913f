"""GPU tier: training on CUDA. Runs only where CUDA is present (`make test-gpu`); skipped, and counted, on CPU.

- the toy SFT run on NCCL (2 GPUs where present, else 1 rank): 2 steps with a checkpoint each, then a resume that
  reproduces step 2 (no vLLM needed); the shipped configs' twins on NCCL (they generate: skipped without vLLM);
- bf16 against fp32: the same weights' log-probs within :data:`BF16_BOUND`;
- one step on the Transformer Engine spec (skipped without TE), and one in FP8 for every recipe this card runs
  (layout.FP8_RECIPES; skipped without TE, each recipe the card cannot run skipped with the reason).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from megatron_srft.distributed.layout import FP8_RECIPES
from tests.dist import run_ranks

pytestmark = pytest.mark.gpu

#: bf16 vs fp32 log-probs of the same weights on the same tokens (the harness's tiny model): mean and max |d logp|.
#: About 10x what the CPU measured for this test's model and tokens (1.2e-3 mean, 4.7e-3 max, local spec); no GPU
#: run has measured it yet.
BF16_BOUND = {"mean": 0.01, "max": 0.05}
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def gpu_world() -> int:
    """Ranks for a multi-rank test: 2 GPUs where present, else 1."""
    return max(1, min(2, torch.cuda.device_count()))


# ------------------------------------------------------------------------------------------------- toy runs


def _train_twice(overrides: list[str]):
    """Train 2 steps, then resume from step 1 and train step 2 again; (uninterrupted, resumed) step-2 metrics."""
    import shutil
    from pathlib import Path

    from megatron_srft.config import load_config
    from megatron_srft.distributed import collectives
    from megatron_srft.training.loop import train

    cfg = load_config(None, overrides)
    full = train(cfg)
    if collectives.rank() == 0:
        shutil.rmtree(Path(cfg.run_dir) / "checkpoints" / "step_000002")
    collectives.barrier()
    resumed = train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="must")))
    return full, resumed


def test_toy_sft_on_nccl_trains_and_resumes(toy, tmp_path):
    from tests.toy_run import toy_overrides

    (full, resumed), *_ = run_ranks(_train_twice, gpu_world(),
                                    toy_overrides(toy, tmp_path / "run", 2, ["parallel.backend=nccl"]))
    assert math.isfinite(full["loss/total"]) and math.isfinite(full["optim/grad_norm"])
    for k in ("loss/total", "optim/grad_norm"):  # GPU kernels may sum in another order: 1e-4
        assert resumed[k] == pytest.approx(full[k], rel=1e-4, abs=1e-6), k
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/total" in r][:2] == [1, 2]


def _gpu_twins():
    from tests.test_example_twins import TWINS

    if gpu_world() >= 2:
        return TWINS
    seen, out = set(), []
    for name, path, _ in TWINS:  # one rank: every file's twin at TP = PP = DP = 1
        if path not in seen:
            seen.add(path)
            out.append((f"{path.stem}-world1", path, dict(tp=1, pp=1, sp=False, rollout_tp=1)))
    return out


GPU_TWINS = _gpu_twins() if torch.cuda.is_available() else []


@pytest.mark.skipif(not HAVE_VLLM, reason="the twins generate: vLLM not importable")
@pytest.mark.parametrize("name,path,layout", GPU_TWINS, ids=[t[0] for t in GPU_TWINS])
def test_twin_on_nccl(name, path, layout, toy, tmp_path):
    """tests/test_example_twins.py's twins with NCCL between the ranks and the engines on the GPUs; the
    engine/trainer mismatch within `srft check`'s bound for the engine's dtype."""
    from megatron_srft.check.vllm_engine import mismatch_limit
    from megatron_srft.rollout.base import resolve_dtype
    from tests.test_example_twins import _run_twin, twin_config

    world = gpu_world()
    cfg = twin_config(path, layout, toy, tmp_path / "run")
    cfg.parallel.backend = "nccl"
    cfg.rollout.gpu_memory_utilization = 0.3 if world == 1 else 0.5
    limit = mismatch_limit(resolve_dtype(cfg.rollout.dtype, cfg.model.params_dtype), cfg.model.params_dtype)
    res = run_ranks(_run_twin, world, cfg, None)[0]
    rows = [r for r in res["rows"] if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/total", "optim/grad_norm")), r
        assert r["mismatch/abs_mean"] < limit, (r["mismatch/abs_mean"], limit)
    for k in ("loss/total", "optim/grad_norm", "reward/mean"):  # GPU kernels may sum in another order: 1e-4
        assert res["resumed"][k] == pytest.approx(res["full"][k], rel=1e-4, abs=1e-6), k


# ------------------------------------------------------------------------------------------------- precision


def _logprobs_and_step(hf_dir: str, variants: dict) -> dict:
    """For each ``variants`` name -> ModelConfig fields: the model from ``hf_dir``, its log-probs of the harness's
    samples (forward only), then one SRFT training step. Log-probs per response token, fp32, CPU."""
    from megatron_srft.algorithms.presets import resolve
    from megatron_srft.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.distributed.layout import config_token_pad_multiple
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_model, build_optimizer
    from megatron_srft.models.mapping import load_hf_into_model
    from megatron_srft.training.batch import pack_micro_batches, per_sequence_values
    from megatron_srft.training.step import forward_logprobs, train_minibatch
    from tests.training.harness import make_samples

    pcfg = ParallelConfig()
    groups = init_distributed(pcfg, seed=1234)
    arch = load_arch(hf_dir)
    settings = resolve(AlgorithmConfig(preset="srft"))
    samples = make_samples(8)
    out = {}
    for name, fields in variants.items():
        mcfg = ModelConfig(make_vocab_size_divisible_by=64, **fields)
        handle = build_model(arch, mcfg, pcfg)
        load_hf_into_model(handle.chunks, arch, hf_dir, groups)
        optimizer = build_optimizer(handle, OptimizerConfig(lr=1e-5), mcfg, pcfg)
        mbs = pack_micro_batches(samples, 256, pad_to_multiple=config_token_pad_multiple(pcfg, mcfg))
        per_mb = forward_logprobs(handle.chunks, mbs, groups, arch.vocab_size)
        logprobs = torch.cat(per_sequence_values(mbs, [lp for lp, _ in per_mb], len(samples))).double()
        stats = train_minibatch(handle.chunks, optimizer, mbs, settings, groups, arch.vocab_size)
        out[name] = {"logprobs": logprobs, "loss": float(stats["loss"]), "grad_norm": float(stats["grad_norm"])}
        del handle, optimizer
        torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.training.harness import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("gpu_model"))


def test_bf16_log_probs_match_fp32(model_dir):
    (res,) = run_ranks(_logprobs_and_step, 1, model_dir, {
        "fp32": dict(params_dtype="fp32", transformer_impl="local"),
        "bf16": dict(params_dtype="bf16", transformer_impl="local")})
    diff = (res["bf16"]["logprobs"] - res["fp32"]["logprobs"]).abs()
    assert float(diff.mean()) <= BF16_BOUND["mean"] and float(diff.max()) <= BF16_BOUND["max"], \
        (float(diff.mean()), float(diff.max()))
    for r in res.values():
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r


@pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine not importable")
def test_transformer_engine_spec_step(model_dir):
    """The TE spec in bf16 agrees with the local spec in fp32 within the bf16 bound, and trains a finite step."""
    (res,) = run_ranks(_logprobs_and_step, 1, model_dir, {
        "fp32": dict(params_dtype="fp32", transformer_impl="local"),
        "te": dict(params_dtype="bf16", transformer_impl="transformer_engine")})
    diff = (res["te"]["logprobs"] - res["fp32"]["logprobs"]).abs()
    assert float(diff.mean()) <= BF16_BOUND["mean"], float(diff.mean())
    assert math.isfinite(res["te"]["loss"]) and math.isfinite(res["te"]["grad_norm"])


@pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine not importable")
@pytest.mark.parametrize("recipe", list(FP8_RECIPES))
def test_fp8_step_on_capable_cards(model_dir, recipe):
    """One FP8 step per recipe this card runs (the rule `srft check` and layout validation share)."""
    from megatron_srft.check.context import skip_reason

    reason = skip_reason("6b", True, te=True, capability=tuple(torch.cuda.get_device_capability()),
                         fp8_recipe=recipe)
    if reason:
        pytest.skip(reason)
    (res,) = run_ranks(_logprobs_and_step, 1, model_dir, {
        "fp8": dict(params_dtype="bf16", transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe=recipe)})
    assert math.isfinite(res["fp8"]["loss"]) and math.isfinite(res["fp8"]["grad_norm"]), res["fp8"]
