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


def _extra_state_model(hf_dir, extra_on: tuple[str, ...], value: float):
    """The model with the ``extra_on`` linears (of linear_qkv, linear_proj, linear_fc1, linear_fc2) carrying extra
    state as Transformer Engine's do: ``get_extra_state`` returns ``[value, layer]``; ``set_extra_state`` records what
    a load gave it. Returns (model, groups, arch)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_srft.config import ModelConfig, ParallelConfig
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_gpt, transformer_config
    from megatron_srft.models.local_spec import RMSNorm, local_layer_spec

    class _ExtraState:
        """TE's modules return a buffer of FP8 scaling state from get_extra_state and take it back in set."""

        def get_extra_state(self):
            return torch.tensor([value, float(getattr(self, "test_layer_index", 0))])

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    class Column(_ExtraState, ColumnParallelLinear):
        pass

    class Row(_ExtraState, RowParallelLinear):
        pass

    pcfg, mcfg = ParallelConfig(), ModelConfig(params_dtype="fp32", transformer_impl="local")
    groups = init_distributed(pcfg)
    arch = load_arch(hf_dir)
    layer = local_layer_spec(arch.qk_norm)
    attn, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    plain = {"linear_qkv": ColumnParallelLinear, "linear_proj": RowParallelLinear,
             "linear_fc1": ColumnParallelLinear, "linear_fc2": RowParallelLinear}
    extra = {"linear_qkv": Column, "linear_proj": Row, "linear_fc1": Column, "linear_fc2": Row}
    for name in plain:
        setattr(attn if name in ("linear_qkv", "linear_proj") else mlp, name,
                extra[name] if name in extra_on else plain[name])
    tf = transformer_config(arch, mcfg, pcfg)
    tf.perform_initialization = False
    model = build_gpt(arch, mcfg, pcfg, True, True, tf_config=tf,
                      spec=TransformerBlockSubmodules(layer_specs=[layer] * arch.num_layers, layer_norm=RMSNorm))
    for i, lyr in enumerate(model.decoder.layers):
        for mod in lyr.modules():
            mod.test_layer_index = i
    return model, groups, arch


def _load_into_extra_state_model(ckpt_dir, hf_dir):
    """Load a local-spec checkpoint into a model whose linears all carry extra state; compare every weight with the
    HF source."""
    from megatron_srft.checkpoint.dist import load_model
    from megatron_srft.models.mapping import export_hf_weights

    model, groups, arch = _extra_state_model(hf_dir, ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), 0.0)
    assert any(k.endswith("_extra_state") for k in model.state_dict())  # the requests the checkpoint lacks
    load_model([model], ckpt_dir)
    from safetensors.torch import load_file

    ref = load_file(str(hf_dir / "model.safetensors"))
    return max(float((t - ref[n]).abs().max()) for n, t in export_hf_weights([model], arch, groups))


def test_local_spec_checkpoint_loads_into_modules_with_extra_state(tmp_path):
    from megatron_srft.cli import main

    hf = make_case(tmp_path / "hf", "qwen2_untied")
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "conv"), "--dtype", "fp32"]) == 0
    assert run_ranks(_load_into_extra_state_model, 1, str(tmp_path / "conv" / "model"), hf) == [0.0]


def _save_then_load_extra_state(hf_dir, ckpt_dir):
    """Save with extra state on the column linears only, load into a model whose four linears carry it: what the
    checkpoint holds is loaded (an FP8 resume keeps TE's scaling state), what it lacks is skipped."""
    from megatron_srft.checkpoint.dist import load_model, save_model

    saved, _, arch = _extra_state_model(hf_dir, ("linear_qkv", "linear_fc1"), 7.0)
    save_model([saved], ckpt_dir, {"step": 1}, arch=arch)
    model, _, _ = _extra_state_model(hf_dir, ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), 0.0)
    load_model([model], ckpt_dir)
    got = {}
    for i, lyr in enumerate(model.decoder.layers):
        for name in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            state = getattr(lyr.get_submodule(name), "loaded_extra_state", None)
            got[f"{i}.{name}"] = None if state is None else [float(x) for x in state]
    return got


def test_extra_state_in_the_checkpoint_is_loaded_and_absent_is_skipped(tmp_path):
    hf = make_case(tmp_path / "hf", "qwen2_untied")
    got, = run_ranks(_save_then_load_extra_state, 1, hf, str(tmp_path / "ckpt" / "model"))
    for i in range(2):
        assert got[f"{i}.self_attention.linear_qkv"] == [7.0, float(i)]  # present: each layer its own
        assert got[f"{i}.mlp.linear_fc1"] == [7.0, float(i)]
        assert got[f"{i}.self_attention.linear_proj"] is None  # absent: fresh state, load not refused
        assert got[f"{i}.mlp.linear_fc2"] is None


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
