"""The SRFT objective through the Megatron adapter is layout-invariant: loss, grad norm and the updated weights
of one optimizer step agree between DP=2 and DP=1 with gradient accumulation, PP=2 and PP=1, TP=2 and TP=1,
TP=2 with and without sequence parallelism, and packed and padded micro-batches (fp32, tiny Qwen2, gloo ranks;
see tests/training/harness.py).
"""

import numpy as np
import pytest

from tests.dist import run_ranks
from tests.training.harness import make_model_dir, make_samples, run_layout

BUDGET = 40


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_qwen2_step"))


@pytest.fixture(scope="module")
def samples():
    return make_samples(8, seed=1)


def _run(hf_dir, samples, tp, pp, packing=True, preset="srft", algo_overrides=None):
    return run_layout(hf_dir, tp, pp, samples, BUDGET, packing=packing, preset=preset, algo_overrides=algo_overrides)


def _full_and_single(hf_dir, samples, tp, pp):
    # the second run has one sample: at DP=2 one rank has no data and trains an empty micro-batch
    return _run(hf_dir, samples, tp, pp), _run(hf_dir, samples[:1], tp, pp)


@pytest.fixture(scope="module")
def references(hf_dir, samples):
    (refs,) = run_ranks(_full_and_single, 1, hf_dir, samples, 1, 1)
    assert refs[0]["num_micro_batches"] >= 2
    return refs


@pytest.fixture(scope="module")
def reference(references):
    return references[0]


def _assert_same(ref, got, atol=1e-5):
    for key in ("loss", "grad_norm", "loss_sft", "loss_demo_rl", "loss_rl_pos", "loss_rl_neg", "entropy_demo",
                "clip_frac", "w_sft_max"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-6), key
    for name, p in ref["params"].items():
        diff = float(np.abs(got["params"][name] - p).max())
        assert diff <= atol, f"{name}: max abs diff {diff:.3g} after one optimizer step"


def test_reference_is_not_vacuous(reference):
    m = reference["metrics"]
    assert m["grad_norm"] > 1e-4
    # every SRFT term is present in this mini-batch (demos, positive and negative rollouts, some clipping)
    for key in ("loss_sft", "loss_demo_rl", "loss_rl_pos", "loss_rl_neg"):
        assert abs(m[key]) > 1e-6, key
    assert 0.0 < m["clip_frac"] < 1.0
    assert m["loss"] == pytest.approx(m["loss_total"], rel=1e-6)


def test_dp2_equals_dp1_grad_accumulation(references, hf_dir, samples):
    results = run_ranks(_full_and_single, 2, hf_dir, samples, 1, 1)
    full, single = [r[0] for r in results], [r[1] for r in results]
    assert full[0]["dp_size"] == 2
    assert full[0]["metrics"]["loss"] == pytest.approx(full[1]["metrics"]["loss"], rel=1e-7)
    _assert_same(references[0], full[0])
    assert sorted(r["num_micro_batches"] for r in single) == [0, 1]  # a DP rank without data joins in
    keys = ("loss", "grad_norm", "loss_sft")
    assert {k: single[0]["metrics"][k] for k in keys} == pytest.approx(
        {k: references[1]["metrics"][k] for k in keys}, rel=1e-5)
    for name, p in references[1]["params"].items():
        assert float(np.abs(single[0]["params"][name] - p).max()) <= 1e-5, name


def test_pp2_equals_pp1(reference, hf_dir, samples):
    results = run_ranks(_run, 2, hf_dir, samples, 1, 2)
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"], rel=1e-7, nan_ok=True)
    _assert_same(reference, results[0])


def test_tp2_equals_tp1(reference, hf_dir, samples):
    results = run_ranks(_run, 2, hf_dir, samples, 2, 1)
    _assert_same(reference, results[0])


def _packed_and_padded(hf_dir, samples):
    # srft_code (token sum / 8192, p/(p+0.1), exp(+H)) with the batch-mean entropy reading: its mean H comes
    # from an extra forward pass inside train_minibatch and must not depend on the layout either
    over = {"entropy_granularity": "batch_mean"}
    return [_run(hf_dir, samples, 1, 1, packing=p, preset="srft_code", algo_overrides=over) for p in (True, False)]


def test_packed_equals_padded(reference, hf_dir, samples):
    # the srft reference is packed; padded: one sequence per micro-batch, padded to the longest
    (padded,) = run_ranks(_run, 1, hf_dir, samples, 1, 1, False)
    assert padded["num_micro_batches"] == len(samples)
    _assert_same(reference, padded)
    for k, v in reference["seq_logprobs"].items():
        assert np.allclose(padded["seq_logprobs"][k], v, atol=1e-5, rtol=0), k
    # and with the released code's preset plus batch-mean entropy
    packed_code, padded_code = run_ranks(_packed_and_padded, 1, hf_dir, samples)[0]
    assert packed_code["num_micro_batches"] < padded_code["num_micro_batches"]
    assert packed_code["metrics"]["loss"] != pytest.approx(reference["metrics"]["loss"], rel=1e-3)
    _assert_same(packed_code, padded_code)


