"""glibc malloc settings of a mount process, made before its first thread starts.

A mount's bytes pass through buffers of a chunk's size (1 MiB by default) on trio's
worker threads: fetched, decompressed, hashed, written to the node cache. glibc's
defaults kept them long after they were freed (measured with ``/proc/PID/smaps`` on the
bench's Debian image, ``bench/snapshotter_reads.py``):

- every thread that allocates gets an arena of its own, whose free middle is never given
  back: 26 MB in four arenas in a mount that had fetched a whole image, 3 MB in two in a
  mount that found its image in the node cache. One arena (``M_ARENA_MAX``) serves a
  mount's few threads; its lock is not where a mount waits.
- a freed block that was mapped on its own raises the size above which blocks are mapped
  (the dynamic mmap threshold) to its size, so after the first chunk buffer every later
  one came from the heap, and 25 MB of heap stayed after a whole image was fetched. A
  fixed threshold (``M_MMAP_THRESHOLD``) maps every block of 128 KiB or more on its own
  and unmaps it when freed.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

#: mallopt(3) parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENAS = 1
MMAP_THRESHOLD = 128 << 10
#: a mount's heap is given back after this many bytes read, at most this often (seconds)
GIVE_BACK_AFTER_BYTES = 32 << 20
GIVE_BACK_EVERY = 2.0


def tune_for_mount() -> bool:
    """Apply the settings above to this process; False where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another libc (musl has no mallopt)
        log.debug("no mallopt: malloc left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, ARENAS)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def give_back() -> None:
    """Return the free pages inside the heap to the system (``malloc_trim``: glibc gives
    back only the heap's free top by itself), once a burst of work has ended."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


async def give_back_after_reads(bytes_read: Callable[[], int]) -> None:
    """Every ``GIVE_BACK_EVERY`` seconds, ``give_back`` if ``GIVE_BACK_AFTER_BYTES`` were
    read since the last time (``bytes_read``: the mount's count): a read's buffers are
    freed between longer-lived objects, and the heap kept 12 MB of them after a mount had
    served the whole of the bench's Debian image."""
    last = bytes_read()
    while True:
        await trio.sleep(GIVE_BACK_EVERY)
        if bytes_read() - last >= GIVE_BACK_AFTER_BYTES:
            last = bytes_read()
            give_back()
