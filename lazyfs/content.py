"""File contents of a mounted image: memory, then the node cache, then the network."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable

import trio

from blockindex.codec import ChunkDecodeError, decode
from blockindex.format import Chunk, ChunkDigest, InodeT
from blockindex.reader import IndexReader
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.errors import FetchError, UnreachableError

log = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)


@dataclasses.dataclass
class ReadStats:
    """Where the bytes handed to readers came from."""

    reads: int = 0
    bytes_read: int = 0
    chunk_hits_memory: int = 0
    chunk_hits_cache: int = 0
    bytes_from_cache: int = 0
    chunk_misses: int = 0
    failed_reads: int = 0


class ImageContent:
    """Reads byte ranges of files. Decoded chunks are kept in a small in-memory LRU so
    that the kernel's many small reads of one chunk decode it once."""

    def __init__(
        self,
        index: IndexReader,
        store: ChunkStore,
        fetcher: ChunkFetcher | None,
        *,
        on_fetched: Callable[[Chunk], object] | None = None,
        memory_chunks: int = 64,
        thread_above: int = 128 << 10,
    ) -> None:
        self.index = index
        self.store = store
        self.fetcher = fetcher
        self.stats = ReadStats()
        self._on_fetched = on_fetched
        self._lru: collections.OrderedDict[ChunkDigest, bytes] = collections.OrderedDict()
        self._lru_max = memory_chunks
        self._thread_above = thread_above
        self._cpu = trio.CapacityLimiter(2)

    async def read(self, ino: InodeT, offset: int, size: int) -> bytes | memoryview:
        """Bytes ``[offset, offset + size)`` of file ``ino`` (short at end of file).

        Raises ``FetchError`` when a chunk cannot be had in time or fails verification."""
        spans = self.index.chunks(ino, offset, size)
        self.stats.reads += 1
        if not spans:
            return b""
        chunks = [s.chunk for s in spans if s.chunk is not None]
        try:
            data = await self._chunks(chunks) if chunks else {}
        except FetchError:
            self.stats.failed_reads += 1
            raise
        parts: list[bytes | memoryview] = []
        for s in spans:
            if s.chunk is None:
                parts.append(_zeros(s.length))
            else:
                parts.append(memoryview(data[s.chunk.digest])[s.chunk_offset : s.chunk_offset + s.length])
        self.stats.bytes_read += sum(s.length for s in spans)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _chunks(self, chunks: list[Chunk]) -> dict[ChunkDigest, bytes]:
        out: dict[ChunkDigest, bytes] = {}
        missing: list[Chunk] = []
        for c in chunks:
            hit = self._lru.get(c.digest)
            if hit is not None:
                self._lru.move_to_end(c.digest)
                self.stats.chunk_hits_memory += 1
                out[c.digest] = hit
                continue
            plain = await self._from_store(c)
            if plain is None:
                missing.append(c)
            else:
                self.stats.chunk_hits_cache += 1
                self.stats.bytes_from_cache += c.size
                out[c.digest] = plain
                self._remember(c.digest, plain)
        if missing:
            self.stats.chunk_misses += len(missing)
            if self.fetcher is None:
                raise UnreachableError(
                    f"chunk {missing[0].hexdigest[:16]} is not cached and the mount is offline"
                )
            fetched = await self.fetcher.get(missing)
            for c in missing:
                out[c.digest] = fetched[c.digest]
                self._remember(c.digest, fetched[c.digest])
                if self._on_fetched is not None:
                    self._on_fetched(c)
        return out

    async def _from_store(self, c: Chunk) -> bytes | None:
        if c.size > self._thread_above:
            return await trio.to_thread.run_sync(self._load, c, limiter=self._cpu)
        return self._load(c)

    def _load(self, c: Chunk) -> bytes | None:
        entry = self.store.get(c.digest)
        if entry is None:
            return None
        codec, size, payload = entry
        try:
            if codec != c.codec or size != c.size:
                raise ChunkDecodeError("entry does not match the index")
            return decode(codec, size, payload)
        except ChunkDecodeError as exc:
            log.warning("cache entry %s unusable (%s); dropped", c.hexdigest, exc)
            self.store.remove(c.digest)
            return None

    def _remember(self, digest: ChunkDigest, plain: bytes) -> None:
        self._lru[digest] = plain
        self._lru.move_to_end(digest)
        while len(self._lru) > self._lru_max:
            self._lru.popitem(last=False)


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
