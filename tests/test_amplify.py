"""A demand miss fetches the chunks after it in its blob in the same request: they are
checked and cached like any chunk, a bad one is dropped without failing the read, and
the reader waits for its own chunks only (the fetcher with a scripted source; the real
mount is in test_mount)."""

from __future__ import annotations

import os

import pytest
import trio

from blockindex.codec import decode
from blockindex.format import Chunk
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.errors import IntegrityError
from testkit.waiting import wait_until

from .fakes import ScriptedSource, make_blob

PIECES = [os.urandom(5000), b"a" * 7000, os.urandom(3000), b"b" * 9000]


def _end(c: Chunk) -> int:
    return c.offset + c.stored_size


def chunks_after(chunks: list[Chunk]):
    """What the index's ``chunks_after`` answers, for one blob's chunks."""
    def after(chunk: Chunk, nbytes: int) -> list[Chunk]:
        return [c for c in chunks if c.offset >= _end(chunk) and _end(c) <= _end(chunk) + nbytes]
    return after


def run(tmp_path, body, *, amplify: int = 8 << 20, raw: bytes | None = None, pieces=PIECES):
    """``body(fetcher, store, chunks)`` against a fetcher of ``pieces`` in one blob; the
    first window of a miss is an eighth of ``amplify``."""
    blob, chunks, good = make_blob(pieces)
    source = ScriptedSource({blob.digest: good if raw is None else raw})
    store = ChunkStore(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, source, store, FetchConfig(deadline=5, amplify=amplify),
                                   neighbours=chunks_after(chunks))
            try:
                await body(fetcher, store, chunks)
            finally:
                nursery.cancel_scope.cancel()

    trio.run(main)
    return source, chunks


async def cached(store: ChunkStore, chunks: list[Chunk]) -> None:
    await trio.to_thread.run_sync(wait_until, lambda: all(store.contains(c.digest) for c in chunks),
                                  10, "the neighbours cached")


def test_neighbours_come_in_the_same_request_checked_and_cached(tmp_path):
    async def body(fetcher, store, chunks):
        got, _ = await fetcher.read(chunks[:1])
        assert got == {chunks[0].digest: PIECES[0]}
        await cached(store, chunks)
        assert fetcher.stats.neighbours == 3
        # a read of a neighbour finds it in the node cache: no request
        got, hits = await fetcher.read(chunks[2:3])
        assert got[chunks[2].digest] == PIECES[2] and chunks[2].digest in hits

    source, chunks = run(tmp_path, body)
    assert source.requests == [(chunks[0].blob.digest, 0, _end(chunks[3]))]


def test_the_window_bounds_the_request_and_a_cached_neighbour_ends_it(tmp_path):
    _, chunks, raw = make_blob(PIECES)
    window = _end(chunks[2]) - 1

    async def body(fetcher, store, chunks):
        await fetcher.read(chunks[:1])
        await cached(store, chunks[:2])
        assert not store.contains(chunks[2].digest)
        # chunk 3 is cached now: a miss on chunk 2 fetches it alone
        c3 = chunks[3]
        store.put(c3.digest, decode(c3.codec, c3.size, raw[c3.offset : _end(c3)]))
        await fetcher.read(chunks[2:3])

    source, chunks = run(tmp_path, body, amplify=8 * window)
    digest = chunks[0].blob.digest
    assert source.requests == [(digest, 0, _end(chunks[1])),
                               (digest, chunks[2].offset, chunks[2].stored_size)]


def test_window_0_requests_exactly_the_asked_range(tmp_path):
    async def body(fetcher, store, chunks):
        got, _ = await fetcher.read(chunks[1:2])
        assert got[chunks[1].digest] == PIECES[1]
        await cached(store, chunks[1:2])
        assert not any(store.contains(c.digest) for c in chunks if c is not chunks[1])

    source, chunks = run(tmp_path, body, amplify=0)
    assert source.requests == [(chunks[1].blob.digest, chunks[1].offset, chunks[1].stored_size)]


def test_a_neighbour_with_wrong_bytes_is_not_cached_and_does_not_fail_the_read(tmp_path, caplog):
    _, chunks, good = make_blob(PIECES)
    bad = bytearray(good)
    bad[chunks[2].offset + 10] ^= 0x55

    async def body(fetcher, store, chunks):
        got, _ = await fetcher.read(chunks[:1])
        assert got[chunks[0].digest] == PIECES[0]
        await cached(store, [chunks[1], chunks[3]])
        assert not store.contains(chunks[2].digest)
        assert fetcher.stats.integrity_failures == 1 and fetcher.stats.neighbours == 2
        # a read of it asks again (and is told the bytes are wrong)
        with pytest.raises(IntegrityError):
            await fetcher.read(chunks[2:3])

    source, _ = run(tmp_path, body, raw=bytes(bad))
    assert len(source.requests) == 2
    assert chunks[2].hexdigest in caplog.text


def test_the_reader_waits_for_its_own_chunks_only(tmp_path):
    release = trio.Event()

    async def body(fetcher, store, chunks):
        check = fetcher._verifier.range

        async def slow_neighbours(rng, data, *args, **kwargs):
            if rng.neighbours:  # the neighbours' check takes until the read is done
                await release.wait()
            return await check(rng, data, *args, **kwargs)

        fetcher._verifier.range = slow_neighbours
        with trio.fail_after(5):
            got, _ = await fetcher.read(chunks[:1])
        assert got[chunks[0].digest] == PIECES[0]
        assert not store.contains(chunks[1].digest)
        release.set()
        await cached(store, chunks)

    source, _ = run(tmp_path, body)
    assert len(source.requests) == 1


def test_the_window_doubles_while_misses_walk_through_the_blob(tmp_path):
    pieces = [os.urandom(1000) for _ in range(32)]  # stored as they are: 1000 bytes each

    async def body(fetcher, store, chunks):
        for i in (0, 1, 3, 7, 15):  # each right where the request before ended
            await fetcher.read(chunks[i : i + 1])
        await fetcher.read(chunks[20:21])  # cached: no request

    source, chunks = run(tmp_path, body, amplify=8000, pieces=pieces)
    digest = chunks[0].blob.digest
    assert source.requests == [(digest, 0, 1000), (digest, 1000, 2000), (digest, 3000, 4000),
                               (digest, 7000, 8000), (digest, 15_000, 8000)]  # at most amplify


def test_a_miss_elsewhere_starts_small_again(tmp_path):
    pieces = [os.urandom(1000) for _ in range(16)]

    async def body(fetcher, store, chunks):
        await fetcher.read(chunks[:1])
        await fetcher.read(chunks[2:3])
        await fetcher.read(chunks[10:11])  # not where the last request ended

    source, chunks = run(tmp_path, body, amplify=8 * 2000, pieces=pieces)
    digest = chunks[0].blob.digest
    assert source.requests == [(digest, 0, 2000), (digest, 2000, 4000), (digest, 10_000, 2000)]
