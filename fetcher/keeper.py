"""Fetched chunks into the node cache, without making a reader wait for the disk.

A demand read's chunk is written by a task of its own: the reader has its bytes already.
Until the entry is written, the chunk's in-flight entry stays (``Pending.caching``) and
answers for it, else a peer asking just then would fetch it again. The prefetcher's chunks
are written before it goes on: it counts on a chunk being cached when it returns.
"""

from __future__ import annotations

import trio

from blockindex.format import Chunk
from cache.store import ChunkStore

from .inflight import InFlight, Pending


class CacheWriter:
    """Writes what a ``ChunkFetcher`` fetched into ``store`` (None: nothing is cached)."""

    def __init__(self, nursery: trio.Nursery, store: ChunkStore | None, inflight: InFlight) -> None:
        self._nursery = nursery
        self._store = store
        self._inflight = inflight

    async def keep(self, c: Chunk, p: Pending, background: bool) -> None:
        """Cache the checked bytes of ``c`` (``p.data``): at once for the background, by a
        task of its own for a reader."""
        assert p.data is not None
        if self._store is None:
            return
        if background:
            await self.write(c, p.data)
        else:
            p.caching = True
            self._nursery.start_soon(self._write_then_forget, c, p)

    async def write(self, c: Chunk, plain: bytes | memoryview) -> None:
        assert self._store is not None
        await trio.to_thread.run_sync(self._store.put, c.digest, plain)

    async def _write_then_forget(self, c: Chunk, p: Pending) -> None:
        try:
            await self.write(c, p.data if p.data is not None else b"")
        finally:
            self._inflight.done(c.digest, p)
