"""kill -9 of one of two torchrun ranks while it writes a checkpoint: the resume takes the last complete
checkpoint and repeats the uninterrupted run's metrics, and no process of the killed rank is left behind (the
checkpoint writers it forked die with it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.toy_run import toy_overrides

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
COMPARED = ("loss/total", "optim/grad_norm", "loss/sft")


def _torchrun(toy, run: Path, log: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "SRFT_DEBUG"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    overrides = toy_overrides(toy, run, STEPS, ["parallel.tensor_model_parallel_size=2",
                                                "checkpoint.keep_last=10"])
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={port}", "-m", "megatron_srft", "train", *overrides],
                            env=env, cwd=run.parent, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: {k: r[k] for k in COMPARED if k in r} for r in rows}


def _rank(agent, rank: int):
    for p in agent.children():
        try:
            if p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    return None


def _forked_child(parent):
    """A child forked by ``parent`` (same command line): Megatron's checkpoint writer, alive only during a save."""
    try:
        cmd = parent.cmdline()
        children = parent.children()
    except psutil.Error:
        return None
    for c in children:
        try:
            if c.cmdline() == cmd and c.status() != psutil.STATUS_ZOMBIE:
                return c
        except psutil.Error:
            continue
    return None


def _descendants(p) -> list:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _complete_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit()
                  and (p / "srft_manifest.json").is_file()) if root.is_dir() else []


def test_kill_9_of_one_rank_during_a_save_then_resume(toy, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _torchrun(toy, full, tmp_path / "full.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]

    proc = _torchrun(toy, killed, tmp_path / "killed.log")
    agent = psutil.Process(proc.pid)
    victim, writer, deadline = None, None, time.monotonic() + 600
    while writer is None and proc.poll() is None and time.monotonic() < deadline:
        victim = victim or _rank(agent, 1)
        if victim is not None and _complete_steps(killed):  # a checkpoint exists: kill during a later save
            writer = _forked_child(victim)
        time.sleep(0.002)
    assert writer is not None, "no save observed: " + (tmp_path / "killed.log").read_text()[-3000:]
    left_behind = _descendants(victim)
    before = _complete_steps(killed)
    os.kill(victim.pid, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    time.sleep(3)
    alive = [p for p in left_behind if _alive(p)]
    for p in alive:  # never leave them behind, whatever the test says
        p.kill()
    assert alive == [], [(p.pid, " ".join(p.cmdline())[:300]) for p in alive]

    last_good = max(before)
    proc = _torchrun(toy, killed, tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    out = (tmp_path / "resumed.log").read_text()
    assert f"from {killed / 'checkpoints'}/step_{last_good:06d}" in out, out[-3000:]
    assert _rows(killed) == _rows(full)
