"""HF <-> Megatron mapping: pure transforms against slow references, bit-exact round trips, and Megatron's
logits from converted weights equal to transformers' logits (which checks builder.py's numerics)."""

from __future__ import annotations

import pytest
import torch

from megatron_srft.config import ConfigError
from megatron_srft.models.arch import arch_from_hf_config
from megatron_srft.models.mapping import (_convert_stream, check_hf_names, expanded, rules_for, shard, to_hf, to_mcore,
                                          unshard)
from megatron_srft.experiments.tiny import tiny_hf_config
from tests.dist import run_ranks
from tests.models.tiny_cases import CASES, full_round_trip, hf_logits, make_case


def _arch(name="llama_gqa_rope"):
    kw = {k: v for k, v in CASES[name].items() if k != "family"}
    return arch_from_hf_config(tiny_hf_config(CASES[name]["family"], hidden_size=128, num_layers=2,
                                              intermediate_size=256, **kw).to_dict())


def _rule(arch, kind):
    return next(r for r in rules_for(arch) if r.kind == kind)


def test_qkv_interleave_matches_slow_reference():
    arch = _arch()  # 4 query heads, 2 KV groups, head_dim 32
    hd, ng, nq = arch.head_dim, arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    q, k, v = torch.randn(4 * hd, 128), torch.randn(2 * hd, 128), torch.randn(2 * hd, 128)
    rows = []
    for g in range(ng):  # Megatron: per group [its query heads; its k head; its v head]
        for h in range(nq):
            rows.append(q[(g * nq + h) * hd:(g * nq + h + 1) * hd])
        rows.append(k[g * hd:(g + 1) * hd])
        rows.append(v[g * hd:(g + 1) * hd])
    ref = torch.cat(rows)
    rule = _rule(arch, "qkv")
    fused = to_mcore(rule, arch, [q, k, v], 128)
    assert torch.equal(fused, ref)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, arch, fused), (q, k, v)))
    # the biases (1-D) interleave the same way
    bq, bk, bv = torch.randn(4 * hd), torch.randn(2 * hd), torch.randn(2 * hd)
    fused_b = to_mcore(rule, arch, [bq, bk, bv], 128)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, arch, fused_b), (bq, bk, bv)))
    # TP=2: each rank holds one whole group
    assert torch.equal(shard(rule, fused, 1, 2), ref[ref.shape[0] // 2:])


def test_fc1_shards_hold_gate_and_up_halves():
    arch = _arch()
    rule = _rule(arch, "fc1")
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    full = to_mcore(rule, arch, [gate, up], 128)
    shards = [shard(rule, full, r, 2) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(unshard(rule, shards), full)


def test_vocab_padding_and_trim():
    arch = _arch()
    rule = next(r for r in rules_for(arch) if r.kind == "vocab")
    emb = torch.randn(arch.vocab_size, 4)
    padded = to_mcore(rule, arch, [emb], 128)
    assert padded.shape == (128, 4) and torch.equal(padded[arch.vocab_size:], torch.zeros(28, 4))
    assert torch.equal(to_hf(rule, arch, padded)[0], emb)


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_round_trip_is_bit_exact(tmp_path, case):
    from safetensors.torch import load_file

    hf = make_case(tmp_path / "hf", case)
    sd = load_file(str(hf / "model.safetensors"))
    arch = _arch(case)
    assert arch.num_params() == sum(t.numel() for t in sd.values())  # the one parameter count, to the weight
    mc, back = full_round_trip(arch, sd, 128)
    assert mc["embedding.word_embeddings.weight"].shape[0] == 128
    assert ("output_layer.weight" in mc) == (not arch.tie_word_embeddings)
    assert set(back) == set(sd) - {"lm_head.weight"} if arch.tie_word_embeddings else set(back) == set(sd)
    for name, t in back.items():
        assert torch.equal(t, sd[name]), name


def test_name_errors():
    arch = _arch("qwen2_untied")
    names = [h.format(i=layer) for r, layer in expanded(arch) for h in r.hf]
    check_hf_names(arch, names)
    with pytest.raises(ConfigError, match="model.layers.2.mlp.up_proj.weight' is in layer 2 but config.json has "
                                          "num_hidden_layers=2"):
        check_hf_names(arch, names + ["model.layers.2.mlp.up_proj.weight"])
    with pytest.raises(ConfigError, match="missing tensor 'lm_head.weight'"):
        check_hf_names(arch, [n for n in names if n != "lm_head.weight"])
    with pytest.raises(ConfigError, match="missing tensor"):
        list(_convert_stream(arch, [("model.norm.weight", torch.ones(128))], 128))


# --------------------------------------------------------------------------------------------- real Megatron


def _megatron_logits(chunks, groups, ids):
    """Full-vocab logits [1, T, V_padded] of a single-stage model (gathered over TP)."""
    import torch.distributed as dist

    num_tokens = ids.shape[1]
    mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        out = chunks[0](ids, torch.arange(num_tokens)[None], mask)
    if groups.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(groups.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=groups.tp_group)
        out = torch.cat(parts, dim=-1)
    return out


def _check_layout(hf_dirs, tp, pp, ids):
    """On each rank: load every HF dir at TP/PP, export it back (compare bit-exact), return logits (PP=1)."""
    from safetensors.torch import load_file

    from megatron_srft.checkpoint.convert import build_and_load, resolve_source
    from megatron_srft.config import ParallelConfig
    from megatron_srft.models.mapping import export_hf_weights
    from megatron_srft.distributed.groups import init_distributed

    pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    groups = init_distributed(pcfg)
    out = {}
    for hf_dir in hf_dirs:
        src = resolve_source(hf_dir)
        handle = build_and_load(src, pcfg, groups, params_dtype="fp32")
        ref = load_file(f"{hf_dir}/model.safetensors")
        exported = {}
        for name, t in export_hf_weights(handle.chunks, src.arch, groups):
            exported[name] = t.clone()
        expected = set(ref) - ({"lm_head.weight"} if src.arch.tie_word_embeddings else set())
        assert set(exported) == expected, set(exported) ^ expected
        bad = [n for n in expected if not torch.equal(exported[n], ref[n])]
        assert not bad, bad
        out[hf_dir] = _megatron_logits(handle.chunks, groups, ids) if pp == 1 else None
    return out


def test_megatron_logits_equal_transformers_and_export_is_exact(tmp_path):
    dirs = [str(make_case(tmp_path / c, c)) for c in sorted(CASES)]
    ids = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(0))
    (res,) = run_ranks(_check_layout, 1, dirs, 1, 1, ids)
    for d in dirs:
        diff = (res[d][..., :100] - hf_logits(d, ids)).abs().max().item()
        assert diff < 1e-4, (d, diff)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_load_and_export_at_tp2_pp2(tmp_path, tp, pp):
    dirs = [str(make_case(tmp_path / c, c)) for c in ("llama_gqa_rope", "qwen2_tied")]
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    results = run_ranks(_check_layout, 2, dirs, tp, pp, ids)
    if pp == 1:
        for d in dirs:
            diff = (results[0][d][..., :100] - hf_logits(d, ids)).abs().max().item()
            assert diff < 1e-4, (d, diff)


class _Float8StandIn(torch.Tensor):
    """Stands in for Transformer Engine's FP8 parameter: reports bf16, holds scaled bytes, dequantize() -> values."""

    @staticmethod
    def __new__(cls, data, scale):
        t = torch.Tensor._make_subclass(cls, (data / scale).round())
        t.scale = scale
        return t

    def dequantize(self):
        return torch.Tensor(self).as_subclass(torch.Tensor) * self.scale


def test_export_dequantises_fp8_parameters():
    from megatron_srft.models.mapping import _plain_tensor

    values = torch.tensor([0.5, -1.5, 2.0])
    fp8 = _Float8StandIn(values, 0.5)
    assert not torch.equal(fp8.as_subclass(torch.Tensor), values)  # its storage is not the weight
    plain = _plain_tensor(fp8)
    assert type(plain) is torch.Tensor and torch.equal(plain, values)
    p = torch.nn.Parameter(values.clone())
    assert _plain_tensor(p) is p  # ordinary parameters pass through, no copy
