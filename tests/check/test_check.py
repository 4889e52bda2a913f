"""`srft check`: the whole command on CPU (one process, and 2 gloo ranks under torchrun), every check's line and
status, the JSON it appends; a failing check does not stop the others."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_srft.check.context import Context, choose_sizes, skip_reason
from megatron_srft.check.results import FAIL, PASS, Result, Skip, append_results, read_results_file
from megatron_srft.check.runner import default_shape, load_check_config, run_check
from megatron_srft.check.train_step import pack
from megatron_srft.check.transformer_engine import check_transformer_engine
from megatron_srft.errors import UserError

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(\w+)\s+(.+?)\s+(PASS|FAIL|SKIP)\s+(.*)$")
# The lines of a CPU run with vLLM importable and no Transformer Engine, in order.
CPU_IDS = ["1a", "1b", "1c", "2", "3a", "3b", "4", "5a", "5b", "5c", "6"]


def _srft_check(out: Path, *extra: str, nproc: int = 1, timeout: int = 600) -> tuple[int, dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "megatron_srft", "check", "--quick", "--out", str(out), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m",
               "megatron_srft", "check", "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    lines = {}
    for line in proc.stdout.splitlines():
        m = LINE.match(line)
        if m and m.group(1) in CPU_IDS:
            lines[m.group(1)] = (m.group(3), m.group(4))
    return proc.returncode, lines, proc.stdout + proc.stderr[-3000:]


def _assert_cpu_run(rc: int, lines: dict, log: str, out: Path, world: int) -> dict:
    assert rc == 0, log
    assert list(lines) == CPU_IDS, log  # every line, once, in the issue's order (rank 0 only prints)
    status = {k: v[0] for k, v in lines.items()}
    skipped = {"1c", "3b", "6"} | ({"2"} if world == 1 else set())
    assert {k for k, v in status.items() if v == "SKIP"} == skipped, log
    assert all(status[k] == "PASS" for k in CPU_IDS if k not in skipped), log
    assert "no CUDA device" in lines["1c"][1] and "Transformer Engine" in lines["6"][1]
    assert "tokens/s/device" in lines["3a"][1] and "MFU" in lines["3a"][1]
    entries = json.loads(out.read_text())
    assert isinstance(entries, list) and len(entries) == 1
    entry = entries[0]
    assert entry["card"] == "cpu" and entry["world_size"] == world and entry["quick"] is True
    assert entry["versions"]["torch"] and entry["versions"]["megatron_core"] and "date" in entry
    assert [c["id"] for c in entry["checks"]] == CPU_IDS
    assert entry["summary"] == {"PASS": len(CPU_IDS) - len(skipped), "FAIL": 0, "SKIP": len(skipped)}
    by_id = {c["id"]: c for c in entry["checks"]}
    assert by_id["3a"]["numbers"]["tokens_per_s_per_device"] > 0
    assert 0 < by_id["3a"]["numbers"]["mfu_vs_measured"] < 1.5  # vs the measured rate: noisy on a shared CPU
    assert by_id["5c"]["numbers"]["abs_diff_mean"] < 1e-3  # fp32 engine and trainer agree after the sync
    assert by_id["4"]["numbers"]["max_abs_error"] < 1e-4
    return entry


@pytest.mark.slow
def test_check_quick_one_process(tmp_path):
    out = tmp_path / "check.json"
    rc, lines, log = _srft_check(out)
    _assert_cpu_run(rc, lines, log, out, world=1)
    assert "world of 1 rank" in lines["2"][1]


@pytest.mark.slow
def test_check_quick_two_gloo_ranks(tmp_path):
    out = tmp_path / "check.json"
    rc, lines, log = _srft_check(out, nproc=2)
    entry = _assert_cpu_run(rc, lines, log, out, world=2)
    assert "gloo, 2 ranks" in lines["2"][1]
    assert entry["layout"] == {"tp": 1, "pp": 1, "dp": 2}


@pytest.mark.slow
def test_check_quick_config_tp2(tmp_path, tiny_qwen2):
    """--config: the config's model and layout (TP 2 over 2 ranks): the vocab-parallel op, TP export into vLLM."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_qwen2}, params_dtype: fp32, transformer_impl: local}}\n"
        "parallel: {tensor_model_parallel_size: 2}\n"
        "data: {max_prompt_length: 16, max_response_length: 48}\n"
        "rollout: {dtype: fp32, sync_bucket_mb: 16}\n"
        "train: {micro_batch_tokens: 256, prompts_per_step: 2, prompts_per_minibatch: 2}\n")
    out = tmp_path / "check.json"
    rc, lines, log = _srft_check(out, "--config", str(cfg), nproc=2)
    entry = _assert_cpu_run(rc, lines, log, out, world=2)
    assert entry["layout"] == {"tp": 2, "pp": 1, "dp": 1} and entry["config"] == str(cfg)
    assert "/2]" in lines["4"][1]  # the op ran on vocab shards


# ----------------------------------------------------------------------------------------------- pieces


