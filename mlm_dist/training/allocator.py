"""Keep glibc from returning big CPU tensors' memory to the OS between training steps.

glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
fresh mmap and unmaps it on free. A training step allocates and frees the same large tensors
every time (activations, the [V, H] embedding gradient and its casts, logits), so every step
pays a page fault per 4 KiB page of each of them, and in a VM a page fault is expensive: zeroing
a fresh tensor costs many times what zeroing a mapped one does (`mlm-dist bench train
--default-malloc` shows the step without this). With mmap off (M_MMAP_MAX=0) and trimming off
(M_TRIM_THRESHOLD huge), freed blocks stay in the heap and the next step reuses them, already
mapped. jemalloc or tcmalloc via LD_PRELOAD do the same job from outside the process; this
needs no extra package.

Only the CPU heap is affected (CUDA memory has its own caching allocator). The process keeps
its peak heap until it exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_tuned = False


def tune_cpu_allocator() -> bool:
    """Turn glibc's mmap and heap trimming off for this process; True if done (glibc only).
    Safe to call more than once; takes effect for allocations made after it."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave it alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _tuned
