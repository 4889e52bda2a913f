"""GPU tier: `srft check --quick` on this machine's GPUs (2 ranks under torchrun where 2 GPUs are present, else
1): exit 0, no FAIL, and SKIP exactly where the skip rules (check.skip_reason) say: vLLM or Transformer Engine
absent, a card that cannot run the FP8 recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.check.test_check import LINE
from tests.gpu.test_training_gpu import gpu_world

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def test_check_quick_on_gpu(tmp_path):
    from megatron_srft.check.context import skip_reason

    out = tmp_path / "check.json"
    world = gpu_world()
    cmd = [sys.executable, "-m", "megatron_srft", "check", "--quick", "--out", str(out)]
    if world > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--nproc-per-node", str(world), "-m", "megatron_srft"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=str(REPO))
    log = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    status = {m.group(1): (m.group(3), m.group(4)) for m in map(LINE.match, proc.stdout.splitlines()) if m}
    assert not [k for k, (s, _) in status.items() if s == "FAIL"], log
    for cid in ("1a", "1b", "1c", "3a", "4"):
        assert status[cid][0] == "PASS", log
    assert status["2"][0] == ("PASS" if world > 1 else "SKIP"), log
    te = importlib.util.find_spec("transformer_engine") is not None
    if importlib.util.find_spec("vllm") is None:
        assert status["5"] == ("SKIP", skip_reason("5", True, vllm=False)), log
    else:
        assert all(status[c][0] == "PASS" for c in ("5a", "5b", "5c")), log
    if not te:
        assert status["6"] == ("SKIP", skip_reason("6", True, te=False)), log
    else:
        assert status["6a"][0] == "PASS", log
        fp8 = skip_reason("6b", True, te=True, capability=tuple(torch.cuda.get_device_capability()))
        assert status["6b"] == (("SKIP", fp8) if fp8 else ("PASS", status["6b"][1])), log
    entry = json.loads(out.read_text())[0]
    assert entry["card"] == torch.cuda.get_device_name(0) and entry["summary"]["FAIL"] == 0