def _ctx() -> Context:
    import torch

    sizes = choose_sizes(on_gpu=False, quick=True, pp_size=1)
    return Context(args=argparse.Namespace(quick=True, config=None), cfg=None, sizes=sizes, on_gpu=False,
                         device=torch.device("cpu"), workdir=Path("."))


def test_a_failing_check_prints_one_line_and_the_next_runs(capsys):
    ctx = _ctx()

    def partial(ctx):
        yield Result("5a", "vllm engine", PASS, "ok")
        raise RuntimeError("engine fell over\nwith a long trace")

    def skipped(ctx):
        raise Skip("not here")
        yield

    def fine(ctx):
        yield Result("4", "logprob op", PASS, "fast")

    run_check(ctx, partial, "5", "vllm", (("5a", "vllm engine"), ("5b", "weight sync"), ("5c", "mismatch")))
    run_check(ctx, skipped, "6", "TE step", (("6a", "TE bf16 step"), ("6b", "TE FP8 step")))
    run_check(ctx, fine, "4", "logprob op")
    printed = capsys.readouterr().out.splitlines()
    assert [LINE.match(p).group(1, 3) for p in printed] == [("5a", "PASS"), ("5b", "FAIL"), ("6", "SKIP"),
                                                              ("4", "PASS")]
    assert printed[1].endswith("RuntimeError: engine fell over") and "weight sync" in printed[1]
    assert printed[2].endswith("not here") and "TE step" in printed[2]
    assert [r.status for r in ctx.results] == ["PASS", "FAIL", "SKIP", "PASS"]


