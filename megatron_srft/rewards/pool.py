"""Verifier worker processes with a per-sample timeout.

math-verify runs sympy, which can take unbounded time on adversarial model output; a hung verifier must not
stall training. Each worker is a spawned process with its own pipe and takes one sample at a time; the parent
gives every dispatched sample a deadline (``timeout_s`` from dispatch). A sample past its deadline scores 0 and
is counted; its worker is killed and replaced. A worker that dies (crash, OOM kill) is treated the same way.
A verifier that raises scores 0 (broken output is a wrong answer, not a crashed run). Workers ignore the trainer's
stop signals (signals.py): torchrun forwards them to the whole process group, and a worker killed by one would
turn the step's in-flight samples into timeouts.

Usage::

    with RewardPool("math", timeout_s=10, num_workers=2, require_think=True) as pool:
        scores, num_timeouts = pool.score(responses, answers)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Union

from ..signals import children_ignore_stop_signals
from . import REWARDS

#: Seconds a fresh worker may take to import its verifier (sympy and math-verify take a few) before it counts
#: as broken. Not part of the per-sample timeout.
STARTUP_TIMEOUT_S = 300.0

RewardFn = Callable[..., float]


def _worker_main(conn: Connection, reward: Union[str, RewardFn], require_think: bool) -> None:
    """Worker loop: import the verifier, say ready, then answer (index, response, answer) -> (index, score)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if isinstance(reward, str):
        fn = REWARDS[reward]
        # warm the lazy imports (sympy, math-verify: seconds) before saying ready, so that they do not eat into
        # the first sample's timeout; 1/2 vs 0.5 misses the string quick path and reaches math-verify
        fn("\\boxed{\\frac{1}{2}}", "0.5", require_think=False)
    else:
        fn = reward
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, response, answer = msg
        try:
            score = float(fn(response, answer, require_think=require_think))
        except Exception:
            score = 0.0
        conn.send((idx, score))


class _Worker:
    def __init__(self, ctx, reward, require_think: bool):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, reward, require_think), daemon=True)
        with children_ignore_stop_signals():
            self.proc.start()
        child.close()
        self.ready = False
        self.started_at = time.monotonic()
        self.task: Optional[int] = None  # index of the sample it is scoring
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        self.conn.close()


class RewardPool:
    """``num_workers`` verifier processes for reward ``name`` (a key of ``REWARDS``, or a picklable module-level
    function ``fn(response, answer, *, require_think) -> float`` for code and tests).

    ``score(responses, answers) -> (scores, num_timeouts)``; the order of ``scores`` follows ``responses``.
    Counters over the pool's life: ``total_timeouts``, ``total_restarts``.
    """

    def __init__(self, name: Union[str, RewardFn], *, timeout_s: float, num_workers: int, require_think: bool):
        if isinstance(name, str) and name not in REWARDS:
            raise ValueError(f"train.reward: unknown reward '{name}' (expected one of {', '.join(REWARDS)})")
        if timeout_s <= 0:
            raise ValueError(f"train.reward_timeout_s: expected > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"train.reward_workers: expected >= 1, got {num_workers}")
        self.reward, self.timeout_s, self.require_think = name, float(timeout_s), bool(require_think)
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, name, self.require_think) for _ in range(num_workers)]
        self.total_timeouts = 0
        self.total_restarts = 0
        self._closed = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(timeout=2)
            w.kill()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx, self.reward, self.require_think)
        self.total_restarts += 1

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, responses: list[str], answers: list[str]) -> tuple[list[float], int]:
        """Score every (response, answer) pair; a sample that times out (or kills its worker) scores 0."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        if len(responses) != len(answers):
            raise ValueError(f"score: {len(responses)} responses but {len(answers)} answers")
        scores = [0.0] * len(responses)
        pending = list(range(len(responses) - 1, -1, -1))  # a stack popped from the end: index order
        num_done, num_timeouts = 0, 0
        while num_done < len(responses):
            now = time.monotonic()
            for i, w in enumerate(self._workers):  # hand work to idle, ready workers
                if w.ready and w.task is None and pending:
                    idx = pending.pop()
                    try:
                        w.conn.send((idx, responses[idx], answers[idx]))
                    except (OSError, BrokenPipeError):
                        pending.append(idx)
                        self._replace(i)
                        continue
                    w.task, w.deadline = idx, now + self.timeout_s
            deadlines = [w.deadline if w.task is not None else w.started_at + STARTUP_TIMEOUT_S
                         for w in self._workers if w.task is not None or not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.05
            ready_conns = wait([w.conn for w in self._workers], timeout=min(wait_s, 1.0))
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.conn in ready_conns:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the worker died
                        if not w.ready:  # before its first sample: a broken verifier, not a bad sample
                            w.proc.join(timeout=5)
                            raise RuntimeError(f"reward worker for '{self.reward}' exited during start-up "
                                               f"(exit code {w.proc.exitcode}); see its traceback above")
                        if w.task is not None:
                            num_done, num_timeouts = num_done + 1, num_timeouts + 1
                        self._replace(i)
                        continue
                    tag, value = msg
                    if tag == "ready":
                        w.ready = True
                    elif w.task is not None and tag == w.task:
                        scores[tag] = value
                        num_done += 1
                        w.task = None
                elif w.task is not None and now >= w.deadline:
                    num_done, num_timeouts = num_done + 1, num_timeouts + 1  # scores[w.task] stays 0
                    self._replace(i)
                elif not w.ready and now - w.started_at > STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"reward worker for '{self.reward}' did not start within "
                                       f"{STARTUP_TIMEOUT_S:.0f} s")
        self.total_timeouts += num_timeouts
        return scores, num_timeouts
