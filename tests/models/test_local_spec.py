"""Our local layer spec's packed attention (PackedSegmentAttention, THD, per segment) computes what Megatron's
DotProductAttention computes with the dense block-causal [T, T] mask: logits and every parameter's gradient to
1e-5, at TP=1 and TP=2 (GQA: 4 query heads, 2 KV heads), with and without sequence parallelism, on a row of
several sequences plus a trailing padding segment. And a packed sequence's logits equal the sequence run alone
(RoPE restarts per segment on the THD path; the dense reference uses row positions, equal by relativity).
In bf16 (the shipped configs' dtype) every module of our spec returns bf16, forward and backward run, and the
logits stay close to those of the fp32 model with the same weights.
"""

import numpy as np
import pytest
import torch

from tests.dist import run_ranks
from tests.training.harness import make_model_dir, make_samples

PAD_MULTIPLE = 8  # the row gets a trailing padding segment


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_qwen2_attn"))


def _gather_tp(t, groups):
    if groups.tp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=-1)


def _compare(hf_dir, tp, sp):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_srft.config import ModelConfig, ParallelConfig
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_gpt
    from megatron_srft.models.local_spec import PackedSegmentAttention
    from megatron_srft.models.mapping import load_hf_into_model
    from megatron_srft.training.batch import block_causal_mask, model_forward, pack_micro_batches

    pcfg = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    mcfg = ModelConfig(params_dtype="fp32", transformer_impl="local", make_vocab_size_divisible_by=64)
    groups = init_distributed(pcfg, seed=1234)
    arch = load_arch(hf_dir)
    packed_model = build_gpt(arch, mcfg, pcfg, pre_process=True, post_process=True)
    dense_model = build_gpt(arch, mcfg, pcfg, pre_process=True, post_process=True, core_attention=DotProductAttention)
    load_hf_into_model([packed_model, dense_model], arch, hf_dir, groups)
    layer = packed_model.decoder.layers[0].self_attention.core_attention
    assert isinstance(layer, PackedSegmentAttention)
    assert isinstance(dense_model.decoder.layers[0].self_attention.core_attention, DotProductAttention)

    samples = make_samples(6, seed=3)
    (mb,) = pack_micro_batches(samples, 1000, pad_to_multiple=PAD_MULTIPLE)
    T = mb.num_tokens
    out = {"num_segments": len(mb.cu_seqlens) - 1, "num_sequences": mb.num_sequences, "num_tokens": T}

    # the same upstream gradient on both models: sum(logits * w), w fixed per global vocab column
    torch.manual_seed(0)
    weights = torch.randn(T, 64 * 2)
    logits_p = model_forward(packed_model, mb)  # [T, V_local], THD, no mask
    mask = block_causal_mask(mb.cu_seqlens, T)
    logits_d = dense_model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=mask)[0]
    v_local = logits_p.shape[-1]
    w = weights[:, groups.tp_rank * v_local:(groups.tp_rank + 1) * v_local]
    (logits_p * w).sum().backward()
    (logits_d * w).sum().backward()
    out["logits_diff"] = float((_gather_tp(logits_p.detach(), groups) - _gather_tp(logits_d.detach(), groups))
                               .abs().max())
    grads_d = dict(dense_model.named_parameters())
    # relative to each gradient's own scale (fp32: the embedding's gradient sums T tokens' contributions)
    out["grad_diffs"] = {n: float((p.grad - grads_d[n].grad).abs().max() / grads_d[n].grad.abs().max())
                         for n, p in packed_model.named_parameters()}
    out["grad_scale"] = min(float(p.grad.abs().max()) for p in packed_model.parameters())

    # packed == unpacked: each sequence alone (one row, causal, no packed params)
    full = _gather_tp(logits_p.detach(), groups)
    diffs = []
    with torch.no_grad():
        for s in range(mb.num_sequences):
            a, b = int(mb.cu_seqlens[s]), int(mb.cu_seqlens[s + 1])
            ids = mb.tokens[:, a:b]
            if sp:  # SP needs the row divisible by TP: the sequence alone in a padded THD row
                single = pack_micro_batches([samples[int(mb.seq_index[a])]], 1000, pad_to_multiple=tp)[0]
                alone = _gather_tp(model_forward(packed_model, single), groups)[: b - a]
            else:
                alone = _gather_tp(packed_model(input_ids=ids, position_ids=mb.position_ids[:, a:b],
                                                attention_mask=None)[0], groups)
            diffs.append(float((alone - full[a:b]).abs().max()))
    out["alone_diff"] = max(diffs)
    return out


def _check(results):
    for r in results:
        assert r["num_segments"] == r["num_sequences"] + 1  # trailing padding segment
        assert r["num_sequences"] >= 4
        assert r["logits_diff"] <= 1e-5, r["logits_diff"]
        assert r["grad_scale"] > 1e-3  # every parameter gets a gradient
        bad = {n: d for n, d in r["grad_diffs"].items() if d > 1e-5}
        assert not bad, bad
        assert r["alone_diff"] <= 1e-5, r["alone_diff"]


def test_packed_attention_equals_dense_mask_tp1(hf_dir):
    _check(run_ranks(_compare, 1, hf_dir, 1, False))


@pytest.mark.parametrize("sp", [False, True])
def test_packed_attention_equals_dense_mask_tp2(hf_dir, sp):
    results = run_ranks(_compare, 2, hf_dir, 2, sp)
    _check(results)
    assert results[0]["logits_diff"] == pytest.approx(results[1]["logits_diff"], abs=1e-7)


