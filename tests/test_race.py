"""race on its own, under trio's MockClock: which attempt starts when, and
which answer wins."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fetcher.errors import ServerError
from fetcher.race import race


def _run(fn):
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, clock=clock)


def _after(seconds: float, value: str, fail: bool = False):
    async def go():
        await trio.sleep(seconds)
        if fail:
            raise ServerError(value)
        return value, trio.current_time()
    return go


def test_a_fast_first_attempt_never_starts_the_next():
    started = []

    async def backup():
        started.append(1)
        return "origin", 0

    async def main():
        return await race([_after(0.01, "peer"), backup], 0.05)

    won = _run(main)
    assert won.value[0] == "peer" and won.winner == 0 and not won.hedged and not started


def test_a_slow_first_attempt_is_overtaken_at_the_delay():
    async def main():
        return await race([_after(10, "peer"), _after(0.002, "origin")], 0.05)

    won = _run(main)
    assert won.value[0] == "origin" and won.winner == 1 and won.hedged
    assert won.value[1] == pytest.approx(0.052)  # the delay, then the origin's own time


def test_a_failed_first_attempt_starts_the_next_at_once_and_both_failing_raises():
    async def main():
        return await race([_after(0.001, "peer", fail=True), _after(0.002, "origin")], 5)

    won = _run(main)
    assert won.value == ("origin", pytest.approx(0.003)) and won.winner == 1 and not won.hedged

    async def both():
        return await race([_after(0.001, "peer", fail=True), _after(0.002, "origin", fail=True)], 5)

    with pytest.raises(ServerError, match="origin"):
        _run(both)


def test_race_hedges_down_the_chain_and_the_first_success_wins():
    async def main():
        return await race([_after(10, "owner"), _after(10, "next"), _after(0.001, "origin")], 0.05)

    won = _run(main)
    assert won.value[0] == "origin" and won.winner == 2 and won.hedged
    assert won.value[1] == pytest.approx(0.101)


def test_race_without_budget_moves_on_at_failures_and_at_last_by():
    async def main():
        return await race([_after(1.0, "owner", fail=True), _after(100, "next"), _after(0.001, "origin")],
                          0.05, take_hedge=lambda stalled: False, last_by=5.0)

    won = _run(main)
    assert won.value == ("origin", pytest.approx(5.001)) and won.winner == 2

    async def failing():
        return await race([_after(1, "a", fail=True), _after(1, "b", fail=True),
                           _after(1, "origin", fail=True)], 0.05)

    with pytest.raises(ServerError, match="origin"):
        _run(failing)


def test_an_attempt_that_beats_its_pulse_is_waited_for_and_one_that_stops_is_stalled():
    """Beats 0.04 s apart keep a 0.05 s hedge away for as long as they come; when they stop,
    the next attempt starts one delay after the last, and ``take_hedge`` is told it stalled
    (an attempt never heard from is not)."""
    from fetcher.race import Pulse

    asked: list[tuple[bool, float]] = []

    def take(stalled: bool) -> bool:
        asked.append((stalled, trio.current_time()))
        return True

    def beating(pulse: Pulse, beats: int, then: float):
        async def go():
            for _ in range(beats):
                await trio.sleep(0.04)
                pulse.beat()
            await trio.sleep(then)
            return "peer", trio.current_time()
        return go

    async def alive():
        p = Pulse()
        return await race([beating(p, 10, 0.03), _after(0.001, "origin")], 0.05, take_hedge=take,
                          pulses=[p])

    won = _run(alive)
    assert won.value == ("peer", pytest.approx(0.43)) and asked == []

    async def stops():
        p = Pulse()
        return await race([beating(p, 3, 100), _after(0.001, "origin")], 0.05, take_hedge=take,
                          pulses=[p])

    won = _run(stops)
    assert won.value == ("origin", pytest.approx(0.171)) and won.hedged
    assert asked == [(True, pytest.approx(0.17))]
    asked.clear()

    async def silent():
        return await race([_after(100, "peer"), _after(0.001, "origin")], 0.05, take_hedge=take,
                          pulses=[Pulse()])

    assert _run(silent).value[0] == "origin" and asked == [(False, pytest.approx(0.05))]
