"""Re-read deadlines on their own, under trio's MockClock: which start a demand wait
counts its deadline from, and for how long a failed read's chunks are remembered."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fetcher.rereads import RereadDeadlines

A, B, C, D = b"a" * 32, b"b" * 32, b"c" * 32, b"d" * 32
DEADLINE = 5.0


def run(body):
    trio.run(body, RereadDeadlines(window=1.0, short_try=0.5),
             clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_fresh_wait_has_a_whole_deadline_and_a_reread_what_is_left_of_it():
    async def body(r):
        assert not r
        assert r.continues([A]) is None
        assert r.budget(None, trio.current_time(), DEADLINE) == DEADLINE
        began = trio.current_time()
        await trio.sleep(1)  # the wait failed quickly
        r.failed([A], began)
        assert r
        await trio.sleep(0.5)
        assert r.continues([B, A]) == began
        assert r.budget(began, trio.current_time(), DEADLINE) == pytest.approx(3.5)
        # a failure that used up the deadline leaves the re-read one short try
        assert r.budget(began, began + 6, DEADLINE) == 0.5
        assert r.budget(began, began + 6, 0.2) == 0.2  # never more than a deadline

    run(body)


def test_past_the_window_a_wait_has_a_deadline_of_its_own():
    async def body(r):
        r.failed([A], trio.current_time())
        await trio.sleep(1.01)
        assert r.continues([A]) is None

    run(body)


def test_a_reread_keeps_the_window_open_for_the_rest_of_the_failed_read():
    """The kernel re-reads a failed read a page at a time: the second chunk's turn may
    come more than a window after the failure, and still continues that read."""
    async def body(r):
        began = trio.current_time()
        r.failed([A, B], began)
        await trio.sleep(0.9)
        assert r.continues([A]) == began
        r.failed([A], began)  # the short try failed too
        await trio.sleep(0.9)  # 1.8 s after the first failure
        assert r.continues([B]) == began

    run(body)


def test_a_served_chunk_is_forgotten_and_its_read_stays_open():
    async def body(r):
        began = trio.current_time()
        r.failed([A, B], began)
        await trio.sleep(0.9)
        r.served([A], r.continues([A]))
        await trio.sleep(0.9)
        assert r.continues([A]) is None
        assert r.continues([B]) == began

    run(body)


def test_a_second_failure_never_moves_a_start_later():
    async def body(r):
        first = trio.current_time()
        r.failed([A], first)
        await trio.sleep(0.5)
        r.failed([A], trio.current_time())  # a read that began later failed for it too
        assert r.continues([A]) == first

    run(body)


def test_a_failed_read_continues_its_earliest_start_for_all_its_chunks():
    """A read over A (from the cache), B (whose wait failed in an earlier read) and C (whose
    wait failed in a later one, with D): a re-read of any of them, D included, continues
    the earliest start."""
    async def body(r):
        early = trio.current_time()
        r.failed([B], early)
        await trio.sleep(0.3)
        r.failed([C, D], trio.current_time())
        await trio.sleep(0.2)
        r.failed_read([A, B, C], trio.current_time())
        assert r.continues([D]) == early
        assert r.continues([A]) == early

    run(body)
