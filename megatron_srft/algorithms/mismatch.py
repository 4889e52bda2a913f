"""Engine/trainer log-prob mismatch: monitoring, and the truncated importance-sampling (TIS) correction.

The rollout engine (vLLM) and the trainer (Megatron) compute the same policy with different kernels, so the
log-prob of a sampled token differs slightly between them (more in bf16 than in fp32). The on-policy
surrogate uses ratio = pi_theta / pi_old with pi_old scored by the trainer, but the tokens were sampled from
the engine's pi_engine; TIS re-weights each token by

    w_t = min( pi_old(y_t) / pi_engine(y_t), C ) = exp( min(logp_old_t - logp_engine_t, log C) )

(a stop-gradient constant), which corrects the sampling mismatch and bounds the variance by C.
Pure tensor functions; a process group may be passed to reduce the statistics over data-parallel ranks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..distributed import collectives


def mismatch_stats(engine_logprob: torch.Tensor, trainer_logprob: torch.Tensor, mask: torch.Tensor,
                   group: Optional[collectives.ProcessGroup] = None) -> dict:
    """Statistics of d_t = logp_engine_t - logp_trainer_t over the tokens where ``mask`` is true.

    engine_logprob, trainer_logprob, mask: [T] (or any equal shape; flattened). With ``group`` the statistics
    are over the tokens of all its ranks. Returns floats:
      abs_diff_mean = sum|d| / N,  abs_diff_max = max|d|,  diff_mean = sum d / N (sign: engine - trainer),
      kl_k3 = sum(exp(-d) - 1 + d) / N  (the k3 estimator of KL(pi_engine || pi_trainer) from engine samples),
      num_tokens = N.  With N = 0 every statistic is 0.
    """
    if engine_logprob.shape != trainer_logprob.shape or engine_logprob.shape != mask.shape:
        raise ValueError(f"mismatch_stats: shapes differ: engine {tuple(engine_logprob.shape)}, trainer "
                         f"{tuple(trainer_logprob.shape)}, mask {tuple(mask.shape)}")
    m = mask.reshape(-1).bool()
    d = (engine_logprob.reshape(-1).double() - trainer_logprob.reshape(-1).double())[m]
    sums = torch.stack([d.abs().sum(), d.sum(), (torch.exp(-d) - 1 + d).sum(),
                        torch.tensor(float(d.numel()), dtype=torch.float64)])
    amax = d.abs().max() if d.numel() else torch.zeros((), dtype=torch.float64)
    amax = amax.reshape(1).clone()
    if group is not None:
        sums = collectives.all_reduce(sums, "sum", group)
        amax = collectives.all_reduce(amax, "max", group)
    n = float(sums[3])
    denom = max(n, 1.0)
    return {
        "abs_diff_mean": float(sums[0]) / denom,
        "abs_diff_max": float(amax[0]),
        "diff_mean": float(sums[1]) / denom,
        "kl_k3": float(sums[2]) / denom,
        "num_tokens": int(n),
    }


def mismatch_sums(engine_logprob: torch.Tensor, trainer_logprob: torch.Tensor,
                  mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The mismatch of one micro-batch as (sum, count) metrics (algorithms/metrics.py), accumulated on the device
    and reduced exactly over micro-batches and DP ranks: ``mismatch_abs_mean`` (|d|), ``mismatch_abs_max``,
    ``mismatch_kl_k3`` (exp(-d) - 1 + d), d = logp_engine - logp_trainer over ``mask`` (rollout loss tokens)."""
    m = mask.reshape(-1).bool()
    d = engine_logprob.reshape(-1).double() - trainer_logprob.reshape(-1).detach().double()
    d = torch.where(m, d, torch.zeros_like(d))
    count = m.sum().float()
    absd = d.abs()
    one = torch.ones((), device=d.device)
    return {"mismatch_abs_mean": (absd.sum().float(), count),
            "mismatch_abs_max": (absd.max().float() if d.numel() else 0 * one, one),
            "mismatch_kl_k3": ((torch.exp(-d) - 1 + d).sum().float(), count)}


def truncated_is_weights(trainer_old_logprob: torch.Tensor, engine_logprob: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """TIS weights w = min(exp(logp_old - logp_engine), cap), same shape as the inputs, no gradient.

    Computed as exp(min(logp_old - logp_engine, log cap)) so that a large difference never overflows.
    Positions that are padding in both inputs should be masked by the caller (their value is meaningless).
    """
    if cap < 1:
        raise ValueError(f"truncated_is_weights: cap must be >= 1, got {cap}")
    if trainer_old_logprob.shape != engine_logprob.shape:
        raise ValueError(f"truncated_is_weights: shapes differ: {tuple(trainer_old_logprob.shape)} vs "
                         f"{tuple(engine_logprob.shape)}")
    with torch.no_grad():
        diff = trainer_old_logprob.detach().float() - engine_logprob.detach().float()
        return torch.exp(torch.clamp(diff, max=math.log(cap)))
