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
import functools
import time
from collections.abc import Callable, Sequence

from blockindex.format import Chunk
from cache.store import ChunkStore

from .lowprio import BACKGROUND

WINDOW = 2 << 20
"""Bytes of a blob after a chunk whose entries are asked for at once."""

_REMEMBERED = 1 << 14
"""Chunks asked for lately, not asked for again (a walk meets each window many times)."""

AGAIN_AFTER = 2.0
"""Seconds after which a chunk asked for counts as not asked (the page cache may have let
it go since: a second walk of the tree asks again)."""


class DiskAhead:
    """Asks the disk for the entries that follow a chunk read from disk."""

    def __init__(self, store: ChunkStore, followers: Callable[[Chunk, int], Sequence[bytes]], *,
                 window: int = WINDOW, submit: Callable[..., object] = BACKGROUND.submit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._followers = followers
        """The digests of the chunks following a chunk in its blob within so many bytes
        (the index's ``digests_after``)."""
        self._window = window
        self._submit = submit
        self._clock = clock
        self._asked: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        """When each chunk was asked for, oldest first."""
        self.asked = 0
        """Entries asked for so far."""

    @classmethod
    def of(cls, store: ChunkStore | None, followers: Callable[[Chunk, int], Sequence[bytes]] | None,
           neighbours: Callable[[Chunk, int], Sequence[Chunk]] | None) -> DiskAhead | None:
        """One for a fetcher with a node cache and a way to the followers (or to the
        neighbours, which give them too, checked, at more cost); else None."""
        if followers is None and neighbours is not None:
            followers = functools.partial(_digests_of, neighbours)
        return cls(store, followers) if store is not None and followers is not None else None

    def cold(self, c: Chunk, offset: int) -> None:
        """A read of ``c`` at ``offset`` waited for the disk: if it reads the chunk from
        its start, ask for the entries after it that were not asked for lately. A chunk
        asked for lately is one whose read came before the disk did: its followers were
        asked for with it, and the index is not asked again (a walk asks once a window)."""
        if offset != 0:
            return
        now = self._clock()
        if now - self._asked.get(c.digest, -AGAIN_AFTER) < AGAIN_AFTER:
            return
        todo = [d for d in self._followers(c, self._window)
                if now - self._asked.get(d, -AGAIN_AFTER) >= AGAIN_AFTER]
        if not todo:
            return
        for digest in todo:
            self._asked[digest] = now
            self._asked.move_to_end(digest)
        while len(self._asked) > _REMEMBERED:
            self._asked.popitem(last=False)
        self.asked += len(todo)
        self._submit(self._store.will_need, todo)


def _digests_of(neighbours: Callable[[Chunk, int], Sequence[Chunk]], c: Chunk, nbytes: int) -> list[bytes]:
    return [n.digest for n in neighbours(c, nbytes)]
