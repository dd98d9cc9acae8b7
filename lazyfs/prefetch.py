"""Fill the node cache with every chunk of a mounted image, giving way to reads.

Chunks go in blob order, batched into large range requests; each request waits while
any demand read is fetching, so a prefetch never slows the reads a container is
waiting on. Once every chunk is cached the image is marked complete and can be
mounted and read with the network gone.

Given a ``lead`` (the chunks a learned trace says are read first: see ``cache.trace``),
those go first, in that order, in waves of up to ``lead_wave_bytes`` handed to the
fetcher at once so that neighbours in a blob merge into a few large requests; they are
background requests too, so a read is never queued behind them. ``lead_only`` stops
after them (``lazyfs mount --prefetch trace``).

Given ``layers`` (an ordinary image read by its side index: ``layercheck.LayerVerifier.run``),
the fill streams each layer whole and checks the side index against it, caching every
chunk it cuts; only what that left missing is fetched after, by span. A side index that
fails the check stops the prefetch: nothing more is read through it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio

from blockindex.format import Chunk, ChunkDigest
from blockindex.reader import IndexReader
from cache.errors import CacheError
from cache.images import ImageStore
from cache.room import wait_for_room
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.errors import FetchError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Progress:
    """How far the prefetch of one image has got."""

    state: str = "pending"  # pending, running, complete, off, failed-retrying, paused-cache-full, stopped
    total_chunks: int = 0
    total_bytes: int = 0
    cached_chunks: int = 0
    cached_bytes: int = 0
    fetched_bytes: int = 0
    started: float | None = None
    finished: float | None = None
    lead_state: str = "none"  # none, looking, replaying, done
    lead_source: str | None = None  # where the lead came from: local, registry, peer URL, index
    lead_chunks: int = 0
    lead_bytes: int = 0
    lead_missing: int = 0  # of the lead's chunks, those the cache lacked at the start
    lead_fetched_bytes: int = 0
    lead_seconds: float | None = None
    _seen: set[bytes] = dataclasses.field(default_factory=set, repr=False)

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def reset(self) -> None:
        self.total_chunks = self.total_bytes = self.cached_chunks = self.cached_bytes = 0
        self._seen.clear()

    def cached(self, chunk: Chunk) -> bool:
        """Count ``chunk`` as cached (once, whoever fetched it); False if it was already."""
        if chunk.digest in self._seen:
            return False
        self._seen.add(chunk.digest)
        self.cached_chunks += 1
        self.cached_bytes += chunk.size
        return True

    def is_cached(self, chunk: Chunk) -> bool:
        return chunk.digest in self._seen


class Prefetcher:
    """Fetches every chunk of one image that the cache does not hold yet."""

    def __init__(
        self,
        index_path: Path,
        store: ChunkStore,
        images: ImageStore,
        manifest_digest: str,
        fetcher: ChunkFetcher | None,
        *,
        batch_bytes: int = 4 << 20,
        concurrency: int = 4,
        retry_delay: float = 5.0,
        lead: Callable[[IndexReader], Awaitable[tuple[list[ChunkDigest], str | None]]] | None = None,
        lead_only: bool = False,
        lead_wave_bytes: int = 16 << 20,
        layers: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """``lead(index)`` returns the digests to fetch first and where they came from.
        ``concurrency`` batches are under way at once: the fetcher's limit on background
        requests keeps two of them on the network, while the others are checked and
        written, so the link is never idle waiting for the disk."""
        self._index_path = index_path
        self._index: IndexReader | None = None  # its own connection: it is used from threads
        self._store = store
        self._images = images
        self._manifest = manifest_digest
        self._fetcher = fetcher
        self._batch_bytes = batch_bytes
        self._retry_delay = retry_delay
        self._concurrency = concurrency
        self._lead = lead
        self._lead_only = lead_only
        self._lead_wave = lead_wave_bytes
        self._layers = layers
        self.progress = Progress()
        self._pausing = 0
        self._chunks: list[Chunk] | None = None
        """Every chunk of the image while ``run`` goes on: each scan after the first checks
        the cache for these rather than reading the index again."""

    async def scan(self) -> list[Chunk]:
        """Count what is cached; return what is missing, in blob order."""
        return await trio.to_thread.run_sync(self._scan)

    def _scan(self) -> list[Chunk]:
        p = self.progress
        p.reset()
        missing = []
        chunks = self._chunks if self._chunks is not None else self._open_index().all_chunks()
        for c in chunks:
            p.total_chunks += 1
            p.total_bytes += c.size
            if self._store.contains(c.digest, c.size):  # a short (torn) entry is refetched
                p.cached(c)
            else:
                missing.append(c)
        return missing

    def _open_index(self) -> IndexReader:
        if self._index is None:
            self._index = IndexReader(self._index_path)
        return self._index

    def count_totals(self, index: IndexReader) -> None:
        """Without a prefetch, fill in the image's totals from the index alone (one SQL
        aggregate) rather than checking the cache for every chunk: ``cached`` then counts
        the chunks this mount found in the cache or fetched."""
        totals = index.totals()
        self.progress.total_chunks = totals["chunks"]
        self.progress.total_bytes = totals["chunk_bytes"]
        self.progress.state = "off"

    async def run(self) -> None:
        """Prefetch to completion, retrying failed batches with a pause; returns when
        every chunk is cached (or, without a fetcher, after counting)."""
        p = self.progress
        p.started = time.monotonic()
        try:
            await self._run()
        finally:
            self._chunks = None

    async def _run(self) -> None:
        p = self.progress
        self._chunks = await trio.to_thread.run_sync(lambda: list(self._open_index().all_chunks()))
        missing = await self.scan()
        if self._fetcher is None:
            p.state = "complete" if not missing else "off"
            return
        p.state = "running"
        if self._lead is not None:
            missing = await self._run_lead(missing)
            if self._lead_only:
                p.state = "off"
                return
        if self._layers is not None:
            if not await self._layers():  # the side index lied: read nothing more through it
                p.state = "stopped"
                return
            missing = await self.scan()
        while missing:
            failures = 0
            batches = iter(_batches(missing, self._batch_bytes))

            async def worker(batches: Iterator[list[Chunk]]) -> None:
                nonlocal failures
                for batch in batches:  # workers share one iterator: each batch once
                    await wait_for_room(self._store, self._batch_bytes, poll=self._retry_delay,
                                        on_pause=self._paused)
                    failures += not await self._fetch(batch)

            async with trio.open_nursery() as nursery:
                for _ in range(self._concurrency):
                    nursery.start_soon(worker, batches)
            missing = await self.scan()
            if missing:
                # failed batches, or chunks fetched but not kept (the cache disk refuses)
                p.state = "failed-retrying"
                log.warning("prefetch: %d chunks still missing (%d failed batches); "
                            "retrying in %gs", len(missing), failures, self._retry_delay)
                await trio.sleep(self._retry_delay)
                p.state = "running"
        p.state = "complete"
        p.finished = time.monotonic()
        assert p.started is not None  # run(), _run's only caller, set it
        try:
            self._images.mark_complete(self._manifest)
        except CacheError as exc:  # the image is complete; only an offline remount is lost
            log.warning("prefetch complete, but %s", exc)
        log.info("prefetch complete: %d chunks, %d bytes in %.1fs",
                 p.total_chunks, p.total_bytes, p.finished - p.started)

    async def _run_lead(self, missing: list[Chunk]) -> list[Chunk]:
        """Fetch the lead's missing chunks in lead order; the rest of ``missing`` after."""
        assert self._lead is not None and self._index is not None
        p = self.progress
        p.lead_state = "looking"
        try:
            digests, p.lead_source = await self._lead(self._index)
        except Exception:  # a trace is a hint: never let it stop the prefetch
            log.exception("prefetch: could not plan the learned order; prefetching in blob order")
            digests = []
        index = self._index
        chunks = await trio.to_thread.run_sync(lambda: [c for d in dict.fromkeys(digests)
                                                        if (c := index.chunk(d)) is not None])
        p.lead_chunks = len(chunks)
        p.lead_bytes = sum(c.stored_size for c in chunks)
        by_digest = {c.digest: c for c in missing}
        lead = [by_digest[c.digest] for c in chunks if c.digest in by_digest]
        p.lead_missing = len(lead)
        if lead:
            p.lead_state = "replaying"
            started = time.monotonic()
            log.info("prefetch: %d chunks (%d bytes) of the learned order first (%s)",
                     len(lead), sum(c.stored_size for c in lead), p.lead_source)
            waves = iter(_waves(lead, self._lead_wave))

            async def worker() -> None:
                for wave in waves:  # workers share one iterator: waves go in lead order
                    before = p.fetched_bytes
                    await self._fetch(wave)
                    p.lead_fetched_bytes += p.fetched_bytes - before

            async with trio.open_nursery() as nursery:
                for _ in range(self._concurrency):
                    nursery.start_soon(worker)
            p.lead_seconds = round(time.monotonic() - started, 4)
        p.lead_state = "done"
        taken = {c.digest for c in lead}
        return [c for c in missing if c.digest not in taken or not p.is_cached(c)]

    async def _fetch(self, batch: list[Chunk]) -> bool:
        assert self._fetcher is not None
        p = self.progress
        batch = [c for c in batch if not p.is_cached(c)]  # a reader may have fetched it since
        if not batch:
            return True
        try:
            got = await self._fetcher.get(batch, background=True)
        except FetchError as exc:
            log.warning("prefetch: %s", exc)
            return False
        full = self._store.full
        for c in batch:
            if full and not self._store.contains(c.digest, c.size):
                continue  # fetched, but the full disk did not keep it
            if c.digest in got and p.cached(c):
                p.fetched_bytes += c.stored_size
        return True

    def _paused(self, paused: bool) -> None:
        """Workers pause on a full cache disk together: say so once, not per worker."""
        self._pausing += 1 if paused else -1
        if paused and self._pausing == 1:
            self.progress.state = "paused-cache-full"
            log.warning("prefetch paused: the cache disk at %s is full", self._store.root)
        elif not paused and self._pausing == 0:
            self.progress.state = "running"
            log.warning("prefetch resumed: the cache disk has room again")


def _waves(chunks: list[Chunk], limit: int) -> list[list[Chunk]]:
    """Consecutive pieces of ``chunks`` (any blobs) of up to ``limit`` stored bytes: the
    fetcher merges the neighbours within each into range requests. (Waves that start
    small and double were tried: no faster on a 100 Mbit/s, 30 ms link, and the small
    waves split into more requests.)"""
    return _pieces(chunks, limit, by_blob=False)


def _batches(chunks: list[Chunk], limit: int) -> list[list[Chunk]]:
    """Consecutive runs of one blob, each up to ``limit`` stored bytes."""
    return _pieces(chunks, limit, by_blob=True)


def _pieces(chunks: list[Chunk], limit: int, *, by_blob: bool) -> list[list[Chunk]]:
    out: list[list[Chunk]] = []
    cur: list[Chunk] = []
    size = 0
    for c in chunks:
        if cur and (size + c.stored_size > limit or by_blob and c.blob.digest != cur[-1].blob.digest):
            out.append(cur)
            cur, size = [], 0
        cur.append(c)
        size += c.stored_size
    if cur:
        out.append(cur)
    return out
