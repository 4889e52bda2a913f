"""Run megatron-core on CPU (gloo) by redirecting its hard-coded CUDA calls.

This is the only module in the package that knows about the CPU path. It is switched on by
:func:`enable` only when ``torch.cuda.is_available()`` is False, and is a no-op otherwise.

Megatron-core 0.16 reaches for CUDA in four ways; each has one redirect here:

1. tensor factories with ``device="cuda"`` / ``torch.cuda.current_device()`` and ``Tensor.cuda()``:
   a :class:`torch.overrides.TorchFunctionMode` rewrites CUDA devices to CPU;
2. ``torch.cuda.current_device`` (returns the CPU device) / ``synchronize`` / streams / events: patched to CPU
   no-ops;
3. the CUDA RNG tracker (``torch.cuda.get_rng_state`` and megatron's ``_set_cuda_rng_state``):
   mapped onto the CPU generator so dropout/init under the tracker stay deterministic;
4. type checks such as ``param.grad.type() == 'torch.cuda.FloatTensor'`` in ``clip_grads``:
   ``Tensor.type()`` reports CPU float tensors under their CUDA names.

A TorchFunctionMode sees every torch call and costs Python time per op, so benchmarks that time CPU
kernels measure with and without it (see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False
_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes ``Tensor.cuda()`` the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda") else name
        if "device" in kwargs:
            dev = kwargs["device"]
            if _is_cuda_device(dev) or (isinstance(dev, int) and not isinstance(dev, bool)):
                kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.to:
            # .to(0) / .to("cuda") / .to(torch.device("cuda")): positional device argument.
            args = tuple(
                torch.device("cpu")
                if _is_cuda_device(a) or (isinstance(a, int) and not isinstance(a, bool))
                else a
                for a in args
            )
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def query(self):
        return True


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device, not the index 0: autograd runs backward() without the function mode on the stack, so Megatron's
    # backward-time allocations (sequence parallelism's reduce-scatter/all-gather buffers,
    # ``torch.empty(..., device=torch.cuda.current_device())``) must get a CPU device from this call alone.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Megatron's RNG tracker seeds 'CUDA' generators per parallel region; give it the CPU generator.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0


def _patch_megatron_rng() -> None:
    """Megatron's RNG tracker swaps CUDA generator states; map them onto the CPU generator."""
    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._set_cuda_rng_state = _set_state
    if hasattr(mrandom, "_get_cuda_rng_state"):
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()


def enable() -> bool:
    """Switch the CPU layer on if (and only if) CUDA is absent. Returns whether it is active."""
    global _enabled, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _enabled:
            return True
        _patch_torch_cuda()
        _patch_megatron_rng()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _enabled = True
    return True


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def suspended():
    """Temporarily leave the function mode (for timing pure CPU kernels without its per-op cost)."""
    if not _enabled or _mode is None:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