def test_segment_attention_matches_reference_gqa_and_grads():
    """The module alone against a slow obvious reference: per-segment softmax with repeated KV heads."""
    from types import SimpleNamespace

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_srft.models.local_spec import PackedSegmentAttention

    torch.manual_seed(0)
    cfg = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=8, attention_dropout=0.0,
                          apply_query_key_layer_scaling=False, sequence_parallel=False, context_parallel_size=1)
    core = PackedSegmentAttention(cfg, layer_number=1, pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
    cu = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)  # the last segment stands for padding
    q = torch.randn(16, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    got = core(q, k, v, None, packed_seq_params=params)

    def reference(q, k, v):
        out = torch.zeros(16, 4, 8, dtype=torch.float64)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            for h in range(4):
                g = h // 2  # query heads 0,1 -> KV group 0; 2,3 -> 1
                for i in range(a, b):
                    s = torch.stack([q[i, h] @ k[j, g] for j in range(a, i + 1)]) * 8 ** -0.5
                    p = torch.softmax(s, 0)
                    out[i, h] = sum(p[j - a] * v[j, g] for j in range(a, i + 1))
        return out.reshape(16, 32)

    ref = reference(q, k, v)
    assert torch.allclose(got, ref, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((reference(q, k, v) * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12)
    # the unpacked path: one causal row equals one segment
    one = core(q[:10, None], k[:10, None], v[:10, None], None)  # [S, B=1, n, d] -> [S, 1, n*d]
    cu1 = torch.tensor([0, 10], dtype=torch.int32)
    p1 = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu1, cu_seqlens_kv=cu1, max_seqlen_q=10, max_seqlen_kv=10)
    assert torch.allclose(one[:, 0], core(q[:10], k[:10], v[:10], None, packed_seq_params=p1), atol=1e-12)


def _bf16_forward_backward(hf_dir):
    """A bf16 model (the shipped configs' dtype) through our spec, packed (THD) and unpacked; an fp32 twin with the
    same weights as reference."""
    from megatron_srft.config import ModelConfig, ParallelConfig
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_gpt
    from megatron_srft.models.local_spec import PackedSegmentAttention, RMSNorm
    from megatron_srft.models.mapping import load_hf_into_model
    from megatron_srft.training.batch import model_forward, pack_micro_batches

    pcfg = ParallelConfig()
    groups = init_distributed(pcfg, seed=1234)
    arch = load_arch(hf_dir)
    models = {name: build_gpt(arch, ModelConfig(params_dtype=name, transformer_impl="local",
                                                make_vocab_size_divisible_by=64), pcfg, pre_process=True,
                              post_process=True) for name in ("bf16", "fp32")}
    load_hf_into_model(list(models.values()), arch, hf_dir, groups)
    bf16 = models["bf16"]
    ours = [(n, m) for n, m in bf16.named_modules() if isinstance(m, (RMSNorm, PackedSegmentAttention))]
    out = {"param_dtypes": sorted({str(p.dtype) for p in bf16.parameters()}), "num_modules": len(ours),
           "module_out_dtypes": {}}
    for n, m in ours:
        m.register_forward_hook(lambda mod, args, res, n=n: out["module_out_dtypes"].setdefault(n, set()).add(
            str(res.dtype)))
    (mb,) = pack_micro_batches(make_samples(6, seed=3), 1000, pad_to_multiple=PAD_MULTIPLE)
    logits = {name: model_forward(m, mb) for name, m in models.items()}  # THD path
    out["logits_dtype"] = str(logits["bf16"].dtype)
    ref = logits["fp32"].detach()
    out["rel_diff"] = float((logits["bf16"].detach().float() - ref).abs().max() / ref.abs().max())
    logits["bf16"].float().square().mean().backward()
    out["grads"] = {n: (str(p.grad.dtype), bool(p.grad.isfinite().all()), float(p.grad.abs().max()))
                    for n, p in bf16.named_parameters()}
    a, b = int(mb.cu_seqlens[0]), int(mb.cu_seqlens[1])  # the unpacked path: one sequence, causal
    with torch.no_grad():
        alone = bf16(input_ids=mb.tokens[:, a:b], position_ids=mb.position_ids[:, a:b], attention_mask=None)[0]
    out["alone_dtype"] = str(alone.dtype)
    return out


def test_bf16_forward_backward_stays_in_bf16(hf_dir):
    """Every module of our spec returns the activation dtype: an fp32 result would reach a bf16 linear layer
    (``expected m1 and m2 to have the same dtype``). Logits stay close to the fp32 model's with the same weights."""
    (r,) = run_ranks(_bf16_forward_backward, 1, hf_dir)
    assert r["param_dtypes"] == ["torch.bfloat16"]
    assert r["num_modules"] == 2 * 3 + 1  # per layer: 2 norms + core attention; the final norm
    assert all(d == {"torch.bfloat16"} for d in r["module_out_dtypes"].values()), r["module_out_dtypes"]
    assert len(r["module_out_dtypes"]) == r["num_modules"]
    assert r["logits_dtype"] == r["alone_dtype"] == "torch.bfloat16"
    assert r["rel_diff"] <= 5e-2, r["rel_diff"]
    for n, (dtype, finite, scale) in r["grads"].items():
        assert dtype == "torch.bfloat16" and finite and scale > 0, (n, dtype, finite, scale)
