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
from collections.abc import Callable

import trio

from blockindex.codec import ChunkDecodeError, decode, decode_verified, encode
from blockindex.format import CODEC_RAW, Chunk
from cache.store import ChunkStore

from .errors import FetchError, IntegrityError
from .lowprio import BACKGROUND
from .plan import Range

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
                 give_way: Callable[[], object] | None = None) -> Checked:
    """Decode and check every chunk of a fetched range; cache the good ones in ``store``
    when given. Runs in a worker thread for large ranges, calling ``give_way`` (which may
    block) before each chunk."""
    view = memoryview(data)
    out: Checked = []
    for c in rng.chunks:
        if give_way is not None:
            give_way()
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


def load_cached(store: ChunkStore, c: Chunk) -> tuple[bytes | memoryview, memoryview] | None:
    """The plain bytes and stored payload of ``c`` from the node cache, or None. What the
    cache holds was checked when it was written, and the store checks each entry's own
    checksum as it reads it, so it is decoded, not hashed again; an entry that does not
    match the index's size, or does not decode, is dropped.

    The codec may differ from the index's: the store is shared by every image on the node,
    and an lz4 image and a zstd one hold the same bytes under one digest. Such an entry
    serves the read; the payload (what a peer is sent, labelled with this image's codec)
    is then encoded again in this image's codec."""
    entry = store.get(c.digest)
    if entry is None:
        return None
    codec, size, payload = entry
    try:
        if size != c.size:
            raise ChunkDecodeError("entry does not match the index")
        plain = decode(codec, size, payload)
    except ChunkDecodeError as exc:
        log.warning("cache entry %s unusable (%s); dropped", c.hexdigest, exc)
        store.remove(c.digest)
        return None
    if codec == c.codec:
        return plain, payload
    if c.codec == CODEC_RAW:
        return plain, memoryview(plain)
    again, stored = encode(bytes(plain), codec=c.codec)
    if again != c.codec:  # this library no longer compresses it as convert did
        return None
    return plain, memoryview(stored)


class Verifier:
    """Checks chunks and ranges, in worker threads above ``thread_above`` bytes (at most
    two at once, so that checking never takes every core from the readers)."""

    def __init__(self, *, thread_above: int) -> None:
        self.thread_above = thread_above
        self._cpu = trio.CapacityLimiter(2)
        self._disk = trio.CapacityLimiter(4)  # reads of the node cache

    async def chunk(self, c: Chunk, payload: bytes | memoryview) -> bytes | memoryview:
        """The plain bytes of ``c`` from its stored ``payload``; ``ChunkDecodeError`` if
        they are not the chunk's."""
        if c.size > self.thread_above:
            return await trio.to_thread.run_sync(decode_verified, c, payload, limiter=self._cpu)
        return decode_verified(c, payload)

    async def cached(self, store: ChunkStore, c: Chunk) -> tuple[bytes | memoryview, memoryview] | None:
        """The plain bytes and stored payload of ``c`` from the node cache (``load_cached``),
        in a worker thread if it is large; None if the cache lacks it."""
        if c.size > self.thread_above:
            return await trio.to_thread.run_sync(load_cached, store, c, limiter=self._disk)
        return load_cached(store, c)

    async def range(self, rng: Range, data: bytes | bytearray | memoryview, store: ChunkStore | None = None,
                    give_way: Callable[[], object] | None = None) -> Checked:
        """``verify_range`` of a fetched range: on the trio loop if it is small, else in
        a worker thread; with ``give_way`` (background work that must give way to reads)
        in one of the low-priority threads that never serve a read."""
        if rng.end - rng.start <= self.thread_above:
            return verify_range(rng, data, store)
        if give_way is not None:
            return await BACKGROUND.run_sync(verify_range, rng, data, store, give_way)
        return await trio.to_thread.run_sync(verify_range, rng, data, store, limiter=self._cpu)
