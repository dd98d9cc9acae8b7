"""The chunk server's batches: many chunks in one request (``POST /v1/chunks``, the wire
format in ``fetcher.peerwire``), for the nodes that ask one owner for several at once.

    POST /v1/chunks     (the cluster token, limit and 508 as for one chunk)
        400  a body that is not a batch, or one over the caps (64 chunks, 4 MiB)
        200  a stream of frames, one per chunk asked for, in the order they are had:
             the cached ones first, then those fetched from the origin as they arrive;
             then the END frame, and the connection is closed

Each chunk is served as a ``GET`` of it would be (``serve``: the node cache, else the
origin once for the node, however many peers ask: the fetcher's in-flight map); one
that cannot be had is a ``MISSING`` (404) or ``FAILED`` frame, and the rest of the batch
goes on. A batch holds one of the server's request slots while it runs, fetches at most
``FETCHES_PER_BATCH`` chunks at once (prefetch batches: ``PREFETCH_FETCHES`` for all of
them), and sends what it has by ``deadline``: chunks not had by then are ``FAILED`` frames.
Chunks the node cache holds (``cached``) are read without waiting for those limits: an
owner's cache hits must not queue behind its origin fetches for other nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from blockindex.format import Chunk
from fetcher.peerwire import (
    BATCH_CONTENT_TYPE,
    END,
    FAILED,
    MAX_BATCH_CHUNKS,
    MISSING,
    OK,
    frame,
    parse_batch_body,
)

from .peerhttp import Answer, Send

log = logging.getLogger(__name__)

FETCHES_PER_BATCH = MAX_BATCH_CHUNKS
"""Chunks of one batch of a read looked up or fetched at once: all of them, so that the
origin fetch plans them together (neighbours in one range request: ``fetcher.together``)."""
PREFETCH_FETCHES = 4 * MAX_BATCH_CHUNKS
"""Chunks of every prefetch batch together looked up or fetched at once: a few batches'
worth, planned together (one at a time, each was a request to the origin of its own), and
few enough that a read's batch does not queue behind them at the origin."""


class Refused(Exception):
    """A chunk (or a request) the server cannot serve: the HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Serve = Callable[[Chunk, "str | None", "str | None", bool], Awaitable[tuple[int, int, "bytes | memoryview"]]]
"""One chunk's ``(codec, size, stored payload)`` for a peer, or ``Refused``, given the
batch's repository and side index, and whether the batch is a prefetch's (fetched from the
origin at the prefetch's priority)."""
Cached = Callable[[Chunk], Awaitable["tuple[int, int, bytes | memoryview] | None"]]
"""The same from the node cache alone, or None."""


class BatchServer:
    """Answers batches with ``cached``, else ``serve``, counting in ``stats``
    (``PeerServerStats``)."""

    def __init__(self, serve: Serve, stats: BatchCounts, *, deadline: float,
                 cached: Cached | None = None, on_done: Callable[[], object] = lambda: None) -> None:
        """``on_done`` is called when a batch's answer ends (its request slot is free)."""
        self._serve = serve
        self._cached = cached
        self._stats = stats
        self._deadline = deadline
        self._prefetch = trio.CapacityLimiter(PREFETCH_FETCHES)
        self.active = 0
        """Batches being answered (each holds one of the server's request slots)."""
        self._on_done = on_done

    def answer(self, body: bytes) -> Answer:
        try:
            chunks, repo, prefetch, index = parse_batch_body(body)
        except ValueError as exc:
            self._stats.errors += 1
            return Answer(400, f"not a batch: {exc}\n".encode())
        unique = list({c.digest: c for c in chunks}.values())
        self._stats.batches += 1

        async def stream(send: Send) -> None:
            self.active += 1
            try:
                await self._frames(unique, repo, index, send, prefetch)
            finally:
                self.active -= 1
                self._on_done()

        return Answer(200, b"", content_type=BATCH_CONTENT_TYPE, stream=stream)

    async def _frames(self, chunks: Sequence[Chunk], repo: str | None, index: str | None, send: Send,
                      prefetch: bool) -> None:
        out, frames = trio.open_memory_channel[list[bytes | memoryview]](len(chunks))
        limit = self._prefetch if prefetch else trio.CapacityLimiter(FETCHES_PER_BATCH)
        stats = self._stats
        answered: set[bytes] = set()

        async def one(c: Chunk) -> None:
            had = await self._cached(c) if self._cached is not None else None
            if had is not None:
                codec, size, payload = had
            else:
                async with limit:
                    try:
                        codec, size, payload = await self._serve(c, repo, index, prefetch)
                    except Refused as exc:
                        if exc.status == 404:
                            stats.not_found += 1
                        else:
                            stats.errors += 1
                        answered.add(c.digest)
                        out.send_nowait(frame(c.digest, MISSING if exc.status == 404 else FAILED))
                        return
            stats.chunks_served += 1
            stats.bytes_served += len(payload)
            answered.add(c.digest)
            out.send_nowait(frame(c.digest, OK, codec, size, payload))

        async def every() -> None:
            with out, trio.move_on_after(self._deadline):
                async with trio.open_nursery() as nursery:
                    for c in chunks:
                        nursery.start_soon(one, c)

        async with trio.open_nursery() as nursery:  # a caller that stops taking them ends it all
            nursery.start_soon(every)
            async for f in frames:
                await send(f)
        for c in chunks:
            if c.digest not in answered:  # not had by the deadline
                stats.errors += 1
                await send(frame(c.digest, FAILED))
        await send(frame(bytes(32), END))


class BatchCounts(Protocol):
    """The counters of ``lazyfs.peer.PeerServerStats`` a batch moves."""

    batches: int
    chunks_served: int
    bytes_served: int
    not_found: int
    errors: int
