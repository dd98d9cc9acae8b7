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
