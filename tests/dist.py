"""Run a function on N gloo ranks (real torch.distributed, real Megatron parallel state).

``run_ranks(fn, world_size, *args)`` starts processes with torchrun's environment variables set and returns
each rank's return value (picklable), re-raising the first rank failure with its traceback.

The ranks are forked from a multiprocessing forkserver that imported torch, Megatron-core, transformers and vLLM
once per test session (:data:`PRELOAD`): a spawned rank spends 10-15 s of CPU importing them, which was most of
the suite's time. Each rank still starts from a clean interpreter state (nothing has run in the server but imports)
and takes the parent's current environment and working directory, as a spawned one would.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Imported once in the forkserver (not run: importing only). Heavy third-party modules and our package's.
PRELOAD = ["torch", "megatron.core", "megatron.core.optimizer", "megatron.core.pipeline_parallel",
           "megatron.core.models.gpt", "megatron.core.dist_checkpointing", "transformers", "safetensors.torch",
           "vllm", "vllm.entrypoints.llm", "megatron_srft.training.loop", "megatron_srft.rollout.vllm_engine",
           "megatron_srft.checkpoint.dist", "megatron_srft.models.builder"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first run_ranks of a session)
    return ctx


def _entry(rank, world_size, port, fn, args, queue, collected, env, cwd):
    os.environ.clear()
    os.environ.update(env)  # the parent's environment now, not the server's at its start
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args)
        queue.put((rank, True, result))
        # Tensors travel through shared memory owned by this process: stay alive until the parent has them.
        collected.wait(timeout=120)
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_srft.distributed import groups as parallel

            parallel.destroy()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0):
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; their return values, in rank order.

    The rendezvous port is picked free and released before the ranks bind it; another process on the machine can
    take it in between (EADDRINUSE while the ranks start their world). Only that failure is retried, once."""
    try:
        return _run_ranks(fn, world_size, *args, timeout=timeout)
    except AssertionError as e:
        if "EADDRINUSE" not in str(e) or "_entry" not in str(e):
            raise
        return _run_ranks(fn, world_size, *args, timeout=timeout)


def _run_ranks(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = _context()
    queue = ctx.Queue()
    collected = ctx.Event()
    port = _free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, collected, env, cwd))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError(errors[0])
    return [results[r] for r in range(world_size)]
