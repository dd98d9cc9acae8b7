"""What the readers of one mount did: the first-read trace, the slowest network waits,
and where each file's bytes came from. ``ImageContent`` calls it on every read, so every
method is plain and cheap; paths are looked up only when someone asks.

    ReadLog.first_reads(ino, spans)            before a read is served (trace recording)
    ReadLog.served(ino, spans, sources)        after: bytes by source, per file
    ReadLog.waited(ino, off, size, chunks, s)  a read waited ``s`` seconds on the network
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from typing import Any, Literal

from blockindex.format import Chunk, ChunkDigest, Span
from cache.trace import TraceRecorder

SLOW_KEEP = 16
"""How many of the slowest reads a mount keeps (``lazyfs status --slow``)."""
ReadSource = Literal["memory", "cache", "network"]
"""Where bytes handed to a reader came from: this mount's memory, the node cache, or the
network (peers or the origin)."""
SOURCES: tuple[ReadSource, ...] = ("memory", "cache", "network")
_SLOT = {source: i for i, source in enumerate(SOURCES)}


class ReadLog:
    def __init__(self, recorder: TraceRecorder | None, *, started: float | None = None,
                 slow_keep: int = SLOW_KEEP) -> None:
        self.recorder = recorder
        self.started = time.monotonic() if started is None else started
        self.lead: set[bytes] = set()
        """Digests of the chunks the learned order fetches first (for ``lead_misses``)."""
        self.lead_misses = 0
        """Chunks in the learned order that a read still had to wait on the network for."""
        self.by_file: dict[int, list[int]] = {}
        """Bytes handed to readers of each file, by source in ``SOURCES`` order (a list:
        one is kept per file read)."""
        self.paths: dict[int, str] = {}
        """Paths of the inodes in the slow list, looked up once each."""
        self._slow: list[tuple[float, int, dict[str, Any]]] = []
        self._keep = slow_keep
        self._seq = itertools.count()

    def first_reads(self, ino: int, spans: Sequence[Span]) -> None:
        if self.recorder is not None and self.recorder.active:
            self.recorder.read(ino, spans)

    def served(self, ino: int, spans: Sequence[Span], sources: dict[ChunkDigest, ReadSource]) -> None:
        """``sources``: where each chunk came from; one missing came from memory."""
        counts = self.by_file.get(ino)
        if counts is None:
            counts = self.by_file[ino] = [0, 0, 0]
        for s in spans:
            if s.chunk is not None:
                counts[_SLOT[sources.get(s.chunk.digest, "memory")]] += s.length

    def waited(self, ino: int, offset: int, size: int, chunks: Sequence[Chunk], seconds: float) -> None:
        if self.lead:
            self.lead_misses += sum(c.digest in self.lead for c in chunks)
        if len(self._slow) >= self._keep and seconds <= self._slow[0][0]:
            return
        record = {"ino": ino, "offset": offset, "size": size, "wait": round(seconds, 6),
                  "at": round(time.monotonic() - self.started, 3),
                  "chunks": [c.hexdigest for c in chunks[:8]], "chunk_count": len(chunks)}
        item = (seconds, next(self._seq), record)
        if len(self._slow) < self._keep:
            heapq.heappush(self._slow, item)
        else:
            heapq.heapreplace(self._slow, item)

    def slowest(self) -> list[dict[str, Any]]:
        """The reads that waited longest on the network, longest first."""
        return [r for _, _, r in sorted(self._slow, key=lambda x: -x[0])]

    def file_sources(self, ino: int) -> dict[ReadSource, int]:
        counts = self.by_file.get(ino, [0, 0, 0])
        return dict(zip(SOURCES, counts, strict=True))


def file_state(index: Any, store: Any, readlog: ReadLog | None, ino: int) -> dict[str, Any]:
    """``user.lazyfs.state`` of one inode: how much of it is in the node cache, and where
    the bytes this mount handed its readers came from. One stat per chunk of the file."""
    node = index.attr(ino)
    chunks = index.chunks_of(ino)
    cached = [c for c in chunks if store.contains(c.digest, c.size)]
    stored = sum(c.size for c in chunks)
    state: dict[str, Any] = {
        "size": node.size,
        "chunks": len(chunks),
        "cached_chunks": len(cached),
        "cached_bytes": sum(c.size for c in cached) + max(node.size - stored, 0),  # holes need nothing
        "complete": len(cached) == len(chunks),
        "read_bytes": readlog.file_sources(ino) if readlog is not None else None,
    }
    if readlog is not None and readlog.lead:
        state["lead_chunks"] = sum(c.digest in readlog.lead for c in chunks)
    return state
