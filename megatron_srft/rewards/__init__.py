"""Verifiable rewards: one table, ``REWARDS[name](response, answer, *, require_think) -> float in {0, 1}``.

- ``math``: math-verify on the last ``\\boxed{}`` of the answer (after ``</think>`` when ``require_think``).
- ``exact``: exact string match of that boxed answer (synthetic tasks such as the toy).

:class:`~megatron_srft.rewards.pool.RewardPool` runs either in worker processes with a per-sample timeout.
"""

from __future__ import annotations

from .exact import exact_score
from .math import answer_part, extract_boxed, math_score

REWARDS = {"math": math_score, "exact": exact_score}


def __getattr__(name):  # lazy: pool.py imports REWARDS from here (a cycle), and config checks need no multiprocessing
    if name == "RewardPool":
        from .pool import RewardPool

        return RewardPool
    raise AttributeError(name)


__all__ = ["REWARDS", "RewardPool", "answer_part", "extract_boxed", "exact_score", "math_score"]
