"""Process-wide settings, for an application to choose: the library itself never calls anything here.

glibc's malloc hands large freed blocks back to the system (above its mmap threshold, which adapts up to 32 MiB,
and above its trim threshold), so a model whose activations are that large pays a page fault and a page clear
for every 4 KiB of them at every call. `keep_freed_memory()` makes glibc keep them in the process instead, as
jemalloc or tcmalloc do; the `cvt` command calls it at start-up (BENCHMARKS.md says what it buys). A program
of your own gets the same by calling it, or from the environment before Python starts:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 python train.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python train.py     # or tcmalloc
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc serve every block from its heap and return none of it to the system, for this whole process.

    After a warm-up no call pays page faults for fresh memory; the process keeps its peak memory. Returns whether
    it took effect: False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
