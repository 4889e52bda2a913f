"""Training runs of several local ranks for the experiments (a disaggregated placement needs a training rank and
an engine rank): `srft train` under torchrun in a subprocess, as a user launches it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ..errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_ranks(overrides: list[str], num_ranks: int, log_path: Path) -> None:
    """`srft train key=value ...` on ``num_ranks`` local processes (torchrun, one thread each); its output goes to
    ``log_path``. A failed run raises a UserError with the log's last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "LOCAL_WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "megatron_srft", "train",
           *overrides]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
        raise UserError(f"{num_ranks}-rank training failed (exit {code}; {log_path}): {lines[-1] if lines else ''}")
