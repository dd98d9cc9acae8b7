from __future__ import annotations

import os

import pytest
import trio
import trio.lowlevel
import trio.testing

from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.errors import IntegrityError, ServerError, UnreachableError
from testkit.waiting import wait_until

from .fakes import ScriptedSource, make_blob

PIECES = [os.urandom(5000), b"a" * 7000, os.urandom(3000), b"b" * 9000]


FIVE_SECONDS = FetchConfig(deadline=5)


def run_fetch(tmp_path, script, body, config=FIVE_SECONDS, clock=None):
    blob, chunks, raw = make_blob(PIECES)
    source = ScriptedSource({blob.digest: raw}, script)
    store = ChunkStore(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, source, store, config)
            try:
                await body(fetcher, chunks)
            finally:
                nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return source, store, chunks


def test_concurrent_readers_share_one_request(tmp_path):
    async def body2(fetcher, chunks):
        outs = []

        async def reader():
            outs.append(await fetcher.get(chunks))

        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(reader)
        assert len(outs) == 5
        assert all([o[c.digest] for c in chunks] == PIECES for o in outs)
        # a reader does not wait for the disk: the writes finish after it has its bytes
        store = ChunkStore(tmp_path)
        await trio.to_thread.run_sync(wait_until, lambda: all(store.contains(c.digest) for c in chunks),
                                      10, "every chunk cached")

    source, _store, chunks = run_fetch(tmp_path, [], body2)
    assert len(source.requests) == 1


def test_altered_bytes_fail_and_are_not_cached(tmp_path, caplog):
    async def body(fetcher, chunks):
        with pytest.raises(IntegrityError):
            await fetcher.get(chunks[:1])
        assert fetcher.stats.integrity_failures == 1
        # the next attempt fetches again and succeeds
        got = await fetcher.get(chunks[:1])
        assert got[chunks[0].digest] == PIECES[0]

    source, store, chunks = run_fetch(tmp_path, ["corrupt"], body)
    assert len(source.requests) == 2
    assert chunks[0].hexdigest in caplog.text


def test_stalled_source_fails_within_deadline(tmp_path):
    async def body(fetcher, chunks):
        start = trio.current_time()
        with pytest.raises(UnreachableError, match="within 5s"):
            await fetcher.get(chunks[:1])
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)

    # the mock clock jumps ahead whenever every task waits, so the test takes no time;
    # no worker threads run here (the fetch fails before anything is cached)
    _, store, chunks = run_fetch(tmp_path, ["stall"], body,
                                 clock=trio.testing.MockClock(autojump_threshold=0))
    assert not store.contains(chunks[0].digest)


