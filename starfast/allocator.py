"""Process-wide setting of the C allocator for long CPU runs: ``keep_freed_memory()``.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold (dynamic,
at most 32 MB) with fresh pages from the kernel and returns them on ``free``. A step that
allocates row-sized tensors (P floats: 45 MB for ResNet-18; a ``[50, P]`` bank of ResNet-20s is
54 MB) therefore page-faults every one of their pages again, every step: measured here, about 8%
of a Starlight step on ResNet-18 and up to a fifth of a warm re-match. Serving large blocks from
the heap and never trimming it makes the second step reuse the first step's pages.

The cost is that the process keeps its peak heap mapped until it exits, which is what a
training process wants and a library must not impose: the command-line tools call
``keep_freed_memory()`` at start, library users may call it themselves. Only glibc has the knob;
elsewhere the call does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_INT = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make ``malloc`` serve every block from the heap and never give freed memory back.

    Returns whether the C library accepted both settings (True on glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl exports a mallopt that accepts nothing and returns 0.
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_INT)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST_INT))
