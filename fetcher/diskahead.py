"""Readahead in the node cache: the entries a walk through a blob reads next, brought into
the page cache while the reader is still on the one it asked for.

The cache keeps one file per chunk, and each read opens its entry anew, so the kernel's
readahead never sees a walk: a ``tar`` of a complete image found 80% of its reads out of
the page cache, each one a trip to a worker thread and a disk wait of its own. Convert lays
a directory's files side by side in a blob (``amplify.py`` relies on the same), so when a
read of a chunk from its start has to wait for the disk, the entries of the chunks after it
in the blob are asked for too (``POSIX_FADV_WILLNEED``, in a low-priority thread, so the
reader waits for none of it): the disk reads them in parallel with the reader, whose next
reads then find them in memory and stay on the event loop. Random small reads, which do not
start at a chunk's first byte, ask for nothing more.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from blockindex.format import Chunk, ChunkDigest
from cache.store import ChunkStore

from .lowprio import BACKGROUND

WINDOW = 2 << 20
"""Bytes of a blob after a chunk whose entries are asked for at once."""

_REMEMBERED = 1 << 14
"""Chunks asked for lately, not asked for again (a walk meets each window many times)."""


class DiskAhead:
    """Asks the disk for the entries that follow a chunk read from disk."""

    def __init__(self, store: ChunkStore, neighbours: Callable[[Chunk, int], Sequence[Chunk]], *,
                 window: int = WINDOW, submit: Callable[..., object] = BACKGROUND.submit) -> None:
        self._store = store
        self._neighbours = neighbours
        """The chunks following a chunk in its blob within so many bytes (the index's
        ``chunks_after``)."""
        self._window = window
        self._submit = submit
        self._asked: collections.OrderedDict[ChunkDigest, None] = collections.OrderedDict()
        self.asked = 0
        """Entries asked for so far."""

    def cold(self, c: Chunk, offset: int) -> None:
        """A read of ``c`` at ``offset`` waited for the disk: if it reads the chunk from
        its start, ask for the entries after it that were not asked for lately."""
        if offset != 0:
            return
        todo = [n.digest for n in self._neighbours(c, self._window) if n.digest not in self._asked]
        if not todo:
            return
        for digest in todo:
            self._asked[digest] = None
        while len(self._asked) > _REMEMBERED:
            self._asked.popitem(last=False)
        self.asked += len(todo)
        self._submit(self._store.will_need, todo)
