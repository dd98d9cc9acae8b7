"""Background (prefetch) work gives way to demand reads: its threads run at a lower CPU
priority, and checking and caching a fetched range waits while a demand fetch is in
flight, unless a reader waits for that range itself."""

from __future__ import annotations

import os
import threading

import pytest
import trio

from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.gate import DemandGate
from fetcher.lowprio import LowPriorityThreads

from .fakes import make_blob

PIECES = [os.urandom(5000), b"a" * 7000, os.urandom(3000), b"b" * 9000]
HANG = 20  # seconds: only catches a hang


def test_low_priority_threads_run_the_call_at_a_lower_priority():
    pool = LowPriorityThreads(1, nice=5)
    base = os.getpriority(os.PRIO_PROCESS, 0)

    def where() -> tuple[int, int]:
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid)

    def fail() -> None:
        raise ValueError("from the thread")

    async def main() -> None:
        tid, nice = await pool.run_sync(where)
        assert tid != threading.get_native_id()
        assert nice == min(base + 5, 19)
        with pytest.raises(ValueError, match="from the thread"):
            await pool.run_sync(fail)
        assert await pool.run_sync(sum, [1, 2, 3]) == 6

    trio.run(main)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's is kept


def test_a_submitted_call_runs_in_a_low_priority_thread_and_its_failure_is_logged(caplog):
    """``submit`` is fire and forget (no trio needed): the call runs at the pool's
    priority, and what it raises is logged, never lost nor raised to the caller."""
    pool = LowPriorityThreads(1, nice=5)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    ran = threading.Event()
    seen: list[tuple[int, int, str]] = []

    def job(tag: str) -> None:
        tid = threading.get_native_id()
        seen.append((tid, os.getpriority(os.PRIO_PROCESS, tid), tag))
        ran.set()

    def fail() -> None:
        raise ValueError("from the background")

    with caplog.at_level("WARNING", logger="fetcher.lowprio"):
        pool.submit(fail)
        pool.submit(job, "after")  # one thread, in order: the failure is logged by now
        assert ran.wait(HANG)
    [(tid, nice, tag)] = seen
    assert tid != threading.get_native_id() and nice == min(base + 5, 19) and tag == "after"
    assert "background job failed: ValueError('from the background')" in caplog.text


