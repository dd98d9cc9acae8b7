"""Verification on its own: a range's chunks are checked one by one, only good ones are
cached, and background checking gives way before each chunk."""

from __future__ import annotations

import os
import threading

import pytest
import trio

from blockindex.codec import ChunkDecodeError
from cache.store import ChunkStore
from fetcher.errors import IntegrityError
from fetcher.plan import plan_ranges
from fetcher.verify import Verifier, integrity_error, verify_range

from .fakes import make_blob

PIECES = [os.urandom(5000), b"a" * 7000, os.urandom(3000)]


def spoilt(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]


def test_a_range_is_checked_chunk_by_chunk_and_only_good_chunks_are_cached(tmp_path):
    _, chunks, raw = make_blob(PIECES)
    [rng] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    store = ChunkStore(tmp_path)
    gave_way = []
    results = verify_range(rng, spoilt(raw, chunks[1].offset), store, lambda: gave_way.append(1))
    assert [bytes(r) if not isinstance(r, ChunkDecodeError) else None for r in results] == \
        [PIECES[0], None, PIECES[2]]
    assert [store.contains(c.digest) for c in chunks] == [True, False, True]
    assert len(gave_way) == 3  # before each chunk


@pytest.mark.parametrize("thread_above", [0, 1 << 30])
def test_the_verifier_gives_the_same_answers_on_the_loop_and_in_threads(tmp_path, thread_above):
    _, chunks, raw = make_blob(PIECES)
    [rng] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    bad = spoilt(raw, chunks[2].offset)
    threads: set[str] = set()

    def give_way() -> None:
        threads.add(threading.current_thread().name)

    async def main():
        v = Verifier(thread_above=thread_above)
        c = chunks[0]
        assert bytes(await v.chunk(c, raw[c.offset : c.offset + c.stored_size])) == PIECES[0]
        with pytest.raises(ChunkDecodeError):
            await v.chunk(chunks[2], bad[chunks[2].offset:])
        store = ChunkStore(tmp_path)
        results = await v.range(rng, bad, store, give_way)
        assert isinstance(results[2], ChunkDecodeError)
        assert [bytes(r) for r in results[:2]] == PIECES[:2]  # type: ignore[arg-type]
        assert not store.contains(chunks[2].digest) and store.contains(chunks[1].digest)
        assert [bytes(r) for r in await v.range(rng, raw)] == PIECES  # type: ignore[arg-type]

    trio.run(main)
    # a large range is checked by the low-priority threads, which give way; a small one on
    # the loop, which need not
    assert threads == ({"lazyfs-background"} if thread_above == 0 else set())


def test_integrity_error_names_the_chunk_and_the_source():
    _, chunks, _ = make_blob(PIECES)
    exc = integrity_error(chunks[0], "origin")
    assert isinstance(exc, IntegrityError)
    assert chunks[0].hexdigest[:16] in str(exc) and "origin" in str(exc)
