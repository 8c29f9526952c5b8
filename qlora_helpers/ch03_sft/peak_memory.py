"""Measuring a training run: peak memory and step times, labelled with what was measured.

On a GPU the peak is ``torch.cuda.max_memory_allocated`` (bytes held by tensors, the number
that decides an out-of-memory error). On the CPU there is no allocator counter, so the peak is
the process's resident set size (RSS), sampled every few milliseconds by a background thread,
minus the RSS when the block started. RSS also counts Python objects, allocator slack and
library code loaded on the way, so compare CPU numbers with each other, not with GPU ones.

Example:
    >>> with PeakMemory("cpu") as mem:                       # doctest: +SKIP
    ...     x = bytearray(200 * 2**20)
    >>> round(mem.peak_bytes / 2**20), mem.what              # doctest: +SKIP
    (200, 'peak process RSS above the start of the block (CPU, sampled every 5 ms)')
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import psutil
import torch

from qlora_helpers.common.bench import reset_cuda_peak


def rss_bytes() -> int:
    """Resident set size of this process."""
    return psutil.Process().memory_info().rss


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so the RSS baseline is not inflated by an earlier run."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: ``peak_bytes`` used while the block ran, and ``what`` says how it was measured."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device = str(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.what = ""
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        _release_freed_memory()
        if self.device.startswith("cuda"):
            reset_cuda_peak()                # (it synchronizes first)
            self._base = torch.cuda.memory_allocated()
            self.what = "peak torch.cuda.max_memory_allocated above the start of the block (GPU tensors)"
        else:
            self._base = self._peak = rss_bytes()
            self.what = (f"peak process RSS above the start of the block (CPU, sampled every "
                         f"{self.interval_s * 1000:.0f} ms)")
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.peak_bytes = self._peak - self._base
        return False

    def as_dict(self) -> dict:
        return {"peak_gib": round(self.peak_bytes / 2**30, 3), "measured": self.what}
