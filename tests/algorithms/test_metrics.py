"""(sum, count) metrics: accumulate, DP all-reduce (2 gloo ranks), finalize."""

from __future__ import annotations

import math

import torch

from megatron_srft.algorithms.metrics import accumulate, all_reduce_metrics, finalize
from tests.dist import run_ranks


def _m(s, c):
    return torch.tensor(float(s)), torch.tensor(float(c))


def test_accumulate_and_finalize():
    acc = accumulate({}, {"a": _m(3, 2), "w_max": _m(5, 1), "e": _m(0, 0)})
    accumulate(acc, {"a": _m(1, 2), "w_max": _m(2, 1), "e": _m(0, 0)})
    out = finalize(acc)
    assert out["a"] == 1.0 and out["w_max"] == 5.0 and math.isnan(out["e"])


def _rank(_):
    import torch.distributed as dist

    from megatron_srft.config import ParallelConfig
    from megatron_srft.distributed.groups import init_distributed

    groups = init_distributed(ParallelConfig(backend="gloo"))
    r = dist.get_rank()
    m = {"a": _m(r + 1, 1), "x_max": _m(10 * r, 1)}
    return finalize(all_reduce_metrics(m, groups.dp_group))


def test_all_reduce_over_dp():
    for out in run_ranks(_rank, 2, None):
        assert out == {"a": 1.5, "x_max": 10.0}
