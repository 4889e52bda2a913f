"""Model dist checkpoints: saved at TP=2, loaded at PP=2 (resharding), same logits; metadata; atomic write."""

from __future__ import annotations

import json

import torch

from tests.dist import run_ranks
from tests.models.tiny_cases import make_case


def _forward_logits(chunks, groups, ids):
    """Full-vocab logits on the last stage via the forward-only schedule's building blocks (None elsewhere)."""
    from megatron_srft.cli.score import score_sequences

    return score_sequences(chunks, [ids], groups, 100)


def _save_at_tp2(hf_dir, ckpt_dir, ids):
    from megatron_srft.checkpoint.convert import build_and_load, resolve_source
    from megatron_srft.checkpoint.dist import save_model
    from megatron_srft.config import ParallelConfig
    from megatron_srft.distributed.groups import init_distributed

    pcfg = ParallelConfig(tensor_model_parallel_size=2)
    groups = init_distributed(pcfg)
    src = resolve_source(hf_dir)
    handle = build_and_load(src, pcfg, groups, params_dtype="fp32")
    save_model(handle.chunks, ckpt_dir, {"step": 7}, arch=src.arch)
    return _forward_logits(handle.chunks, groups, ids)


def _load_at_pp2(ckpt_dir, ids):
    from megatron_srft.checkpoint.convert import build_and_load, resolve_source
    from megatron_srft.config import ParallelConfig
    from megatron_srft.distributed.groups import init_distributed

    pcfg = ParallelConfig(pipeline_model_parallel_size=2)
    groups = init_distributed(pcfg)
    handle = build_and_load(resolve_source(ckpt_dir), pcfg, groups)
    assert next(handle.chunks[0].parameters()).dtype == torch.float32  # dtype from the metadata
    return _forward_logits(handle.chunks, groups, ids)


def test_save_tp2_load_pp2_same_logprobs(tmp_path):
    hf = make_case(tmp_path / "hf", "qwen2_untied")
    ckpt = tmp_path / "ckpt" / "model"
    ids = list(range(4, 40))
    saved = run_ranks(_save_at_tp2, 2, str(hf), str(ckpt), ids)
    meta = json.loads((ckpt / "srft_model.json").read_text())
    assert meta["step"] == 7 and meta["padded_vocab_size"] == 128 and meta["params_dtype"] == "fp32"
    assert meta["family"] == "qwen2" and meta["hf_config"]["num_hidden_layers"] == 2
    assert not (ckpt.parent / ".model.tmp").exists()
    loaded = run_ranks(_load_at_pp2, 2, str(ckpt), ids)
    assert loaded[0] is None  # first stage
    (lp_a, ent_a), = saved[0]
    (lp_b, ent_b), = loaded[1]
    assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(ent_a, ent_b, atol=1e-5)


def _load_into_other_shape(hf_dir, ckpt_model_dir):
    from megatron_srft.checkpoint.convert import resolve_source
    from megatron_srft.checkpoint.dist import load_model
    from megatron_srft.config import ModelConfig, ParallelConfig
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.errors import CheckpointError
    from megatron_srft.models.builder import build_model

    pcfg = ParallelConfig()
    init_distributed(pcfg)
    handle = build_model(resolve_source(hf_dir).arch, ModelConfig(params_dtype="fp32"), pcfg)
    try:
        load_model(handle.chunks, ckpt_model_dir)
    except CheckpointError as e:
        return str(e)
    return None


def test_checkpoint_of_another_shape_is_a_named_error(tmp_path, trained_run):
    hf = make_case(tmp_path / "hf", "qwen2_untied")  # hidden 128 but 100-token vocab and untied: other shapes
    model = trained_run / "checkpoints" / "step_000001" / "model"
    (msg,) = run_ranks(_load_into_other_shape, 1, str(hf), str(model))
    assert msg is not None and msg.startswith(f"{model}: does not fit the model being loaded"), msg
    assert "the checkpoint has no tensor 'output_layer.weight'" in msg
