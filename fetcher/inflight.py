"""One load per chunk, however many readers want it: the in-flight map.

Each chunk being loaded has one entry, from the moment a reader finds it missing from
memory until its bytes are had (and, when fetched, until the node cache holds them):
first while it is read from the node cache on disk, then, if it is not there, while it
is fetched from a peer or the origin. A reader that wants a chunk joins whatever entry
there is, whichever stage it is at, and is woken once with the bytes or the error.

    entry = inflight.get(digest) or inflight.start(digest)
    ...                                  # whoever started it fills in data or error,
    entry.event.set()                    # wakes every reader,
    inflight.done(digest, entry)         # and removes it (only if it is still this one)

An entry removes only itself: a reader that deleted another's entry once crashed the
mount (a KeyError out of a FUSE handler).
"""

from __future__ import annotations

import trio

from blockindex.format import ChunkDigest

from .errors import FetchError


class Underway:
    """A background range under way: its bytes once they have arrived, and whether a
    reader (readahead) waits for it, so that it stops giving way."""

    __slots__ = ("wanted", "data", "start")

    def __init__(self, start: int) -> None:
        self.wanted = False
        self.data: bytes | bytearray | None = None
        self.start = start


class Pending:
    """One chunk being loaded, and then what came of it."""

    __slots__ = ("event", "data", "payload", "error", "caching", "queued", "range", "cached")

    def __init__(self, queued: bool = False) -> None:
        self.queued = queued
        """A background fetch that has not started yet (it waits for demand reads to end);
        a demand reader or a peer that wants the chunk takes it over (see ``ChunkFetcher``)."""
        self.event = trio.Event()
        self.data: bytes | memoryview | None = None
        self.payload: bytes | memoryview | None = None  # as stored in the blob (what peers are sent)
        self.error: FetchError | None = None
        self.caching = False  # stays in the in-flight map until the cache has it
        self.range: Underway | None = None  # the background range fetching it, once under way
        self.cached = False  # its bytes came from the node cache, not the network


class InFlight:
    """The entries of the chunks being loaded, by digest."""

    def __init__(self) -> None:
        self._entries: dict[ChunkDigest, Pending] = {}

    def get(self, digest: ChunkDigest) -> Pending | None:
        return self._entries.get(digest)

    def __getitem__(self, digest: ChunkDigest) -> Pending:
        return self._entries[digest]

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, digest: ChunkDigest, *, queued: bool = False) -> Pending:
        """A new entry for ``digest``, which has none."""
        assert digest not in self._entries
        p = self._entries[digest] = Pending(queued=queued)
        return p

    def done(self, digest: ChunkDigest, p: Pending) -> None:
        """Remove ``p``, if it is still the entry of ``digest``."""
        if self._entries.get(digest) is p:
            del self._entries[digest]
