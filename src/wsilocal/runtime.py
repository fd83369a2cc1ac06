"""Process-wide settings that make CPU training fast. Called by the CLI and the trainer.

A training step allocates and frees the same large activation buffers every time. glibc's malloc serves
buffers above a threshold with ``mmap`` and hands them back to the OS on ``free``, so every step pays page
faults to get zeroed memory again — on our 2-core machines that made an RFR step 7× and end-to-end steps
up to 10× slower. Keeping freed memory in the heap (no mmap for large blocks, no trimming) removes that
cost; the process's peak memory is unchanged, it is only not returned to the OS between steps.

One exception: a streaming step (:mod:`wsilocal.train.streaming`) computes windows of several shapes one after
another, and the kept heap fragments — its resident memory grew with the slide although its live tensors did
not. It calls :func:`trim_heap` between the windows of a pass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wsilocal.errors import ConfigError

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_tuned = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (once: ``find_library`` runs a subprocess), or None where there is none to load."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator() -> bool:
    """Ask glibc to keep freed memory for reuse; returns whether it applied (glibc Linux only)."""
    global _tuned
    if _tuned:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not Linux, or musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _tuned


def process_memory_bytes(field: str) -> int:
    """``VmRSS``, ``RssAnon`` (now) or ``VmHWM`` (peak) of this process from /proc; ru_maxrss where there is
    no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc only; :func:`tune_cpu_allocator` otherwise keeps it)."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def resolve_device(name: str) -> torch.device:
    """The torch device a configuration names: ``"auto"`` is CUDA when a GPU is there, else the CPU."""
    import torch  # here, not at the top: the CLI's parser and benchmark children import this module first

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config: device {name!r} is not a valid torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config: device {name!r} requested but no CUDA GPU is available")
    return device


CPU_BUDGET_SHARE = 0.5  # of the RAM available now (the rest: OS, slide reader, other jobs)
GPU_BUDGET_SHARE = 0.8  # of the free GPU memory


def memory_budget_bytes(gib: float | None, device: torch.device) -> int:
    """A configured budget of ``gib`` GiB in bytes, or :func:`default_memory_budget` when none is set."""
    return int(gib * 2**30) if gib is not None else default_memory_budget(device)


def default_memory_budget(device: torch.device) -> int:
    """Bytes a whole-image forward may use: a share of the free GPU memory, or of the available RAM."""
    if device.type == "cuda":
        import torch  # the rest of this module runs without torch (benchmark children import it first)

        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_BUDGET_SHARE)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * CPU_BUDGET_SHARE)
    except OSError:
        pass
    return 4 * 2**30  # no /proc: a conservative guess; larger slides run tiled, which is exact anyway
