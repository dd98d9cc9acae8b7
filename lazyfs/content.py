"""File contents of a mounted image: memory, then the fetcher (the node cache, then the
network)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import trio

from blockindex.format import Chunk, ChunkDigest, InodeT, Span
from blockindex.reader import IndexReader
from fetcher.chunks import ChunkFetcher
from fetcher.errors import FetchError

from .readlog import ReadLog, ReadSource

log = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)


@dataclasses.dataclass
class ReadStats:
    """Where the bytes handed to readers came from."""

    reads: int = 0
    bytes_read: int = 0
    chunk_hits_memory: int = 0
    bytes_from_memory: int = 0
    chunk_hits_cache: int = 0
    bytes_from_cache: int = 0
    chunk_misses: int = 0
    failed_reads: int = 0


class ImageContent:
    """Reads byte ranges of files. A chunk that the node cache holds is read by range:
    only the blocks a read touches (``ChunkFetcher.read_range``). Whole chunks (fetched,
    or loaded by readahead) are kept in a small in-memory LRU, so that the kernel's many
    small reads of one chunk find it there.

    When a file is read sequentially, the next ``readahead_chunks`` chunks that the node
    cache lacks are fetched in the background, so that round trips overlap instead of
    waiting one chunk at a time: the kernel's own readahead asks for one chunk at most
    ahead. Chunks the cache holds are left there (their reads are ranges of the page
    cache, which ``fetcher.diskahead`` fills ahead of a walk): loading them whole into
    memory cost a 1 MiB read, check and copy per chunk, and 64 MB held by a mount that
    had read a whole image."""

    def __init__(
        self,
        index: IndexReader,
        fetcher: ChunkFetcher,
        *,
        on_cached: Callable[[Chunk], object] | None = None,
        nursery: trio.Nursery | None = None,
        readahead_chunks: int = 4,
        memory_chunks: int = 64,
        memory_bytes: int = 8 << 20,
        readlog: ReadLog | None = None,
    ) -> None:
        """``readlog`` is told of every read (first-read trace, network waits, sources)."""
        self.index = index
        self.readlog = readlog
        self.fetcher = fetcher
        self.stats = ReadStats()
        self.observe_read: Callable[[ReadSource, float], object] | None = None
        """Called with (slowest source: memory, cache or network, seconds) after each read
        that succeeds."""
        self.admit: Callable[[], Awaitable[None]] | None = None
        """Asked before a read serves any byte (a side index's layer check): raises the
        ``FetchError`` that fails the read."""
        self._on_cached = on_cached
        self._lru: collections.OrderedDict[ChunkDigest, bytes | memoryview] = collections.OrderedDict()
        self._lru_max = memory_chunks
        self._lru_bytes_max = memory_bytes
        self._lru_bytes = 0
        self._nursery = nursery
        self._readahead = readahead_chunks if nursery is not None else 0
        self._last_end: collections.OrderedDict[InodeT, int] = collections.OrderedDict()
        self._ahead: set[ChunkDigest] = set()
        self._looked: collections.OrderedDict[InodeT, int] = collections.OrderedDict()
        """Per file read in order, where readahead has looked up to."""

    async def read(self, ino: InodeT, offset: int, size: int) -> bytes | memoryview:
        """Bytes ``[offset, offset + size)`` of file ``ino`` (short at end of file).

        Raises ``FetchError`` when a chunk cannot be had in time or fails verification."""
        started = time.perf_counter()
        began = trio.current_time()
        spans = self.index.chunks(ino, offset, size)
        self.stats.reads += 1
        if not spans:
            if self.observe_read is not None:
                self.observe_read("memory", time.perf_counter() - started)
            return b""
        if self.admit is not None:
            try:
                await self.admit()
            except FetchError:
                self.stats.failed_reads += 1
                raise
        rlog = self.readlog
        if rlog is not None:
            rlog.first_reads(ino, spans)
        if self._readahead and self._is_sequential(ino, offset, size):
            self._read_ahead(ino, spans[-1].file_offset + spans[-1].length)
        tiers: set[ReadSource] = set()
        sources: dict[ChunkDigest, ReadSource] | None = {} if rlog is not None else None
        pieces = await self._from_disk(spans, tiers, sources)
        chunks = [s.chunk for i, s in enumerate(spans) if s.chunk is not None and i not in pieces]
        try:
            data = await self._chunks(chunks, tiers=tiers, sources=sources,
                                      read=(ino, offset, size)) if chunks else {}
        except FetchError:
            self.stats.failed_reads += 1
            # the kernel re-reads it: the same deadline for all of it, the chunks it had from
            # the node cache included (they may be gone from there by the re-read)
            self.fetcher.note_failed_read([s.chunk for s in spans if s.chunk is not None], began)
            raise
        if self.observe_read is not None:
            slowest: ReadSource = ("network" if "network" in tiers
                                   else "cache" if "cache" in tiers else "memory")
            self.observe_read(slowest, time.perf_counter() - started)
        parts: list[bytes | memoryview] = []
        for i, s in enumerate(spans):
            if s.chunk is None:
                parts.append(_zeros(s.length))
            elif i in pieces:
                parts.append(pieces[i])
            else:
                parts.append(memoryview(data[s.chunk.digest])[s.chunk_offset : s.chunk_offset + s.length])
        self.stats.bytes_read += sum(s.length for s in spans)
        if rlog is not None and sources is not None:
            rlog.served(ino, spans, sources)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _from_disk(self, spans: list[Span], tiers: set[ReadSource],
                         sources: dict[ChunkDigest, ReadSource] | None) -> dict[int, bytes | memoryview]:
        """The bytes of those ``spans`` (by position) whose chunks memory lacks and the node
        cache holds, each read by range: the blocks it touches, no more."""
        out: dict[int, bytes | memoryview] = {}
        for i, s in enumerate(spans):
            c = s.chunk
            if c is None or c.digest in self._lru:
                continue
            piece = await self.fetcher.read_range(c, s.chunk_offset, s.length)
            if piece is None or len(piece) != s.length:  # a short entry: ``read`` drops it
                continue
            out[i] = piece
            self.stats.chunk_hits_cache += 1
            self.stats.bytes_from_cache += s.length
            tiers.add("cache")
            if sources is not None:
                sources[c.digest] = "cache"
            if self._on_cached is not None:
                self._on_cached(c)
        return out

    def _is_sequential(self, ino: InodeT, offset: int, size: int) -> bool:
        last = self._last_end.pop(ino, None)
        self._last_end[ino] = offset + size
        if len(self._last_end) > 256:
            self._last_end.popitem(last=False)
        return last == offset

    def _read_ahead(self, ino: InodeT, pos: int) -> None:
        assert self._nursery is not None
        end = pos + self._readahead * self.index.chunk_size
        # the chunks up to where the last read of this file looked were looked at then: each
        # 128 KiB read of a 1 MiB chunk asked the same, a stat of each chunk on the loop
        looked = self._looked.pop(ino, 0)
        start = looked if pos <= looked <= end else pos  # else a new walk (or one started over)
        self._looked[ino] = end
        if len(self._looked) > 256:
            self._looked.popitem(last=False)
        if start >= end:
            return
        todo = [
            s.chunk for s in self.index.chunks(ino, start, end - start)
            if s.chunk is not None and s.chunk.digest not in self._lru and s.chunk.digest not in self._ahead
            and not self.fetcher.has_cached(s.chunk)
        ]
        if todo:
            self._ahead.update(c.digest for c in todo)
            self._nursery.start_soon(self._load_ahead, todo)

    async def _load_ahead(self, chunks: list[Chunk]) -> None:
        try:
            await self._chunks(chunks, ahead=True)  # fetched as speculative: see ChunkFetcher.get
        except FetchError as exc:
            log.debug("readahead of %d chunks failed: %s", len(chunks), exc)
        finally:
            self._ahead.difference_update(c.digest for c in chunks)

    async def _chunks(
        self, chunks: list[Chunk], *, ahead: bool = False, tiers: set[ReadSource] | None = None,
        sources: dict[ChunkDigest, ReadSource] | None = None, read: tuple[InodeT, int, int] | None = None,
    ) -> dict[ChunkDigest, bytes | memoryview]:
        """The chunks' bytes, from memory, else from the fetcher (the node cache, then the
        network: one load per chunk however many readers want it); ``sources`` (when
        given) gets where each came from (none for memory), and a wait on the
        network for a ``read`` is reported."""
        out: dict[ChunkDigest, bytes | memoryview] = {}
        wanted: list[Chunk] = []
        for c in chunks:
            hit = self._lru.get(c.digest)
            if hit is None:
                wanted.append(c)
                continue
            self._lru.move_to_end(c.digest)
            if not ahead:
                self.stats.chunk_hits_memory += 1
                self.stats.bytes_from_memory += c.size
            if tiers is not None:
                tiers.add("memory")
            out[c.digest] = hit
        if not wanted:
            return out
        started = time.monotonic()
        got, cached = await self.fetcher.read(wanted, speculative=ahead)
        missing = []
        for c in wanted:
            if c.digest in cached:
                if not ahead:
                    self.stats.chunk_hits_cache += 1
                    self.stats.bytes_from_cache += c.size
                    if sources is not None:
                        sources[c.digest] = "cache"
                if tiers is not None:
                    tiers.add("cache")
            else:
                missing.append(c)
            out[c.digest] = got[c.digest]
            self._remember(c.digest, got[c.digest])
            if self._on_cached is not None:
                self._on_cached(c)
        if missing:
            if not ahead:
                self.stats.chunk_misses += len(missing)
            if tiers is not None:
                tiers.add("network")
            if sources is not None:
                sources.update((c.digest, "network") for c in missing)
            if read is not None and self.readlog is not None:
                self.readlog.waited(*read, missing, time.monotonic() - started)
        return out

    def _remember(self, digest: ChunkDigest, plain: bytes | memoryview) -> None:
        if isinstance(plain, memoryview) and memoryview(plain.obj).nbytes > 2 * plain.nbytes:
            plain = bytes(plain)  # do not pin a whole fetched range in memory for one chunk
        old = self._lru.pop(digest, None)
        if old is not None:
            self._lru_bytes -= len(old)
        self._lru[digest] = plain
        self._lru_bytes += len(plain)
        while self._lru and (len(self._lru) > self._lru_max or self._lru_bytes > self._lru_bytes_max):
            _, dropped = self._lru.popitem(last=False)
            self._lru_bytes -= len(dropped)
        if not self._lru:
            self._lru_bytes = 0  # whatever emptied it


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
