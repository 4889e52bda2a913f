"""How the checks time and measure: wait for the device, plain CPU kernels, peak memory, freeing memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from typing import Optional

import torch

from ..distributed import cpu_compat


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_kernels():
    """Time plain CPU kernels without the Megatron CPU layer's per-op cost (no-op on GPU)."""
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


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

