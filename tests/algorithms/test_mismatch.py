"""Mismatch statistics and TIS weights against slow, obvious references (pure tensor math)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_srft.algorithms.mismatch import mismatch_stats, truncated_is_weights
from tests.dist import run_ranks


def _reference(eng, tr, mask):
    diffs = [float(e) - float(t) for e, t, m in zip(eng.tolist(), tr.tolist(), mask.tolist()) if m]
    n = len(diffs)
    if n == 0:
        return {"abs_diff_mean": 0.0, "abs_diff_max": 0.0, "diff_mean": 0.0, "kl_k3": 0.0, "num_tokens": 0}
    return {"abs_diff_mean": sum(abs(d) for d in diffs) / n, "abs_diff_max": max(abs(d) for d in diffs),
            "diff_mean": sum(diffs) / n, "kl_k3": sum(math.exp(-d) - 1 + d for d in diffs) / n, "num_tokens": n}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mismatch_stats_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    tr = -torch.rand(50, generator=g) * 5
    eng = tr + 0.01 * torch.randn(50, generator=g)
    mask = torch.rand(50, generator=g) > 0.3
    got, ref = mismatch_stats(eng, tr, mask), _reference(eng, tr, mask)
    assert got["num_tokens"] == ref["num_tokens"]
    for k in ("abs_diff_mean", "abs_diff_max", "diff_mean", "kl_k3"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), k


def test_mismatch_stats_edge_cases():
    z = torch.zeros(4)
    none = torch.zeros(4, dtype=torch.bool)
    assert mismatch_stats(z, z, none) == _reference(z, z, none)
    masked_out_big = mismatch_stats(torch.tensor([0.0, -100.0]), torch.tensor([0.0, 0.0]), torch.tensor([1, 0]))
    assert masked_out_big["abs_diff_max"] == 0.0  # masked positions never count
    with pytest.raises(ValueError, match="shapes differ"):
        mismatch_stats(torch.zeros(3), torch.zeros(4), torch.ones(3))


def test_truncated_is_weights_reference():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, 0.0])
    eng = torch.tensor([-1.5, -1.0, -0.5, -30.0, -1e-3])
    cap = 2.0
    w = truncated_is_weights(old, eng, cap)
    ref = torch.tensor([min(math.exp(o - e), cap) for o, e in zip(old.tolist(), eng.tolist())])
    torch.testing.assert_close(w, ref)
    assert not w.requires_grad
    x = old.clone().requires_grad_(True)
    assert not truncated_is_weights(x, eng, cap).requires_grad  # a constant weight: no gradient flows
    assert torch.isfinite(truncated_is_weights(torch.tensor([0.0]), torch.tensor([-1e4]), 5.0)).all()
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, eng, 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        truncated_is_weights(old, eng[:2], cap)


def _group_fn(seed):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed)
    eng, tr = torch.randn(2, 30, generator=g), torch.randn(2, 30, generator=g)
    mask = torch.rand(2, 30, generator=g) > 0.5
    got = mismatch_stats(eng[rank], tr[rank], mask[rank], group=dist.group.WORLD)
    dist.destroy_process_group()
    return got, _reference(eng.reshape(-1), tr.reshape(-1), mask.reshape(-1))


def test_mismatch_stats_reduces_over_group():
    for got, ref in run_ranks(_group_fn, 2, 5):
        assert got["num_tokens"] == ref["num_tokens"]
        for k in ("abs_diff_mean", "abs_diff_max", "diff_mean", "kl_k3"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5), k
