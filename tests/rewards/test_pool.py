import os
import time

import pytest

from megatron_srft.data.dataset import load_problems
from megatron_srft.rewards.pool import RewardPool
from tests.eval_data import EVAL_DATA


def sleepy_reward(response, answer, *, require_think=False):
    """Module level so spawned workers can import it: 'hang' hangs, 'boom' raises, else exact."""
    if response == "hang":
        time.sleep(600)
    if response == "die":
        os._exit(3)
    if response == "boom":
        raise ValueError("verifier bug")
    return float(response == answer)


def test_every_math_eval_ground_truth_scores_one():
    probs = load_problems(f"{EVAL_DATA}/math_eval.parquet")
    responses = [f"<think>\nwork</think>\nThe answer is \\boxed{{{p.answer}}}" for p in probs]
    answers = [p.answer for p in probs]
    with RewardPool("math", timeout_s=30, num_workers=2, require_think=True) as pool:
        scores, num_timeouts = pool.score(responses, answers)
        assert num_timeouts == 0
        assert [p.source for p, s in zip(probs, scores) if s != 1.0] == []
        # and a wrong answer scores 0, through the same pool
        scores, _ = pool.score(["<think>x</think>\\boxed{204}", "\\boxed{204}", "<think>x</think>no box"],
                               ["205", "204", "204"])
        assert scores == [0.0, 0.0, 0.0]


def verify_only(response, answer, *, require_think=False):
    """math-verify itself, without the string quick path of math_score (module level for spawned workers)."""
    from math_verify import parse, verify

    from megatron_srft.rewards import extract_boxed

    return float(verify(parse("\\boxed{" + answer + "}"), parse("\\boxed{" + extract_boxed(response) + "}")))


def test_math_verify_accepts_ground_truths_themselves():
    """The quick path above short-cuts identical strings; here math-verify compares every 5th ground truth."""
    answers = [p.answer for p in load_problems(f"{EVAL_DATA}/math_eval.parquet")][::5]
    with RewardPool(verify_only, timeout_s=30, num_workers=2, require_think=False) as pool:
        scores, num_timeouts = pool.score([f"\\boxed{{{a}}}" for a in answers], answers)
    assert num_timeouts == 0 and [a for a, s in zip(answers, scores) if s != 1.0] == []


def test_timeout_kills_and_replaces_worker():
    with RewardPool(sleepy_reward, timeout_s=1.0, num_workers=2, require_think=False) as pool:
        t0 = time.monotonic()
        scores, num_timeouts = pool.score(["a", "hang", "b", "boom", "hang", "c"], ["a", "x", "x", "x", "x", "c"])
        assert time.monotonic() - t0 < 30
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0] and num_timeouts == 2
        assert pool.total_restarts == 2 and pool.total_timeouts == 2
        scores, num_timeouts = pool.score(["z"] * 5, ["z"] * 5)  # the replacements work
        assert scores == [1.0] * 5 and num_timeouts == 0


def test_pool_arguments():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardPool("nope", timeout_s=1, num_workers=1, require_think=False)
    with RewardPool("exact", timeout_s=5, num_workers=1, require_think=False) as pool:
        assert pool.score([], []) == ([], 0)
        with pytest.raises(ValueError, match="2 responses but 1 answers"):
            pool.score(["a", "b"], ["a"])



def test_dead_worker_is_replaced():
    """A worker that dies mid-sample (a crash, an OOM kill) costs that sample, not the run."""
    with RewardPool(sleepy_reward, timeout_s=30, num_workers=1, require_think=False) as pool:
        scores, num_failed = pool.score(["a", "die", "b"], ["a", "x", "b"])
        assert scores == [1.0, 0.0, 1.0] and num_failed == 1 and pool.total_restarts == 1


def test_workers_survive_the_trainers_stop_signals():
    """torchrun forwards SIGUSR1/SIGTERM to the trainer's whole process group, verifier workers included: they must
    ignore them (a killed worker turns its in-flight sample into a timeout with reward 0), while the trainer
    keeps its own handlers."""
    import signal

    from megatron_srft.signals import STOP_SIGNALS

    received = []
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in STOP_SIGNALS}
    try:
        with RewardPool(sleepy_reward, timeout_s=30, num_workers=2, require_think=False) as pool:
            assert pool.score(["a"], ["a"]) == ([1.0], 0)  # every worker has started
            for w in pool._workers:
                for sig in STOP_SIGNALS:
                    os.kill(w.proc.pid, sig)
            time.sleep(0.5)
            assert all(w.proc.is_alive() for w in pool._workers)
            assert pool.score(["a", "b", "c"], ["a", "b", "x"]) == ([1.0, 1.0, 0.0], 0)
            assert pool.total_restarts == 0
        for sig in STOP_SIGNALS:  # the handlers installed before the pool are still this process's
            os.kill(os.getpid(), sig)
        assert sorted(received) == sorted(STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
