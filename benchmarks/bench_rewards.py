"""Reward pool throughput: the ``math`` verifier (math-verify) in worker processes on real benchmark answers.

``run() -> dict``: every ground truth of data/eval/math_eval.parquet (2019 problems, the paper's five
math benchmarks) answered as ``<think>..</think> \\boxed{gt}`` (all correct; mostly the string quick path) and
as the wrong boxed answer 12345 (every item goes through math-verify), scored with 2 workers: items per second, worker start-up seconds, and the number of timeouts (expected 0).
"""

from __future__ import annotations

import time
from pathlib import Path

DATA = str(Path(__file__).resolve().parents[1] / "data" / "eval" / "math_eval.parquet")


def run(num_workers: int = 2) -> dict:
    from megatron_srft.data.dataset import load_problems
    from megatron_srft.rewards.pool import RewardPool

    probs = load_problems(DATA)
    answers = [p.answer for p in probs]
    right = [f"<think>\nwork</think>\nSo the answer is \\boxed{{{a}}}." for a in answers]
    wrong = ["<think>\nwork</think>\nSo the answer is \\boxed{12345}." for _ in answers]
    t0 = time.perf_counter()
    with RewardPool("math", timeout_s=10, num_workers=num_workers, require_think=True) as pool:
        pool.score(["\\boxed{1}"], ["1"])  # waits for the workers to start
        startup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores_right, to_right = pool.score(right, answers)
        t2 = time.perf_counter()
        scores_wrong, to_wrong = pool.score(wrong, answers)
        t3 = time.perf_counter()
    return {
        "reward_math_num_workers": num_workers,
        "reward_math_startup_s": round(startup_s, 2),
        "reward_math_correct_items_per_s": round(len(right) / (t2 - t1), 1),
        "reward_math_wrong_items_per_s": round(len(wrong) / (t3 - t2), 1),
        "reward_math_correct_accuracy": sum(scores_right) / len(right),
        "reward_math_wrong_accuracy": sum(scores_wrong) / len(wrong),
        "reward_math_timeouts": to_right + to_wrong,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
