"""`srft convert`: HF -> Megatron -> HF bit-exact for every tensor, loadable by transformers; each bad input's error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_srft import cli
from tests.dist import run_ranks
from tests.models.tiny_cases import CASES, hf_logits, make_case


def _convert_both_ways(pairs):
    """In a 1-rank world (spawned: the CLI sets up Megatron's parallel state), run both conversions per case."""
    codes = []
    for hf, mc, back, extra in pairs:
        codes.append(cli.main(["convert", "hf-to-mcore", "--hf", hf, "--out", mc, *extra]))
        codes.append(cli.main(["convert", "mcore-to-hf", "--ckpt", mc, "--out", back, "--max-shard-mb", "1"]))
    return codes


def test_round_trip_bit_exact_and_loadable(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    pairs = []
    for c in sorted(CASES):
        hf = make_case(tmp_path / c / "hf", c)
        pairs.append((str(hf), str(tmp_path / c / "mc"), str(tmp_path / c / "back"), ["--dtype", "fp32"]))
    # bf16 conversion of one model: the checkpoint dtype follows --dtype
    pairs.append((pairs[0][0], str(tmp_path / "bf16" / "mc"), str(tmp_path / "bf16" / "back"), ["--dtype", "bf16"]))
    (codes,) = run_ranks(_convert_both_ways, 1, pairs)
    assert codes == [0] * len(codes)
    for hf, mc, back, extra in pairs:
        ref = load_file(f"{hf}/model.safetensors")
        index = json.loads(open(f"{back}/model.safetensors.index.json").read())
        got = {}
        for fname in sorted(set(index["weight_map"].values())):
            got.update(load_file(f"{back}/{fname}"))
        tied = json.loads(open(f"{hf}/config.json").read())["tie_word_embeddings"]
        assert set(got) == set(ref) - ({"lm_head.weight"} if tied else set())
        dtype = torch.bfloat16 if "bf16" in extra else torch.float32
        for name, t in got.items():
            assert torch.equal(t, ref[name].to(dtype)), (hf, name)
        assert json.loads(open(f"{mc}/model/srft_model.json").read())["params_dtype"] == ("bf16" if "bf16" in extra
                                                                                        else "fp32")
    # the exported directory is a working HF model + tokenizer
    hf, _, back, _ = pairs[1]
    ids = torch.randint(0, 100, (1, 20))
    assert torch.equal(hf_logits(back, ids), hf_logits(hf, ids))
    assert AutoTokenizer.from_pretrained(back)("1+2=3")["input_ids"] == AutoTokenizer.from_pretrained(hf)("1+2=3")[
        "input_ids"]
    index = json.loads(open(f"{back}/model.safetensors.index.json").read())
    assert len(set(index["weight_map"].values())) > 1  # --max-shard-mb 1 split the fp32 weights (1.3 MB)


def _err(capsys, argv):
    capsys.readouterr()  # drop earlier output (e.g. transformers' progress bars)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("hf") / "m", "qwen2_untied")


def test_unsupported_architecture_lists_supported(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")])
    assert "unsupported architecture 'MistralForCausalLM'" in err and "Qwen2ForCausalLM" in err
    assert "LlamaForCausalLM" in err and "Qwen3ForCausalLM" in err


def test_config_layers_differ_from_weights_names_the_tensor(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")])
    assert "model.layers.1." in err and "num_hidden_layers=1" in err
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")])
    assert "missing tensor 'model.layers.2." in err


def test_missing_shard_names_the_file(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    make_case(tmp_path / "src", "qwen2_untied")
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "src")).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    (sharded / shards[1]).unlink()
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(sharded), "--out", str(tmp_path / "o")])
    assert f"shard file '{shards[1]}'" in err


def test_non_empty_output_refused_and_wrong_kind(tmp_path, hf_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(out)])
    assert "not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").exists()
    err = _err(capsys, ["convert", "mcore-to-hf", "--ckpt", str(hf_dir), "--out", str(tmp_path / "o2")])
    assert "expected a Megatron checkpoint" in err
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")])
    assert "not a directory" in err
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- never touch the input