def _old_logprob_saving_and_nonfinite(hf_dir, samples):
    """Single update per rollout batch: pi_old from a separate forward pass vs the training forward's own log-prob
    (detached). Then a non-finite loss (NaN advantages): the update is skipped and the weights stay as they were."""
    import dataclasses

    import torch

    from megatron_srft.algorithms.presets import resolve
    from megatron_srft.config import AlgorithmConfig
    from megatron_srft.training.batch import pack_micro_batches
    from megatron_srft.training.step import forward_logprobs, train_minibatch
    from tests.training.harness import full_params, setup_rank, to_numpy

    settings = resolve(AlgorithmConfig(preset="srft"))
    out = {}
    for mode in ("recomputed", "own_forward", "engine"):
        groups, handle, opt, arch = setup_rank(hf_dir, 1, 1)
        mbs = pack_micro_batches(samples, BUDGET)
        if mode == "recomputed":
            for mb, (lp, _) in zip(mbs, forward_logprobs(handle.chunks, mbs, groups, arch.vocab_size)):
                mb.old_logprob = lp
        elif mode == "own_forward":
            for mb in mbs:
                mb.old_logprob = None
        else:  # train.old_logprobs = engine, with an engine that agrees with the trainer exactly
            for mb, (lp, _) in zip(mbs, forward_logprobs(handle.chunks, mbs, groups, arch.vocab_size)):
                mb.engine_logprob, mb.old_logprob, mb.old_from_engine = lp, lp, True
        metrics = train_minibatch(handle.chunks, opt, mbs, settings, groups, arch.vocab_size)
        out[mode] = {"metrics": metrics, "params": full_params(handle, arch, groups)}

    groups, handle, opt, arch = setup_rank(hf_dir, 1, 1)
    before = full_params(handle, arch, groups)
    mbs = pack_micro_batches([dataclasses.replace(s, advantage=float("nan")) for s in samples], BUDGET)
    metrics = train_minibatch(handle.chunks, opt, mbs, settings, groups, arch.vocab_size)
    after = full_params(handle, arch, groups)
    out["nonfinite"] = {"metrics": metrics, "unchanged": all(torch.equal(before[n], after[n]) for n in before)}
    return to_numpy(out)


def test_old_logprob_saving_and_nonfinite_guard(hf_dir, samples):
    (res,) = run_ranks(_old_logprob_saving_and_nonfinite, 1, hf_dir, samples)
    a = res["recomputed"]
    for b in (res["own_forward"], res["engine"]):
        for key in ("loss", "grad_norm", "loss_rl_pos", "loss_rl_neg", "ratio_mean", "clip_frac"):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-6, abs=1e-7), key
        assert b["metrics"]["ratio_max"] == pytest.approx(1.0, abs=1e-6)  # pi_old = pi_theta in value
        for name, p in a["params"].items():
            assert float(np.abs(b["params"][name] - p).max()) <= 1e-6, name
    assert res["engine"]["metrics"]["mismatch_abs_mean"] <= 1e-6  # logged in engine mode too
    bad = res["nonfinite"]
    assert bad["metrics"]["num_skipped"] == 1.0 and bad["unchanged"]


def _sp_on_and_off(hf_dir, samples):
    return [run_layout(hf_dir, 2, 1, samples, BUDGET, preset="srft", sequence_parallel=sp)
            for sp in (True, False)]


def test_sequence_parallel_equals_tp2_without_it(reference, hf_dir, samples):
    (sp0, plain0), (sp1, _) = run_ranks(_sp_on_and_off, 2, hf_dir, samples)
    _assert_same(plain0, sp0)
    _assert_same(reference, sp0)
    # Under SP each TP rank's norms see half of the sequence; the norm weights carry sequence_parallel=True, so
    # finalize_model_grads sums their gradients over TP: both ranks hold the whole-sequence gradient.
    assert sp0["norm_grads"] and set(sp0["norm_grads"]) == set(plain0["norm_grads"])
    for name, (grad, flagged) in sp0["norm_grads"].items():
        plain, plain_flagged = plain0["norm_grads"][name]
        assert flagged and not plain_flagged, name
        scale = float(np.abs(plain).max())
        assert scale > 1e-6, name
        assert float(np.abs(grad - plain).max()) <= 1e-5 * scale, name
        assert np.array_equal(grad, sp1["norm_grads"][name][0]), name
