"""Allocator tuning for the demo and benchmark processes (glibc only; a no-op elsewhere).

glibc serves blocks above 32 MB with ``mmap`` and returns them with ``munmap`` on free, so a per-frame temporary of
that size is page-faulted in again every frame. Eventful SAM at 1024 px allocates several 200-800 MB attention-map
temporaries per global block and frame; measured cost ~2-3 s of system time per frame on 2 cores (dense timm pays a
smaller share too). Keeping freed memory in the heap removes it — the effect the PyTorch CPU tuning guide gets by
switching to jemalloc/tcmalloc, without a new dependency. It applies to the whole process (dense and eventful
alike) and trades it for a higher resident set (freed memory is kept for reuse, never returned to the OS).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """No mmap for large blocks and no trimming: freed memory is reused. Returns whether glibc accepted both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
