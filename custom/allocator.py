"""Keep freed CPU memory in the process, so that each training step's large tensors stop page-faulting.

Every step allocates and frees the same large activations. With its default settings glibc's malloc
serves large blocks with fresh ``mmap`` calls and gives a freed heap top back to the kernel once it
exceeds a trim threshold that it adjusts by itself (at most a few tens of MiB). The next step then
touches new pages, and the kernel zero-fills each 4 KiB page on its first touch: on the 2-core
reference machine that costs about a fifth of a 2D training step (research/results.md,
``allocator``). Fixed, larger thresholds (``mallopt``) keep the memory in the process: a step reuses
the pages of the last one. Nothing is computed differently; the process keeps its peak memory instead
of returning it between steps. CUDA tensors are unaffected (PyTorch caches GPU memory itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap (and are reused) instead of fresh mmaps
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top is kept up to 2 GiB (mallopt takes an int)


def keep_freed_memory(enabled: bool = True) -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (see the module docstring).

    Returns whether they were set: False when ``enabled`` is false or the C library is not glibc
    (macOS, musl), where nothing is changed.
    """
    if not enabled:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        logger.warning("could not set malloc's thresholds: freed CPU memory goes back to the kernel as before")
    return done