def _snapshot(d):
    from pathlib import Path

    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_out_that_is_inside_or_contains_the_input_is_refused(tmp_path, hf_dir, trained_run, capsys):
    hf = tmp_path / "models" / "hf"
    shutil.copytree(hf_dir, hf)
    before = _snapshot(tmp_path / "models")
    (tmp_path / "link").symlink_to(hf)
    for out, words in ((hf, "is the input"), (tmp_path / "link", "is the input"), (hf / "sub", "lies inside the input"),
                       (tmp_path / "models", "contains the input")):
        err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out), "--overwrite"])
        assert words in err, err
    assert _snapshot(tmp_path / "models") == before
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _snapshot(run)
    step = run / "checkpoints" / "step_000002"
    for out, words in ((run, "contains the input"), (step / "model", "is the input"), (step, "is the input"),
                       (step / "model" / "x", "lies inside")):
        err = _err(capsys, ["convert", "mcore-to-hf", "--ckpt", str(step), "--out", str(out), "--overwrite"])
        assert words in err, err
    assert _snapshot(run) == before


def test_overwrite_never_removes_a_directory_convert_did_not_write(tmp_path, hf_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own")
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(out), "--overwrite"])
    assert "not the output of an earlier conversion" in err and str(out) in err
    assert (out / "notes.txt").read_text() == "the user's own"


