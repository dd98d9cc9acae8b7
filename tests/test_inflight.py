"""The in-flight map on its own: one entry per chunk, covering its read from the node
cache; a miss stays in the map for the network; an entry removes only itself."""

from __future__ import annotations

import os

import trio
import trio.testing

from fetcher.errors import FetchError
from fetcher.inflight import InFlight

from .fakes import make_blob

PIECES = [os.urandom(3000), os.urandom(4000)]


def loader(cached: set[bytes], loads: list[bytes], delay: float = 1.0):
    async def load(c):
        loads.append(c.digest)
        await trio.sleep(delay)
        return b"plain" if c.digest in cached else None
    return load


def test_readers_of_a_chunk_share_one_read_of_the_cache_and_a_miss_waits_for_the_network():
    _, (hit, miss), _ = make_blob(PIECES)
    loads: list[bytes] = []
    results = []

    async def main():
        flights = InFlight()
        load = loader({hit.digest}, loads)

        async def reader():
            results.append(await flights.from_cache([hit, miss, hit], load))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(reader)
        assert flights.get(hit.digest) is None  # done: its bytes were had
        entry = flights.get(miss.digest)
        assert entry is not None and entry.queued and not entry.event.is_set()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert loads == [hit.digest, miss.digest]
    assert results == [({hit.digest: b"plain"}, [miss])] * 2


def test_a_cancelled_read_of_the_cache_leaves_no_entry_behind():
    _, (first, second), _ = make_blob(PIECES)

    async def main():
        flights = InFlight()
        load = loader(set(), [])
        with trio.move_on_after(1.5):  # the first missed; cancelled while reading the second
            await flights.from_cache([first, second], load)
        assert len(flights) == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_waiters_of_an_abandoned_read_are_woken_with_an_error():
    _, (c, _), _ = make_blob(PIECES)

    async def main():
        flights = InFlight()
        async with trio.open_nursery() as n:
            cancel = trio.CancelScope()

            async def first():
                with cancel:
                    await flights.from_cache([c], loader(set(), [], delay=10))

            n.start_soon(first)
            await trio.sleep(1)
            entry = flights[c.digest]
            cancel.cancel()
            await entry.event.wait()
            assert isinstance(entry.error, FetchError)
            assert flights.get(c.digest) is None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_entry_removes_only_itself():
    _, (c, _), _ = make_blob(PIECES)
    flights = InFlight()
    old = flights.start(c.digest)
    flights.done(c.digest, old)
    new = flights.start(c.digest)
    flights.done(c.digest, old)  # a late removal of the first: the second stays
    assert flights.get(c.digest) is new
