"""The forwarder's heap: glibc malloc set to keep and reuse the memory of freed buffers.

Every read from a socket gives a new ``bytes`` object (up to 256 KiB each with uvloop), and
every large payload a new buffer. glibc serves blocks over 128 KiB with a fresh ``mmap`` and
gives the memory of the heap's top back to the kernel past 128 KiB free: each such buffer
then costs a page fault per 4 KiB page touched, which measured here was most of the
forwarder's time on 1 MiB requests (bench/blockio.py, ``--malloc default``). Raised
thresholds make these buffers come from the heap and its freed memory be used again; the
heap's size stays bounded by what the forwarder holds at its busiest (the in-flight cap per
disk), at most ``TRIM_THRESHOLD_BYTES`` more.
"""

import ctypes
import ctypes.util

from vmcluster.logs import event, get_logger

log = get_logger(__name__)

MMAP_THRESHOLD_BYTES = 4 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD_BYTES = 8 << 20  # free memory the heap keeps at its top
_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Set the thresholds (mallopt); False, said in the log, where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        log.warning(event("forwarder.heap.untuned", reason=f"no glibc mallopt: {exc}"))
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        log.warning(event("forwarder.heap.untuned", reason="mallopt refused the thresholds"))
    return ok
