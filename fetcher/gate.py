"""The gate that makes background work give way to demand reads.

A demand fetch (a reader waits for it) holds the gate open for its whole request:

    with gate.demand():          # counted while its request is on the network
        data = await request()

and background (prefetch) work waits or pauses while any is in flight:

    await gate.wait_idle()       # before a background request is sent
    gate.give_way(work)          # in a worker thread, before checking each chunk

A background request waits until no demand fetch is in flight, since what it brings
queues on the link ahead of the reader's answer. The checking and caching of what it
brought runs in worker threads, which pause between chunks while a demand fetch runs
(at most ``pause`` seconds each time, so that the range always moves on), unless a
reader waits for that range itself (``work.wanted``): then pausing would only delay it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import trio


class Wanted(Protocol):
    wanted: bool
    """A reader waits for this background work: it stops giving way."""


class DemandGate:
    """Counts demand fetches in flight; tells background work when to wait."""

    def __init__(self, *, pause: float) -> None:
        self.pause = pause
        """Seconds a background worker thread pauses at most before each chunk while a
        demand fetch is in flight (``FetchConfig.background_pause``)."""
        self._demand = 0
        self._idle = trio.Event()
        self._idle.set()
        self._quiet = threading.Event()  # the same, for the background's worker threads
        self._quiet.set()

    @property
    def in_flight(self) -> int:
        """Demand fetches in flight now."""
        return self._demand

    @contextlib.contextmanager
    def demand(self) -> Iterator[None]:
        """Background work waits while the block runs (a demand fetch's request)."""
        self._demand += 1
        if self._demand == 1:
            self._idle = trio.Event()
            self._quiet.clear()
        try:
            yield
        finally:
            self._demand -= 1
            if self._demand == 0:
                self._idle.set()
                self._quiet.set()

    async def wait_idle(self) -> None:
        """Return once no demand fetch is in flight (background work calls this first)."""
        while self._demand:
            await self._idle.wait()

    def give_way(self, work: Wanted) -> None:
        """In a background worker thread, before each chunk: wait while a demand fetch is
        in flight, unless a reader waits for ``work`` itself; at most ``pause`` seconds,
        so that the work always moves on."""
        deadline = None
        while not work.wanted and not self._quiet.is_set():
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.pause
            elif now >= deadline:
                return
            self._quiet.wait(min(deadline - now, 0.01))