def test_append_results_list_and_benchmarks_file(tmp_path):
    entry = {"card": "NVIDIA H100 80GB HBM3", "date": "d", "machine": {}, "seconds": 1.0,
             "summary": {"PASS": 3, "FAIL": 0, "SKIP": 1}}
    listing = tmp_path / "out.json"
    append_results(listing, entry)
    append_results(listing, dict(entry, date="e"))
    assert [e["date"] for e in json.loads(listing.read_text())] == ["d", "e"]
    bench = tmp_path / "results.json"
    bench.write_text(json.dumps({"runs": {"logprob": {"status": "ok"}}}))
    append_results(bench, entry)
    runs = json.loads(bench.read_text())["runs"]
    assert runs["logprob"] == {"status": "ok"}
    assert runs["check/nvidia_h100_80gb_hbm3"]["status"] == "ok"
    assert runs["check/nvidia_h100_80gb_hbm3"]["results"] == entry
    assert not list(tmp_path.glob(".*tmp*"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        append_results(bad, entry)
    bad.write_text('{"a": 1}')
    with pytest.raises(UserError, match="expected a JSON list"):
        read_results_file(bad)  # main() reads --out before running any check


def test_sizes_cover_the_issue_shapes():
    gpu = choose_sizes(on_gpu=True, quick=False, pp_size=1)
    assert (gpu.logprob_tokens, gpu.logprob_vocab) == (16384, 152064)
    assert default_shape(True, False, 79.1) == "qwen2.5-1.5b"
    assert default_shape(True, True, 79.1) == "qwen2.5-0.5b"
    assert default_shape(False, False, 0.0) == "tiny"
    assert choose_sizes(on_gpu=False, quick=True, pp_size=4).num_micro_batches == 4


def test_config_errors_are_one_line_and_fp8_configs_load_without_te(tmp_path, tiny_qwen2):
    from megatron_srft.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{path: {tmp_path / 'missing'}}}\n")
    args = argparse.Namespace(config=str(bad), overrides=[], quick=True)
    with pytest.raises(ConfigError, match=r"^model.path: .*missing: not a directory$"):
        load_check_config(args, 1, False, False, tmp_path, "tiny")
    fp8 = tmp_path / "fp8.yaml"
    fp8.write_text(f"model: {{path: {tiny_qwen2}, fp8: hybrid, transformer_impl: transformer_engine}}\n")
    cfg = load_check_config(argparse.Namespace(config=str(fp8), overrides=[], quick=True), 1,
                                  False, False, tmp_path, "tiny")
    assert cfg.model.fp8 is None and cfg.model.transformer_impl == "local"  # step 3 runs; check 6 says why not


# ----------------------------------------------------------------------------------------------- GPU branches
# What each check that needs a GPU, Transformer Engine or vLLM decides, as pure functions tested here on CPU.

A100 = (8, 0)  # "NVIDIA A100-SXM4-80GB" is in KNOWN_CARDS; its tensor cores have no FP8
H100 = (9, 0)


@pytest.mark.parametrize("check_id,kw,reason", [
    ("1c", dict(on_gpu=False), "no CUDA device"),
    ("1c", dict(on_gpu=True), None),
    ("5", dict(on_gpu=True, vllm=False), "vLLM not importable"),
    ("5", dict(on_gpu=False, vllm=True), None),
    ("6", dict(on_gpu=False, te=True), "Transformer Engine needs a CUDA GPU"),
    ("6", dict(on_gpu=True, te=False), "Transformer Engine not importable"),
    ("6", dict(on_gpu=True, te=True, capability=A100), None),  # the bf16 TE step runs on an A100
    ("6b", dict(on_gpu=True, te=False, capability=H100), "Transformer Engine not importable"),
    ("6b", dict(on_gpu=True, te=True, capability=A100),
     "FP8 'delayed' recipe: a GPU of compute capability 8.0 has no FP8 tensor cores"),
    ("6b", dict(on_gpu=True, te=True, capability=H100, fp8_recipe="mxfp8"),
     "FP8 'mxfp8' recipe: 'mxfp8' needs a GPU of compute capability 10.0 or newer"),
    ("6b", dict(on_gpu=True, te=True, capability=H100, fp8_recipe="blockwise"), None),
    ("6b", dict(on_gpu=True, te=True, capability=(10, 0), fp8_recipe="mxfp8"), None),
])
def test_skip_rules_of_the_gpu_checks(check_id, kw, reason):
    got = skip_reason(check_id, **kw)
    assert got == reason if reason is None else got.startswith(reason), got


def _gpu_ctx(capability, tp=1, sp=False) -> Context:
    """A context as a GPU rank with Transformer Engine sees it (the checks below build nothing)."""
    from megatron_srft.config import SRFTConfig

    ctx = _ctx()
    ctx.cfg = SRFTConfig()
    ctx.cfg.parallel.tensor_model_parallel_size, ctx.cfg.parallel.sequence_parallel = tp, sp
    ctx.on_gpu, ctx.te_available, ctx.capability = True, True, capability
    return ctx


def test_fp8_step_skips_on_a_card_without_fp8(capsys):
    """On an A100 check 6 runs its bf16 step (here: step 3's, already on the TE spec) and SKIPs the FP8 one with
    the reason, instead of failing it (and the command's exit code)."""
    ctx = _gpu_ctx(A100)
    ctx.arch = object()  # step 3 read the shapes
    ctx.step3 = {"spec": "TE spec, bf16", "step_seconds": 1.0, "tokens_per_s_per_device": 1000.0}
    run_check(ctx, check_transformer_engine, "6", "TE step", (("6a", "TE bf16 step"), ("6b", "TE FP8 step")))
    printed = capsys.readouterr().out.splitlines()
    assert [LINE.match(p).group(1, 3) for p in printed] == [("6a", "PASS"), ("6b", "SKIP")]
    assert "compute capability 8.0 has no FP8 tensor cores" in printed[1]
    assert not [r for r in ctx.results if r.status == FAIL]


def test_steps_pack_as_training_pads():
    """TP 4 with sequence parallelism and FP8: every micro-batch a multiple of TP x 16 = 64 (each rank's quarter
    of the sequence goes through the FP8 GEMMs), as training packs; lcm(4, 16) = 16 is not enough."""
    import dataclasses

    from megatron_srft.distributed.layout import config_token_pad_multiple
    from megatron_srft.training.batch import Sample

    ctx = _gpu_ctx(H100, tp=4, sp=True)
    samples = [Sample(prompt_ids=[1] * 5, response_ids=[2] * (16 + k), advantage=1.0, is_demo=False, group=k,
                      reward=0.0) for k in range(3)]
    fp8 = dataclasses.replace(ctx.cfg.model, fp8="hybrid", fp8_recipe="delayed")
    mbs = pack(ctx, samples, fp8, budget=4096)
    assert mbs and all(mb.num_tokens % 64 == 0 for mb in mbs)
    assert config_token_pad_multiple(ctx.cfg.parallel, fp8) == 64
    mx = dataclasses.replace(fp8, fp8_recipe="mxfp8")
    assert all(mb.num_tokens % 128 == 0 for mb in pack(ctx, samples, mx, budget=4096))
    bf16 = pack(ctx, samples, ctx.cfg.model, budget=4096)  # FP8 off: TP only, as training
    assert [mb.num_tokens for mb in bf16] == [68]  # one row of 21 + 22 + 23 tokens


def test_fp8_config_on_a_card_without_fp8_runs_step_3_without_it(tmp_path, tiny_qwen2):
    """--config with FP8 on an A100 with Transformer Engine: the config loads with FP8 off (step 3 runs in bf16)
    and keeps its recipe, which line 6b names when it skips."""
    fp8 = tmp_path / "fp8.yaml"
    fp8.write_text(f"model: {{path: {tiny_qwen2}, fp8: hybrid, fp8_recipe: tensorwise}}\n")
    args = argparse.Namespace(config=str(fp8), overrides=[], quick=True)
    cfg = load_check_config(args, 1, True, True, tmp_path, "tiny", A100)
    assert cfg.model.fp8 is None and cfg.model.fp8_recipe == "tensorwise"


def test_mismatch_limit_is_the_less_precise_sides():
    """An fp32 engine beside a bf16 trainer (rollout.dtype auto on CPU) differs by bf16 rounding (~1e-3 measured),
    which the fp32 limit alone would call a failed sync."""
    from megatron_srft.check.vllm_engine import MISMATCH_LIMIT, mismatch_limit

    assert mismatch_limit("fp32", "fp32") == MISMATCH_LIMIT["fp32"]
    assert mismatch_limit("fp32", "bf16") == mismatch_limit("bf16", "fp32") == MISMATCH_LIMIT["bf16"]
