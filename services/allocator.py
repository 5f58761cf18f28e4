"""How this process's C allocator treats the memory torch frees: kept for the next forward.

torch's CPU tensors come from glibc malloc. By default glibc serves a block over its mmap
threshold (128 KiB, adjusted upwards as such blocks are freed) with a fresh mmap, and returns
the free top of a heap to the kernel past its trim threshold. A forward at a few hundred
candidates allocates and frees activations of 0.2-3 MB dozens of times, so each forward maps
them anew and touches every page for the first time: measured on the serving-size model at
C = 500 (one torch thread, in a model-worker thread like the service's; ``python -m
harness.page_faults``), 1,800-3,600 minor page faults per forward, and 14-19 ms of CPU per forward
with the blocks kept against 23-27 ms without (loadtests/RESULTS.md, issue 18's reading).

``keep_freed_memory`` fixes both thresholds (which also turns glibc's dynamic adjustment off):
blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heaps, and up to
``trim_mb`` of free memory at the top of a heap stays mapped. The cost is resident memory that
does not shrink after a peak: at most what the peak used plus ``trim_mb`` per malloc arena.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: a larger value is refused


def _glibc():
    """glibc's handle, or None where malloc is not glibc's (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(trim_mb: int) -> bool:
    """Keep freed blocks mapped (``trim_mb`` > 0; 0 leaves glibc's defaults). True when the
    thresholds were set; False on a platform without glibc malloc, or when glibc refused them."""
    if trim_mb <= 0:
        return False
    libc = _glibc()
    if libc is None:
        log.info("allocator: not glibc malloc; freed memory is managed by the platform's allocator")
        return False
    trim = min(int(trim_mb) * 1024 * 1024, 2**31 - 1)  # mallopt takes an int
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    if ok:
        log.info("allocator: blocks up to %d MiB from the heap, up to %d MiB of freed memory kept per arena "
                 "(IAT_MALLOC_KEEP_MB)", MMAP_THRESHOLD_MAX >> 20, trim >> 20)
    else:
        log.warning("allocator: glibc refused the malloc thresholds; every forward maps its activations anew")
    return ok


def minor_page_faults() -> int:
    """This process's minor page faults so far (the kernel's count; what a re-mapped block costs)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