def test_score_and_generate_refuse_an_out_that_is_an_input(tmp_path, hf_dir, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1+1", "prompt_ids": [1], "response_ids": [2]}\n')
    before = data.read_bytes()
    for argv in (["score", "--ckpt", str(hf_dir), "--data", str(data), "--out", str(data)],
                 ["generate", "--ckpt", str(hf_dir), "--prompts", str(data), "--out", str(data)],
                 ["score", "--ckpt", str(hf_dir), "--data", str(data), "--out", str(hf_dir / "x.jsonl")]):
        err = _err(capsys, argv)
        assert "is the input" in err or "lies inside the input" in err, err
    assert data.read_bytes() == before


def test_unreadable_tokenizer_is_not_copied_into_a_successful_output(tmp_path, hf_dir, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    cfg = hf / "tokenizer_config.json"
    assert cfg.is_file()
    cfg.write_text(cfg.read_text()[:30])
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out")])
    assert err.startswith(f"srft convert: error: {cfg}: not valid JSON"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary or lock left


_FIRST_CONVERSION = """
import sys
from pathlib import Path
from megatron_srft.checkpoint.convert import _prepare_out
_prepare_out(Path(sys.argv[1]), False)
print("writing", flush=True)
sys.stdin.read()
"""


def test_second_conversion_into_the_same_out_names_the_first(tmp_path, hf_dir, capsys):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", _FIRST_CONVERSION, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "writing"
        err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(out)])
        assert f"--out {out}: another conversion into it is under way; in use by another process" in err, err
        assert f"pid {first.pid}" in err and ".tmp" not in err, err
        assert (tmp_path / ".out.tmp").is_dir()  # the first one's work is untouched
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()


# --------------------------------------------------------------------------------------------- no silent garbage


def test_vocab_size_below_the_embedding_rows_is_an_error(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    rows = cfg["vocab_size"]
    cfg["vocab_size"] = rows - 10
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")])
    assert f"vocab_size={rows - 10} but model.embed_tokens.weight has {rows} rows" in err
    assert "drop 10 rows" in err and not (tmp_path / "o").exists()
    # the same guard where the rows are converted (training straight from an HF directory)
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.families import EMBED
    from megatron_srft.models.mapping import to_mcore

    with pytest.raises(Exception, match=f"vocab_size={rows - 10} but model.embed_tokens.weight has {rows} rows"):
        to_mcore(EMBED, load_arch(bad), [torch.zeros(rows, 4)], 128)


def _tensor_span(path, name):
    from megatron_srft.checkpoint.convert import read_safetensors_header

    header, start = read_safetensors_header(path)
    begin, end = header[name]["data_offsets"]
    return start + begin, start + end


def test_damaged_shards_are_named(tmp_path, hf_dir, capsys):
    from megatron_srft.errors import CheckpointError
    from megatron_srft.models.mapping import HFWeights

    # a truncated shard: its header promises more bytes than the file holds
    bad = tmp_path / "trunc"
    shutil.copytree(hf_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    err = _err(capsys, ["convert", "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")])
    assert "model.safetensors: truncated: tensor" in err
    # one flipped byte: the high exponent byte of one fp32 weight, which then reads ~1e37 (or inf/nan)
    flip = tmp_path / "flip"
    shutil.copytree(hf_dir, flip)
    name = "model.layers.1.mlp.down_proj.weight"
    begin, _ = _tensor_span(flip / "model.safetensors", name)
    raw = bytearray((flip / "model.safetensors").read_bytes())
    raw[begin + 4 * 7 + 3] ^= 0x40
    (flip / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds (non-finite values|a value of magnitude)"):
        for _ in HFWeights(flip).iter_tensors():
            pass


def _convert_chain(step, hf_out, mc_out, damaged_hf):
    """mcore -> HF -> mcore (both outputs carry manifests), then a damaged copy of the HF output."""
    codes = [cli.main(["convert", "mcore-to-hf", "--ckpt", step, "--out", hf_out]),
             cli.main(["convert", "hf-to-mcore", "--hf", hf_out, "--out", mc_out])]
    shutil.copytree(hf_out, damaged_hf)
    shard = sorted(p for p in __import__("pathlib").Path(damaged_hf).glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # a single bit inside the last tensor: only the checksum can tell
    shard.write_bytes(bytes(raw))
    codes.append(cli.main(["convert", "hf-to-mcore", "--hf", damaged_hf, "--out", mc_out + "2"]))
    return codes


def test_converted_directories_carry_verified_manifests(tmp_path, trained_run):
    from megatron_srft.checkpoint import manifest

    step = trained_run / "checkpoints" / "step_000002"
    hf_out, mc_out, damaged = tmp_path / "hf", tmp_path / "mc", tmp_path / "damaged"
    (codes,) = run_ranks(_convert_chain, 1, str(step), str(hf_out), str(mc_out), str(damaged))
    assert codes == [0, 0, 2]
    assert "model.safetensors.index.json" in manifest.read_manifest(hf_out) and manifest.verify_part(hf_out) == []
    assert set(manifest.read_manifest(mc_out)) >= {"config.json", "model/srft_manifest.json"}
    assert manifest.verify_part(mc_out) == [] and manifest.verify_part(mc_out / "model") == []
    (problem,) = manifest.verify_part(damaged)
    assert "does not match the manifest" in problem and ".safetensors" in problem
    assert not (tmp_path / "mc2").exists()


def test_models_that_only_move_tensors_stay_on_cpu_whatever_the_gpus():
    from megatron_srft.distributed.groups import MODEL_RUNS_ON_GPU, device_for
    from megatron_srft.errors import UserError

    assert set(MODEL_RUNS_ON_GPU) == {"train", "score", "convert", "generate"}
    for purpose in ("convert", "generate"):  # conversion, and the weight source `srft generate` syncs from
        assert device_for(purpose, cuda_available=True, local_rank=3) == torch.device("cpu")
    for purpose in ("train", "score"):
        assert device_for(purpose, cuda_available=True, local_rank=3) == torch.device("cuda", 3)
        assert device_for(purpose, cuda_available=False, local_rank=3) == torch.device("cpu")
    # the size check applies to a GPU placement only: conversion of any size is fine
    assert device_for("convert", True, model_bytes=141 << 30, device_memory_bytes=80 << 30) == torch.device("cpu")
    with pytest.raises(UserError, match="--tp: the model's weights alone need about 141.0 GiB per GPU, more than the "
                                        "80.0 GiB of one GPU; use more"):
        device_for("score", True, model_bytes=141 << 30, device_memory_bytes=80 << 30, field="--tp", fix="use more")
    with pytest.raises(ValueError, match="purpose"):
        device_for("eval", True)


def _convert_on_a_gpu_machine(hf, mc, back):
    """Both conversions in a process where CUDA reports itself available: any use of it for the model (a device
    set, the model built or moved there, a CUDA generator seeded) reaches this CPU build of torch and fails. Only
    what megatron-core's checkpoint save does with any model is answered: a synchronize and one flag tensor on the
    current device (bytes, not the model)."""
    import torch

    torch.cuda.is_available = lambda: True  # this process ends after the call
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    return [cli.main(["convert", "hf-to-mcore", "--hf", hf, "--out", mc, "--dtype", "fp32"]),
            cli.main(["convert", "mcore-to-hf", "--ckpt", mc, "--out", back])]


def test_conversion_needs_no_gpu_when_one_is_available(tmp_path, hf_dir):
    # Megatron allocates parameters on the current GPU unless use_cpu_initialization: a 70B bf16 model (141 GB)
    # would not fit one; conversion computes nothing and stays on CPU, bit-exact.
    from safetensors.torch import load_file

    (codes,) = run_ranks(_convert_on_a_gpu_machine, 1, str(hf_dir), str(tmp_path / "mc"), str(tmp_path / "back"))
    assert codes == [0, 0]
    ref = load_file(f"{hf_dir}/model.safetensors")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    got = {}
    for fname in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(tmp_path / "back" / fname)))
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
