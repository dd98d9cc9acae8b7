"""Fetched bytes checked against their chunk's BLAKE3 digest before anyone sees them.

Every chunk is decoded and checked before it is handed to a reader or cached; one that
fails the check is never cached. Hashing and decompressing a large chunk or range holds
the CPU for milliseconds, and pyfuse3 serves every reader of the mount from the trio
loop's one thread, so work above ``thread_above`` bytes goes to a worker thread:

    verifier = Verifier(thread_above=128 << 10)
    plain = await verifier.chunk(c, payload)               # ChunkDecodeError if wrong
    results = await verifier.range(rng, data, store, give_way)

A whole range is checked (and, for the prefetcher, cached) in one thread call, so that a
range of many chunks pays for one thread hop, not two per chunk. Background ranges
outside a cluster go to low-priority threads that give way to demand reads between
chunks (``lowprio.py``, ``gate.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from blockindex.codec import ChunkDecodeError, check_plain, decode_verified, encode
from blockindex.format import CODEC_LZ4, CODEC_RAW, CODECS, Chunk
from cache.store import ChunkStore

from .errors import FetchError, IntegrityError
from .inflight import Pending, Underway
from .lowprio import BACKGROUND
from .plan import Range
from .spans import InflatedRange

log = logging.getLogger(__name__)

Verified = tuple[bytes | memoryview, bytes]
"""A chunk fetched and checked: its plain bytes, and its payload as stored in the blob."""

Checked = list[bytes | memoryview | ChunkDecodeError]
"""Per chunk of a range, in order: its plain bytes, or why they are wrong."""


def integrity_error(c: Chunk, source: str) -> FetchError:
    """What a reader of chunk ``c`` is told when ``source`` sent wrong bytes for it."""
    return IntegrityError(f"chunk {c.hexdigest[:16]} from {source} failed verification").about(
        chunk=c.hexdigest, blob=c.blob.digest, source=source)


def verify_range(rng: Range, data: bytes | bytearray | memoryview, store: ChunkStore | None = None,
                 give_way: Callable[[], object] | None = None, spans: InflatedRange | None = None
                 ) -> Checked:
    """Decode and check every chunk of a fetched range; cache the good ones in ``store``
    when given. Runs in a worker thread for large ranges, calling ``give_way`` (which may
    block) before each chunk. Chunks of a gzip layer come out of ``spans`` when given (the
    inflate of the whole range that ``rng`` is part of, ``spans.py``)."""
    view = memoryview(data)
    out: Checked = []
    for c in rng.chunks:
        if give_way is not None:
            give_way()
        payload = view[c.offset - rng.start : c.offset - rng.start + c.stored_size]
        try:
            plain = spans.plain(c) if spans is not None else decode_verified(c, payload)
        except ChunkDecodeError as exc:
            out.append(exc)
            continue
        if store is not None:
            store.put(c.digest, plain)
        out.append(plain)
    return out


def load_cached(store: ChunkStore, c: Chunk) -> memoryview | None:
    """The plain bytes of ``c`` from the node cache, or None. What the cache holds was
    checked when it was written, and the store checks each block's own checksum as it
    reads it, so it is not hashed again; an entry of another size than the index says is
    dropped."""
    plain = store.get(c.digest)
    if plain is None:
        return None
    if len(plain) != c.size:
        log.warning("cache entry %s unusable (%d bytes, the index says %d); dropped",
                    c.hexdigest, len(plain), c.size)
        store.remove(c.digest)
        return None
    return plain


def stored_payload(plain: bytes | memoryview, c: Chunk | None = None) -> tuple[int, bytes] | None:
    """``(codec, payload)``: the plain bytes of a chunk encoded as convert encodes them,
    which is how its blob stores them (the node cache keeps plain bytes; a peer is sent the
    stored form). Given the chunk ``c``, None unless that is its codec and stored size (an
    image converted by another encoder): whoever receives it checks its digest anyway."""
    if c is not None and c.codec not in CODECS:  # a gzip span: its stored form is not its own
        return None
    if c is not None and c.codec == CODEC_RAW:
        codec, payload = CODEC_RAW, bytes(plain)
    else:  # in the chunk's own codec: lz4 and zstd images share the node cache
        codec, payload = encode(bytes(plain), codec=CODEC_LZ4 if c is None else c.codec)
    if c is not None and (codec, len(payload)) != (c.codec, c.stored_size):
        return None
    return codec, payload


class InlineWaits:
    """Whether a small read of the node cache that has to wait for the disk waits on the
    trio loop rather than in a worker thread.

    Handing a read to a thread and back costs about 100 microseconds of wake-ups on the
    VMs we run on, more than a local SSD takes to read 64 KiB; so on a disk that answers
    quickly a small read waits where it is, and every other request of the mount waits
    that long with it, as it would for the same time of checking. A read that takes
    longer than ``slow`` sends the small reads after it to threads for ``back_off``
    seconds; then one waits on the loop again, to see whether the disk has recovered. So
    a slow or busy disk holds the loop for at most one read a ``back_off``."""

    def __init__(self, *, slow: float = 0.002, back_off: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slow = slow
        self.back_off = back_off
        self._clock = clock
        self._threads_until = 0.0
        self.reads = 0
        """Reads that waited on the loop."""
        self.slow_reads = 0
        """Of those, the ones that took longer than ``slow``."""

    def allowed(self) -> bool:
        return self._clock() >= self._threads_until

    def took(self, seconds: float) -> None:
        self.reads += 1
        if seconds > self.slow:
            self.slow_reads += 1
            self._threads_until = self._clock() + self.back_off


class Verifier:
    """Checks chunks and ranges, in worker threads above ``thread_above`` bytes (at most
    two at once, so that checking never takes every core from the readers)."""

    def __init__(self, *, thread_above: int, inline: InlineWaits | None = None) -> None:
        self.thread_above = thread_above
        self._cpu = trio.CapacityLimiter(2)
        self._disk = trio.CapacityLimiter(4)  # reads of the node cache
        self.inline = inline if inline is not None else InlineWaits()

    async def chunk(self, c: Chunk, payload: bytes | memoryview, *, plain: bool = False
                    ) -> bytes | memoryview:
        """The plain bytes of ``c`` from its stored ``payload`` (``plain``: the payload is
        its plain bytes, as a peer sends a gzip span's); ``ChunkDecodeError`` if they are
        not the chunk's."""
        check = check_plain if plain else decode_verified
        if c.size > self.thread_above:
            return await trio.to_thread.run_sync(check, c, payload, limiter=self._cpu)
        return check(c, payload)


    async def take_checked(self, c: Chunk, p: Pending, under: Underway, source: str) -> None:
        """Check one chunk from the bytes of a background range under way, for a reader
        waiting on ``p`` (the range itself caches it, and logs and counts a bad one)."""
        assert under.data is not None
        at = c.offset - under.start
        payload = memoryview(under.data)[at : at + c.stored_size]
        try:
            p.data = await self.chunk(c, payload)
            p.payload = payload
        except ChunkDecodeError:
            p.error = integrity_error(c, source)
        except Exception as exc:  # a bug must fail the read, never the whole mount
            log.exception("unexpected error checking chunk %s", c.hexdigest)
            p.error = FetchError(f"unexpected error checking chunk {c.hexdigest[:16]}: {exc!r}")
        finally:
            p.event.set()

    async def cached(self, store: ChunkStore, c: Chunk) -> memoryview | None:
        """The plain bytes of ``c`` from the node cache (``load_cached``), in a worker
        thread if it is large; None if the cache lacks it."""
        if c.size > self.thread_above:
            return await trio.to_thread.run_sync(load_cached, store, c, limiter=self._disk)
        return load_cached(store, c)

    async def cached_range(self, store: ChunkStore, c: Chunk, offset: int, size: int, *,
                           on_disk: Callable[[Chunk, int], object] | None = None
                           ) -> bytes | memoryview | None:
        """Bytes ``[offset, offset + size)`` of ``c`` from the node cache alone
        (``ChunkStore.read_range``: the blocks they touch, checked), or None if it lacks
        the chunk. On the trio loop when the bytes are in the page cache and the read is
        small, or when it is small and the disk answers small reads quickly
        (``InlineWaits``); otherwise in a worker thread (``on_disk(c, offset)`` is told
        first of a read that waits for the disk)."""
        if size > self.thread_above:
            if on_disk is not None:
                on_disk(c, offset)
        else:
            waited = 0.0

            def then_wait() -> bool:  # the bytes are not all in memory: wait here, or in a thread?
                nonlocal waited
                if on_disk is not None:
                    on_disk(c, offset)
                if not self.inline.allowed():
                    return False
                waited = time.perf_counter()
                return True

            try:
                return store.read_range(c.digest, offset, size, nowait=True, then_wait=then_wait)
            except BlockingIOError:
                pass
            finally:
                if waited:
                    self.inline.took(time.perf_counter() - waited)
        return await trio.to_thread.run_sync(store.read_range, c.digest, offset, size, limiter=self._disk)

    async def range(self, rng: Range, data: bytes | bytearray | memoryview, store: ChunkStore | None = None,
                    give_way: Callable[[], object] | None = None, spans: InflatedRange | None = None
                    ) -> Checked:
        """``verify_range`` of a fetched range: on the trio loop if it is small, else in
        a worker thread; with ``give_way`` (background work that must give way to reads)
        in one of the low-priority threads that never serve a read."""
        if rng.end - rng.start <= self.thread_above:
            return verify_range(rng, data, store, None, spans)
        if give_way is not None:
            return await BACKGROUND.run_sync(verify_range, rng, data, store, give_way, spans)
        return await trio.to_thread.run_sync(verify_range, rng, data, store, None, spans, limiter=self._cpu)
