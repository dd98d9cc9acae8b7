"""Chunks that tasks running at once ask the origin for, planned as one set.

An owner serves each chunk of a peer's batch in a task of its own (``lazyfs.peerbatch``),
and the batches of several nodes arrive together: planned one chunk at a time, each would
be a range request of its own. A ``Together`` collects the chunks handed to it while the
tasks of one trip through the scheduler run, and plans them at the next trip, so that
neighbours of one blob go in one range request as a lone node's do (``plan``). It never
sleeps: the wait is one scheduler turn.

    together = Together(nursery, start)   # start(chunks): plan and start their fetches
    together.add(chunks)                  # their in-flight entries already made
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from blockindex.format import Chunk


class Together:
    """Gathers chunks for ``start`` (called with all those added since the last call)."""

    def __init__(self, nursery: trio.Nursery, start: Callable[[list[Chunk]], object]) -> None:
        self._nursery = nursery
        self._start = start
        self._chunks: list[Chunk] = []

    def add(self, chunks: Sequence[Chunk]) -> None:
        if not chunks:
            return
        if not self._chunks:  # the first since the last plan: plan at the next turn
            self._nursery.start_soon(self._flush)
        self._chunks.extend(chunks)

    async def _flush(self) -> None:
        chunks, self._chunks = self._chunks, []
        self._start(chunks)
