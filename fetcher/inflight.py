"""One load per chunk, however many readers want it: the in-flight map.

Each chunk being loaded has one entry, from the moment a reader finds it missing from
memory until its bytes are had (and, when fetched, until the node cache holds them):
first while it is read from the node cache on disk, then, if it is not there, while it
is fetched from a peer or the origin. A reader that wants a chunk joins whatever entry
there is, whichever stage it is at, and is woken once with the bytes or the error.

    hits, rest = await inflight.from_cache(chunks, load)   # the node cache's stage
    entry = inflight.get(digest) or inflight.start(digest)  # the network's (ChunkFetcher)
    ...                                  # whoever started it fills in data or error,
    entry.event.set()                    # wakes every reader,
    inflight.done(digest, entry)         # and removes it (only if it is still this one)

An entry removes only itself: a reader that deleted another's entry once crashed the
mount (a KeyError out of a FUSE handler).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio

from blockindex.format import Chunk, ChunkDigest

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

    __slots__ = ("event", "data", "payload", "error", "caching", "queued", "range", "cached", "disk")

    def __init__(self, queued: bool = False) -> None:
        self.queued = queued
        """A background fetch that has not started yet (it waits for demand reads to end);
        a demand reader or a peer that wants the chunk takes it over (see ``ChunkFetcher``)."""
        self.event = trio.Event()
        self.data: bytes | memoryview | None = None
        self.payload: bytes | memoryview | None = None
        """As stored in the blob (what peers are sent); None when it came from the node
        cache, which keeps plain bytes."""
        self.error: FetchError | None = None
        self.caching = False  # stays in the in-flight map until the cache has it
        self.range: Underway | None = None  # the background range fetching it, once under way
        self.cached = False  # its bytes came from the node cache, not the network
        self.disk: trio.Event | None = None
        """Set when its read from the node cache has ended: with its bytes (``cached``), or
        ``queued`` for the network, which the first demand reader to want it fetches."""


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

    async def from_cache(
        self, chunks: Iterable[Chunk],
        load: Callable[[Chunk], Awaitable[bytes | memoryview | None]],
    ) -> tuple[dict[ChunkDigest, bytes | memoryview], list[Chunk]]:
        """The bytes of those of ``chunks`` that the node cache holds, each read by
        ``load`` (plain bytes, or None if absent) once however many
        readers want it; and the rest, in order, for the network. A chunk that no entry
        covers gets one for its read from the cache; if the cache lacks it, the entry stays
        (``queued``) and the first demand reader to ask the network for it fetches it
        (``ChunkFetcher._start``), so a reader that came meanwhile waits for that fetch
        instead of reading the cache again."""
        hits: dict[ChunkDigest, bytes | memoryview] = {}
        rest: list[Chunk] = []
        handed: list[tuple[Chunk, Pending]] = []
        seen: set[ChunkDigest] = set()
        try:
            for c in chunks:
                if c.digest in seen:
                    continue
                seen.add(c.digest)
                p = self._entries.get(c.digest)
                if p is not None:  # being loaded: from the cache, wait for that, else join it
                    if p.disk is not None and not p.disk.is_set():
                        await p.disk.wait()
                    if p.cached and p.data is not None:
                        hits[c.digest] = p.data
                    else:
                        rest.append(c)
                    continue
                p = self.start(c.digest)
                p.disk = trio.Event()
                try:
                    got = await load(c)
                except BaseException:  # cancelled, or a bug: whoever comes next loads it again
                    self._give_up(c, p)
                    raise
                if got is None:
                    p.queued = True
                    p.disk.set()
                    handed.append((c, p))
                    rest.append(c)
                    continue
                p.data = got
                p.cached = True
                p.event.set()
                p.disk.set()
                self.done(c.digest, p)
                hits[c.digest] = p.data
        except BaseException:
            for c, p in handed:
                if p.queued:  # nobody asks the network for it now: the next reader loads it
                    self._give_up(c, p)
            raise
        return hits, rest

    def _give_up(self, c: Chunk, p: Pending) -> None:
        p.error = FetchError(f"chunk {c.hexdigest[:16]} was not loaded")
        p.event.set()
        if p.disk is not None:
            p.disk.set()
        self.done(c.digest, p)
