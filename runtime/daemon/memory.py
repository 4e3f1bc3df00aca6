"""Memory: what the machine has, what Outpost uses, and how many layers fit on a GPU.

Accounting is in proportional set size (PSS): a page shared by the daemon, the
forkserver and N workers counts 1/(N+2) in each, so the PSS summed over Outpost's
processes is what Outpost really costs the machine, no page counted twice. A new
worker adds its unique set (USS): the shared pages it maps are already counted.

On Jetson-style unified memory the GPU allocates from the same RAM: there is no
separate VRAM budget and GPU allocations are simply part of each process's memory.
NVML is optional: without the `nvidia-ml-py` package or a driver, there is no GPU.

What this module must not do: keep the budget or choose victims (ledger.py and
eviction.py); it only reads the machine.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("outpost.memory")

try:  # optional: only machines with an NVIDIA driver have use for it
    import pynvml
except ImportError:  # pragma: no cover - depends on the machine
    pynvml = None


@dataclass(frozen=True)
class ProcessMemory:
    pss: int
    uss: int
    rss: int


def process_memory(pid: int) -> ProcessMemory | None:
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return None
    return ProcessMemory(pss=getattr(info, "pss", info.rss), uss=info.uss, rss=info.rss)


# Reading a process's PSS walks its page tables in the kernel (milliseconds for a
# loaded model) with the GIL released, so several processes are read side by side.
_readers = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="outpost-mem")


def processes_memory(pids: list[int]) -> dict[int, ProcessMemory | None]:
    """One reading per process, taken concurrently."""
    return dict(zip(pids, _readers.map(process_memory, pids)))


def unified_memory() -> bool:
    """True on NVIDIA Tegra (Jetson) boards, where GPU memory is system RAM."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return b"nvidia,tegra" in Path("/proc/device-tree/compatible").read_bytes()
    except OSError:
        return False


def available_ram() -> int:
    # psutil reads MemAvailable on Linux: free memory plus what the kernel can reclaim.
    return psutil.virtual_memory().available


class Gpus:
    """NVML, if there is one. Every method answers sensibly without a GPU."""

    def __init__(self) -> None:
        self.count = 0
        if pynvml is None or unified_memory():
            return
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            log.info("no NVIDIA GPU visible (%s)", exc)

    def free(self) -> list[int]:
        out = []
        for i in range(self.count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        return out

    def used_by(self, pids: set[int]) -> dict[int, int]:
        """pid -> bytes of GPU memory, summed over GPUs."""
        used: dict[int, int] = {}
        for i in range(self.count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                continue
            for p in procs:
                if p.pid in pids and p.usedGpuMemory:
                    used[p.pid] = used.get(p.pid, 0) + int(p.usedGpuMemory)
        return used


def plan_gpu_layers(n_layers: int, weights_bytes: int, kv_bytes: int, vram_free: int,
                    overhead: int = 256 << 20) -> int:
    """How many of `n_layers` repeating layers to offload to fit `vram_free` bytes.

    Weights are spread evenly over the layers plus one more for the output layer;
    each offloaded layer also holds its share of the KV cache. Returns -1 when the
    whole model (output layer included) fits, else 0..n_layers-1.
    """
    if n_layers <= 0 or vram_free <= overhead:
        return 0
    per_layer = weights_bytes / (n_layers + 1) + kv_bytes / n_layers
    whole = weights_bytes + kv_bytes + overhead
    if whole <= vram_free:
        return -1
    return max(0, min(n_layers - 1, math.floor((vram_free - overhead) / per_layer)))


def _libc_trim() -> object | None:
    try:
        import ctypes  # noqa: PLC0415

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _libc_trim()


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim). A large
    frame is allocated and freed on whichever thread read it; glibc keeps those pages in
    that thread's arena, so without this the daemon's memory settles at the high-water
    mark of the largest requests it ever saw (measured by tools/fuzz_wire.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
