"""Loss metrics as (sum, count) pairs, so they reduce exactly across micro-batches and DP ranks.

Convention: a metric is ``name -> (sum, count)`` of 0-d fp32 tensors; its value is sum(sums) / sum(counts).
Names ending in ``_max`` are maxima instead: the count is 1 and they reduce with MAX (value = max of sums).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..distributed import collectives

MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]

__all__ = ["MetricSums", "is_max", "accumulate", "all_reduce_metrics", "finalize"]


def is_max(name: str) -> bool:
    return name.endswith("_max")


def accumulate(into: MetricSums, new: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> MetricSums:
    """Fold one micro-batch's metrics into ``into`` (in place; returns it). Detaches."""
    for name, (s, c) in new.items():
        s, c = s.detach().float(), c.detach().float()
        if name not in into:
            into[name] = (s.clone(), c.clone())
        elif is_max(name):
            into[name] = (torch.maximum(into[name][0], s), into[name][1])
        else:
            into[name] = (into[name][0] + s, into[name][1] + c)
    return into


def all_reduce_metrics(metrics: MetricSums, group: Optional[collectives.ProcessGroup] = None) -> MetricSums:
    """Reduce across ``group`` (e.g. DP): SUM for sums and counts, MAX for ``_max`` names. Two collectives.

    Every rank must hold the same metric names (srft_objective always emits the same set).
    """
    if group is None or collectives.world_size(group) == 1:
        return metrics
    names = sorted(metrics)
    summed = [n for n in names if not is_max(n)]
    maxed = [n for n in names if is_max(n)]
    out: MetricSums = {}
    if summed:
        t = torch.stack([torch.stack([metrics[n][0], metrics[n][1]]) for n in summed]).float()
        t = collectives.all_reduce(t, "sum", group)
        out.update({n: (t[i, 0], t[i, 1]) for i, n in enumerate(summed)})
    if maxed:
        t = torch.stack([metrics[n][0] for n in maxed]).float()
        t = collectives.all_reduce(t, "max", group)
        out.update({n: (t[i], metrics[n][1]) for i, n in enumerate(maxed)})
    return out


def finalize(metrics: MetricSums) -> dict[str, float]:
    """Plain floats: sum / count (NaN where count is 0, i.e. no tokens of that kind), max for ``_max``."""
    out = {}
    for name, (s, c) in metrics.items():
        if is_max(name):
            out[name] = float(s)
        else:
            out[name] = float(s / c) if float(c) != 0 else float("nan")
    return out
