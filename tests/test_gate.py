"""The demand gate on its own: background work waits while demand fetches are in flight,
and its worker threads pause between chunks unless a reader waits for their range."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from fetcher.gate import DemandGate

HANG = 3600.0


class Work:
    def __init__(self, wanted: bool = False) -> None:
        self.wanted = wanted


def test_background_waits_until_the_last_demand_fetch_ends():
    order: list[str] = []

    async def main():
        gate = DemandGate(pause=HANG)
        await gate.wait_idle()  # nothing in flight: at once
        async with trio.open_nursery() as n:
            with gate.demand():

                async def background():
                    await gate.wait_idle()
                    order.append("background")

                n.start_soon(background)
                with gate.demand():
                    assert gate.in_flight == 2
                    await trio.sleep(1)
                order.append("first demand done")
                await trio.sleep(1)  # one still in flight: the background still waits
                order.append("second demand done")
            assert gate.in_flight == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert order == ["first demand done", "second demand done", "background"]


def test_a_demand_fetch_that_fails_still_opens_the_gate():
    async def main():
        gate = DemandGate(pause=HANG)
        with pytest.raises(ValueError), gate.demand():
            raise ValueError
        with trio.fail_after(1):
            await gate.wait_idle()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def in_thread(gate: DemandGate, work: Work) -> threading.Event:
    """``gate.give_way(work)`` in a thread; the event is set when it returns."""
    returned = threading.Event()

    def run() -> None:
        gate.give_way(work)
        returned.set()

    threading.Thread(target=run, daemon=True).start()
    return returned


def test_a_worker_gives_way_while_a_demand_fetch_runs_and_goes_on_when_it_ends():
    async def main():
        gate = DemandGate(pause=HANG)
        assert in_thread(gate, Work()).wait(10)  # no demand: no pause
        with gate.demand():
            paused = in_thread(gate, Work())
            assert not paused.wait(0.05)
        assert await trio.to_thread.run_sync(paused.wait, 10)

    trio.run(main)


def test_a_worker_whose_range_a_reader_waits_for_does_not_give_way():
    async def main():
        gate = DemandGate(pause=HANG)
        with gate.demand():
            assert in_thread(gate, Work(wanted=True)).wait(10)
            work = Work()
            paused = in_thread(gate, work)
            assert not paused.wait(0.05)
            work.wanted = True  # a reader joined the range
            assert await trio.to_thread.run_sync(paused.wait, 10)

    trio.run(main)


def test_a_worker_pauses_at_most_the_pause():
    async def main():
        gate = DemandGate(pause=0.0)
        with gate.demand():
            assert await trio.to_thread.run_sync(in_thread(gate, Work()).wait, 10)

    trio.run(main)
