"""Process-wide settings of the C allocator for long training loops.

Every training step allocates and frees the same buffers: tens of MB (a batch of inputs and outputs, the
weight gradients) to hundreds (the dense pre-activations). glibc's malloc serves blocks above its mmap
threshold (at most 32 MiB) with fresh mappings and returns freed memory at the top of its heap to the
system once more than the trim threshold is free, so every step page-faults (and the kernel zeroes) those
pages again. Keeping freed memory in the heap avoids that work (benchmarks/train_throughput.py compares
with ``--default-malloc``: the README gives the figures, a gain at the edge of the machine's noise). The
cost is a resident set that does not shrink between steps, which a training process needs anyway.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # an int: never give freed heap memory back while training
TOP_PAD = 2**30  # grow the heap a GiB at a time (address space; pages count only once touched)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring); True if it took.

    Does nothing (False) where the C library is not glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
