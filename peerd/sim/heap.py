"""Keep freed memory in the process heap during a simulation.

A simulated hour at 10,000 peers allocates and frees hundreds of thousands of numpy arrays of a few
hundred KB (a view's per-peer arrays, a layout's pairs). glibc's malloc serves such sizes with
``mmap`` and gives them back to the kernel when freed, or trims the top of the heap, so the next
array of that size is fresh memory again, and every 4 KiB page of it faults on first touch: on this
project's 2-core VM that was ~0.8 us per page, as long as the loop that fills the array. Raising the
mmap and trim thresholds keeps freed blocks for reuse (docs/scale.md, finding 11).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks below this come from the heap (glibc's largest default)
TRIM_THRESHOLD_BYTES = 256 << 20  # free memory at the heap's top kept up to this


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where malloc is not glibc's
    (nothing changes then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
