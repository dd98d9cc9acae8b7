"""Reads of the node cache alone, for ``ChunkFetcher``: a range of a chunk (the blocks a
read touches, checked), a whole chunk, whether an entry is there; a read that has to wait
for the disk is counted and asks the disk for what follows it (``diskahead``)."""

from __future__ import annotations

from blockindex.format import Chunk
from cache.store import ChunkStore

from .config import FetchStats
from .diskahead import DiskAhead
from .verify import Verifier


class CacheReads:
    """The node-cache side of ``ChunkFetcher`` (which sets these attributes)."""

    _store: ChunkStore | None
    _verifier: Verifier
    _disk_ahead: DiskAhead | None
    stats: FetchStats

    async def read_range(self, c: Chunk, offset: int, size: int) -> bytes | memoryview | None:
        """For a demand reader: bytes ``[offset, offset + size)`` of ``c`` from the node
        cache alone, reading and checking only the blocks they touch, or None when the
        cache lacks the chunk (then ``read`` loads it). No in-flight entry: a read of a
        few blocks costs less than waiting for another reader's."""
        if self._store is None:
            return None
        return await self._verifier.cached_range(self._store, c, offset, size, on_disk=self._on_disk)

    def _on_disk(self, c: Chunk, offset: int) -> None:  # count it, ask the disk for what follows
        self.stats.disk_reads += 1
        if self._disk_ahead is not None:
            self._disk_ahead.cold(c, offset)

    def has_cached(self, c: Chunk) -> bool:
        """Whether the node cache holds a whole entry of ``c`` (one ``stat``)."""
        return self._store is not None and self._store.contains(c.digest, c.size)

    async def _cached(self, c: Chunk) -> memoryview | None:
        assert self._store is not None
        return await self._verifier.cached(self._store, c)