class GatedSource:
    """The first chunk's range (a demand read's) waits for ``release``; any other range
    (the background's) is answered once that demand request has been made, so that the
    background's bytes arrive while the demand fetch is in flight."""

    def __init__(self, blob: str, raw: bytes) -> None:
        self.blob, self.raw = blob, raw
        self.background_asked = trio.Event()
        self.demand_asked = trio.Event()
        self.release = trio.Event()
        self.requests: list[tuple[int, int]] = []

    def blame(self, digest: str, offset: int, length: int) -> bool:
        return False  # the only sender

    async def read_range(self, digest: str, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        if offset == 0:
            self.demand_asked.set()
            await self.release.wait()
        else:
            self.background_asked.set()
            await self.demand_asked.wait()
        return self.raw[offset : offset + length]


class WatchedGate(DemandGate):
    """Says when the background's checking of a range has its bytes and has come to
    giving way (in its worker thread), and whether each wait ended with no demand fetch
    in flight, as giving way should."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.giving_way = threading.Event()
        self.ended_quiet: list[bool] = []

    def give_way(self, work) -> None:
        self.giving_way.set()
        super().give_way(work)
        self.ended_quiet.append(self._quiet.is_set())


class WatchedFetcher(ChunkFetcher):
    """A fetcher whose gate is a ``WatchedGate``."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.gate = WatchedGate(pause=self.config.background_pause)
        self.giving_way = self.gate.giving_way
        self.ended_quiet = self.gate.ended_quiet

    async def wait_giving_way(self) -> None:
        """Return once the background is at its first give-way (its bytes are here)."""
        assert await trio.to_thread.run_sync(self.giving_way.wait, HANG), "the background never gave way"


async def background_then_demand(nursery: trio.Nursery, fetcher: ChunkFetcher, source: GatedSource,
                                 chunks, order: list[str]) -> None:
    """A background fetch of every chunk but the first, then, once its request is under
    way, a demand read of the first; each notes in ``order`` when it is done."""

    async def fetch(name: str, wanted, background: bool = False) -> None:
        await fetcher.get(wanted, background=background)
        order.append(name)

    nursery.start_soon(fetch, "background", chunks[1:], True)
    await source.background_asked.wait()
    nursery.start_soon(fetch, "demand", chunks[:1])


def run_gated(tmp_path, body) -> list[str]:
    blob, chunks, raw = make_blob(PIECES)
    source = GatedSource(blob.digest, raw)
    # every range checked in a worker thread; a pause long enough that only giving way
    # (or a reader waiting for the range) explains the order below
    config = FetchConfig(deadline=HANG, thread_above=0, background_pause=HANG)
    order: list[str] = []

    async def main() -> None:
        with trio.fail_after(HANG * 2):
            async with trio.open_nursery() as nursery:
                fetcher = WatchedFetcher(nursery, source, ChunkStore(tmp_path), config)
                await body(fetcher, chunks, source, order)
                nursery.cancel_scope.cancel()

    trio.run(main)
    return order


def test_background_range_waits_while_a_demand_fetch_is_in_flight(tmp_path):
    async def body(fetcher, chunks, source, order):
        async with trio.open_nursery() as n:
            await background_then_demand(n, fetcher, source, chunks, order)
            await fetcher.wait_giving_way()  # the background's bytes are here
            assert order == []
            source.release.set()
        # it waited for the demand fetch to end, not for its pause to run out
        assert fetcher.ended_quiet and all(fetcher.ended_quiet), fetcher.ended_quiet

    assert sorted(run_gated(tmp_path, body)) == ["background", "demand"]


def test_a_reader_checks_its_chunk_from_a_background_range_giving_way(tmp_path):
    async def body(fetcher, chunks, source, order):
        async with trio.open_nursery() as n:
            await background_then_demand(n, fetcher, source, chunks, order)
            await fetcher.wait_giving_way()  # the range's bytes are here
            asked = len(source.requests)
            got = await fetcher.get(chunks[2:3])  # within the hang bound: not behind the range
            assert got[chunks[2].digest] == PIECES[2]
            assert len(source.requests) == asked  # from the bytes that came, not fetched again
            order.append("reader")
            source.release.set()

    order = run_gated(tmp_path, body)
    assert order.index("reader") < order.index("demand")


def test_readahead_waiting_for_a_background_range_stops_it_giving_way(tmp_path):
    async def body(fetcher, chunks, source, order):
        async with trio.open_nursery() as n:
            # the background's request is under way, its bytes not here yet
            await background_then_demand(n, fetcher, source, chunks, order)
            got = await fetcher.get(chunks[3:4], speculative=True)  # within the hang bound
            assert got[chunks[3].digest] == PIECES[3]
            order.append("readahead")
            source.release.set()

    order = run_gated(tmp_path, body)
    assert order.index("readahead") < order.index("demand")


class StalledBackground:
    """Ranges with more than one chunk (the background's) never answer; single chunks do."""

    def __init__(self, raw: bytes, chunks) -> None:
        self.raw = raw
        self.sizes = {c.offset: c.stored_size for c in chunks}
        self.requests: list[tuple[int, int]] = []
        self.asked = trio.Event()

    def blame(self, digest: str, offset: int, length: int) -> bool:
        return False  # the only sender

    async def read_range(self, digest: str, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        self.asked.set()
        if self.sizes.get(offset) != length:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return self.raw[offset : offset + length]


def test_a_reader_does_not_wait_for_a_background_range_still_on_the_network(tmp_path):
    blob, chunks, raw = make_blob(PIECES)
    source = StalledBackground(raw, chunks)
    got: dict = {}

    async def main() -> None:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                fetcher = ChunkFetcher(nursery, source, ChunkStore(tmp_path),
                                       FetchConfig(deadline=HANG))

                async def background() -> None:
                    await fetcher.get(chunks, background=True)

                nursery.start_soon(background)
                await source.asked.wait()  # the background range is under way
                got.update(await fetcher.get(chunks[2:3]))
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert got[chunks[2].digest] == PIECES[2]
    assert source.requests[1] == (chunks[2].offset, chunks[2].stored_size)  # that chunk alone
