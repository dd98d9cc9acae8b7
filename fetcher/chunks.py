"""Verified chunks from a blob source, each fetched once however many readers want it.

Missing chunks of one blob that lie close together are merged into one range request;
every chunk is decoded and checked against its BLAKE3 digest before anyone sees it or
it is cached; a chunk that fails the check is never cached and its readers get an
``IntegrityError``. Demand reads always go first: background (prefetch) requests wait
while any demand fetch is in flight, and are limited in number.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence

import trio

from blockindex.codec import ChunkDecodeError, decode_verified
from blockindex.format import Chunk, ChunkDigest
from cache.store import ChunkStore

from .errors import FetchError, IntegrityError, UnreachableError
from .source import BlobSource

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """How chunks are fetched."""

    deadline: float = 30.0
    """Seconds a demand read waits for its chunks before failing (EIO at the mount)."""
    background_deadline: float = 120.0
    """Seconds one background (prefetch) request may take before it is given up and retried."""
    max_request: int = 16 << 20
    """Largest merged range request, in bytes."""
    max_gap: int = 256 << 10
    """Neighbouring chunks of a blob at most this far apart are fetched in one request
    (the gap's bytes are read and discarded: cheaper than another round trip)."""
    background_concurrency: int = 2
    """Background requests in flight at once."""
    thread_above: int = 128 << 10
    """Chunks larger than this are decoded and hashed in a worker thread, so that the
    trio loop (and every other reader of the mount) is not held up."""


@dataclasses.dataclass
class FetchStats:
    """Counters of one fetcher, read by ``lazyfs status``."""

    requests: int = 0
    bytes_received: int = 0
    chunks_fetched: int = 0
    integrity_failures: int = 0
    failed_requests: int = 0
    demand_requests: int = 0
    demand_wait_seconds: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """One request: chunks of one blob lying within ``[start, end)``."""

    blob: str
    start: int
    end: int
    chunks: tuple[Chunk, ...]


def plan_ranges(chunks: Iterable[Chunk], *, max_request: int, max_gap: int) -> list[Range]:
    """Group chunks into as few range requests as the limits allow."""
    by_blob: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_blob.setdefault(c.blob.digest, []).append(c)
    out: list[Range] = []
    for blob, group in by_blob.items():
        group.sort(key=lambda c: c.offset)
        cur: list[Chunk] = []
        start = end = 0
        for c in group:
            c_end = c.offset + c.stored_size
            if cur and c.offset - end <= max_gap and c_end - start <= max_request:
                cur.append(c)
                end = max(end, c_end)
                continue
            if cur:
                out.append(Range(blob, start, end, tuple(cur)))
            cur, start, end = [c], c.offset, c_end
        if cur:
            out.append(Range(blob, start, end, tuple(cur)))
    return out


class _Pending:
    __slots__ = ("event", "data", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | memoryview | None = None
        self.error: FetchError | None = None


class ChunkFetcher:
    """Fetches, verifies and caches chunks. Fetch tasks run in ``nursery`` so that a
    reader giving up (its deadline) does not cancel a fetch other readers wait for."""

    def __init__(
        self,
        nursery: trio.Nursery,
        source: BlobSource,
        store: ChunkStore | None,
        config: FetchConfig = FetchConfig(),
        *,
        source_name: str = "origin",
    ) -> None:
        self._nursery = nursery
        self._source = source
        self._store = store
        self.config = config
        self.source_name = source_name
        self.stats = FetchStats()
        self._inflight: dict[ChunkDigest, _Pending] = {}
        self._cpu = trio.CapacityLimiter(2)
        self._background = trio.CapacityLimiter(config.background_concurrency)
        self._demand = 0
        self._idle = trio.Event()
        self._idle.set()

    async def get(
        self, chunks: Sequence[Chunk], *, background: bool = False
    ) -> dict[ChunkDigest, bytes | memoryview]:
        """The uncompressed, verified bytes of ``chunks``, fetched and cached.

        Raises a ``FetchError`` (``UnreachableError`` past the deadline, ``IntegrityError``
        for bad bytes) if any of them cannot be had."""
        waits: list[tuple[Chunk, _Pending]] = []
        new: list[Chunk] = []
        seen: set[bytes] = set()
        for c in chunks:
            if c.digest in seen:
                continue
            seen.add(c.digest)
            p = self._inflight.get(c.digest)
            if p is None:
                p = self._inflight[c.digest] = _Pending()
                new.append(c)
            waits.append((c, p))
        for rng in plan_ranges(new, max_request=self.config.max_request, max_gap=self.config.max_gap):
            self._nursery.start_soon(self._fetch_range, rng, background)
        deadline = self.config.background_deadline if background else self.config.deadline
        started = time.monotonic()
        out: dict[ChunkDigest, bytes | memoryview] = {}
        with trio.move_on_after(deadline) as scope:
            for c, p in waits:
                await p.event.wait()
                if p.error is not None:
                    raise p.error
                assert p.data is not None
                out[c.digest] = p.data
        if not background:
            self.stats.demand_wait_seconds += time.monotonic() - started
        if scope.cancelled_caught:
            for _, p in waits:
                if p.error is not None:
                    raise p.error
            late = next((c for c, p in waits if not p.event.is_set()), None)
            if late is None:  # everything arrived just as the deadline passed
                return {c.digest: p.data for c, p in waits if p.data is not None}
            raise UnreachableError(
                f"chunk {late.hexdigest[:16]} of blob {late.blob.digest[:19]} "
                f"not fetched within {deadline:g}s"
            )
        return out

    async def wait_demand_idle(self) -> None:
        """Return once no demand fetch is in flight (background work calls this first)."""
        while self._demand:
            await self._idle.wait()

    async def _fetch_range(self, rng: Range, background: bool) -> None:
        pendings = [self._inflight[c.digest] for c in rng.chunks]
        try:
            if background:
                async with self._background:
                    await self.wait_demand_idle()
                    data = await self._request(rng, self.config.background_deadline)
            else:
                self._demand += 1
                if self._demand == 1:
                    self._idle = trio.Event()
                self.stats.demand_requests += 1
                try:
                    data = await self._request(rng, self.config.deadline)
                finally:
                    self._demand -= 1
                    if self._demand == 0:
                        self._idle.set()
            # Verify (and, for the prefetcher, cache) the whole range in one worker thread
            # call: hashing and disk writes stay off the trio loop, and a range of many
            # chunks pays for one thread hop, not two per chunk.
            store = self._store if background else None
            if rng.end - rng.start > self.config.thread_above:
                results = await trio.to_thread.run_sync(_verify_range, rng, data, store, limiter=self._cpu)
            else:
                results = _verify_range(rng, data, store)
            for c, p, result in zip(rng.chunks, pendings, results, strict=True):
                if isinstance(result, ChunkDecodeError):
                    self.stats.integrity_failures += 1
                    log.error(
                        "chunk %s at %d in blob %s from %s failed verification (%s); not cached",
                        c.hexdigest, c.offset, c.blob.digest, self.source_name, result,
                    )
                    p.error = IntegrityError(
                        f"chunk {c.hexdigest[:16]} from {self.source_name} failed verification"
                    )
                    continue
                p.data = result
                self.stats.chunks_fetched += 1
                if self._store is not None and not background:  # a reader should not wait for the disk
                    at = c.offset - rng.start
                    self._nursery.start_soon(self._cache, c, bytes(memoryview(data)[at : at + c.stored_size]))
        except FetchError as exc:
            self.stats.failed_requests += 1
            log.warning("fetching %d chunk(s) of blob %s [%d, %d) from %s failed: %s",
                        len(rng.chunks), rng.blob, rng.start, rng.end, self.source_name, exc)
            for p in pendings:
                p.error = exc
        except Exception as exc:  # a bug must fail the read, never the whole mount
            self.stats.failed_requests += 1
            log.exception("unexpected error fetching blob %s [%d, %d)", rng.blob, rng.start, rng.end)
            for p in pendings:
                p.error = FetchError(f"unexpected error fetching blob {rng.blob}: {exc!r}")
        finally:
            for c, p in zip(rng.chunks, pendings, strict=True):
                if p.data is None and p.error is None:
                    p.error = FetchError(f"chunk {c.hexdigest[:16]} was not fetched")
                p.event.set()
                self._inflight.pop(c.digest, None)

    async def _request(self, rng: Range, deadline: float) -> bytes | bytearray:
        length = rng.end - rng.start
        self.stats.requests += 1
        with trio.move_on_after(deadline) as scope:
            data = await self._source.read_range(rng.blob, rng.start, length)
        if scope.cancelled_caught:
            raise UnreachableError(f"{self.source_name} sent no answer for blob "
                                   f"{rng.blob[:19]} within {deadline:g}s")
        if len(data) != length:
            raise IntegrityError(f"{self.source_name} sent {len(data)} bytes for a {length}-byte range")
        self.stats.bytes_received += length
        return data

    async def _cache(self, chunk: Chunk, payload: bytes) -> None:
        assert self._store is not None
        await trio.to_thread.run_sync(self._store.put, chunk.digest, chunk.codec, chunk.size, payload)


def _verify_range(
    rng: Range, data: bytes | bytearray, store: ChunkStore | None
) -> list[bytes | memoryview | ChunkDecodeError]:
    """Decode and check every chunk of a fetched range; cache the good ones in ``store``
    when given. Runs in a worker thread for large ranges."""
    view = memoryview(data)
    out: list[bytes | memoryview | ChunkDecodeError] = []
    for c in rng.chunks:
        payload = view[c.offset - rng.start : c.offset - rng.start + c.stored_size]
        try:
            plain = decode_verified(c, payload)
        except ChunkDecodeError as exc:
            out.append(exc)
            continue
        if store is not None:
            store.put(c.digest, c.codec, c.size, payload)
        out.append(plain)
    return out
