"""Run a function on N gloo ranks (real torch.distributed, real Megatron parallel state).

``run_ranks(fn, world_size, *args)`` spawns processes with torchrun's environment variables set and returns
each rank's return value (picklable), re-raising the first rank failure with its traceback.
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


def _entry(rank, world_size, port, fn, args, queue, collected):
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
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; their return values, in rank order.

    The rendezvous port is picked free and released before the ranks bind it; another process on the machine can
    take it in between (EADDRINUSE while the ranks start their world). Only that failure is retried, once."""
    try:
        return _run_ranks(fn, world_size, *args, timeout=timeout)
    except AssertionError as e:
        if "EADDRINUSE" not in str(e) or "_entry" not in str(e):
            raise
        return _run_ranks(fn, world_size, *args, timeout=timeout)


def _run_ranks(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    collected = ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, collected))
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