def test_a_reread_right_after_a_timeout_continues_its_deadline(tmp_path):
    """The kernel reads a page again at once when its readahead failed: that second
    request gets what is left of the first one's deadline (at least ``reread_try``), not
    a deadline of its own; a read after the re-read window gets a whole one again."""
    async def body(fetcher, chunks):
        start = trio.current_time()
        with pytest.raises(UnreachableError):
            await fetcher.get(chunks[:1])
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)
        await trio.sleep(0.1)  # the request itself has given up too
        start = trio.current_time()
        with pytest.raises(UnreachableError):
            await fetcher.get(chunks[:1])  # the re-read: one short try
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.1)
        await trio.sleep(6)  # past the window (and the re-read's request): a whole deadline
        start = trio.current_time()
        with pytest.raises(UnreachableError):
            await fetcher.get(chunks[:1])
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)
        # a failure that came quickly leaves the re-read nearly all of the deadline
        start = trio.current_time()
        with pytest.raises(ServerError):
            await fetcher.get(chunks[1:2])
        got = await fetcher.get(chunks[1:2])
        assert got[chunks[1].digest] == PIECES[1]
        assert trio.current_time() - start < 0.1

    source, _, _ = run_fetch(tmp_path, ["stall", "stall", "stall", "fail"], body,
                             clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(source.requests) == 5


def test_a_page_by_page_reread_continues_the_deadline_for_every_chunk_of_the_read(tmp_path):
    """A read over two chunks whose readahead failed is re-read by the kernel a page at a
    time: the first chunk's pages, then the second's. The second chunk's re-read can come
    later than the re-read window after the failure (the first one's took its short try),
    and must still continue the read's deadline: with a whole deadline of its own, the
    read took 8.5 s against a 5 s deadline in a soak."""
    async def body(fetcher, chunks):
        with pytest.raises(UnreachableError):
            await fetcher.get(chunks[:2])  # the readahead: one request, no answer
        await trio.sleep(0.1)
        start = trio.current_time()
        got = await fetcher.get(chunks[:1])  # the first page again: answered in 0.4 s
        assert got[chunks[0].digest] == PIECES[0]
        assert trio.current_time() - start == pytest.approx(0.4, abs=0.1)
        await trio.sleep(0.7)  # the rest of the first chunk's pages (1.2 s since the failure)
        start = trio.current_time()
        with pytest.raises(UnreachableError):
            await fetcher.get(chunks[1:2])  # the second chunk's first page: a short try
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.1)

    source, _, _ = run_fetch(tmp_path, ["stall", "slow", "stall"], body,
                             clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(source.requests) == 3


def test_source_error_reaches_every_waiter(tmp_path):
    async def body(fetcher, chunks):
        errors = []

        async def reader():
            try:
                await fetcher.get(chunks)
            except ServerError as exc:
                errors.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(reader)
        assert len(errors) == 2

    # the reader that joined the first one's fetch tries once more on its own
    source, _, _ = run_fetch(tmp_path, ["fail", "fail"], body)
    assert len(source.requests) == 2


def test_a_reader_that_joined_a_failed_fetch_tries_once_more(tmp_path):
    """A fetch begun during an outage fails; a read that only joined it has had no try
    of its own, and gets one in the time it has left."""
    async def body(fetcher, chunks):
        outcomes = []

        async def reader():
            try:
                outcomes.append((await fetcher.get(chunks))[chunks[0].digest] == PIECES[0])
            except ServerError:
                outcomes.append("error")

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(reader)
        assert sorted(outcomes, key=str) == [True, "error"]

    source, _, _ = run_fetch(tmp_path, ["fail"], body)
    assert len(source.requests) == 2


def test_background_waits_for_demand(tmp_path):
    order = []

    async def body(fetcher, chunks):
        async def demand():
            await fetcher.get(chunks[:1])
            order.append("demand")

        async def background():
            await trio.lowlevel.checkpoint()  # start after the demand fetch is in flight
            await fetcher.get(chunks[2:], background=True)
            order.append("background")

        async with trio.open_nursery() as n:
            n.start_soon(demand)
            n.start_soon(background)

    source, _, chunks = run_fetch(tmp_path, [], body)
    assert order == ["demand", "background"]
    assert source.requests[0][1] == 0


@pytest.mark.parametrize("background", [False, True])
def test_wrong_bytes_from_a_mirror_are_fetched_again_from_the_registry(tmp_path, caplog, background):
    """A mirror (a cache in front of the registry) whose copy went bad: the read gets the
    right bytes from the registry, not EIO, and the mirror is skipped from then on."""
    from fetcher.mirrors import MirroredClient

    blob, chunks, raw = make_blob(PIECES)
    mirror = ScriptedSource({blob.digest: raw}, ["corrupt"])
    mirror.origin = "http://mirror.example"
    registry = ScriptedSource({blob.digest: raw})
    registry.ref = None
    store = ChunkStore(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, MirroredClient(registry, [mirror]), store, FIVE_SECONDS)
            got = await fetcher.get(chunks[:2], background=background)
            assert [got[c.digest] for c in chunks[:2]] == PIECES[:2]
            got = await fetcher.get(chunks[2:])
            assert [got[c.digest] for c in chunks[2:]] == PIECES[2:]
            nursery.cancel_scope.cancel()

    trio.run(main)
    first = chunks[0]
    assert mirror.requests == [(blob.digest, 0, chunks[1].offset + chunks[1].stored_size)]
    # the bad chunk alone again, then the rest: from the registry
    assert registry.requests[0] == (blob.digest, first.offset, first.stored_size)
    assert len(registry.requests) == 2
    assert "mirror http://mirror.example sent wrong bytes" in caplog.text
    assert all(store.get(c.digest) is not None for c in chunks[:2])
