"""Deadlines of re-reads: a demand read that failed and is read again at once continues
the failed one's deadline instead of starting its own.

The kernel reads a page again at once when its readahead failed, and then re-reads the
rest of a failed read a page at a time, one chunk after another: without this one read(2)
would wait two deadlines, or one per chunk. So for ``window`` seconds after a demand wait
for a chunk failed, a new demand wait for it counts from the failed one's start; it gets
what is left of that deadline, and at least ``short_try`` seconds (one more short try, so
that a read just after a source came back is not failed for the one before it). A failure
that came quickly leaves the re-read nearly all of the deadline.

    rereads = RereadDeadlines(window=1.0, short_try=0.5)
    began = rereads.continues(digests)        # None: a fresh read, with a deadline of its own
    budget = rereads.budget(began, now, deadline)
    rereads.failed(digests, began)            # the wait failed for these
    rereads.served(digests, began)            # it had them all

Times are trio's clock (``trio.current_time``), so tests run under a ``MockClock``.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from blockindex.format import ChunkDigest

KEPT = 4096
"""Failed chunks remembered before those past the window are forgotten."""


class RereadDeadlines:
    """The chunks whose demand wait failed lately: when each failed, and when the read
    that failed for it began (the start its re-reads continue)."""

    def __init__(self, *, window: float, short_try: float) -> None:
        self.window = window
        self.short_try = short_try
        self._failed: dict[ChunkDigest, tuple[float, float]] = {}  # digest -> (failed at, began)

    def __bool__(self) -> bool:
        return bool(self._failed)

    def continues(self, digests: Iterable[ChunkDigest]) -> float | None:
        """When the earliest failed wait began, of those that failed for one of ``digests``
        within the window; None if none did. A wait that continues one keeps the window
        open for the whole failed read (see ``_keep_rereading``)."""
        now = trio.current_time()
        began = None
        for d in digests:
            failed = self._failed.get(d)
            if failed is not None and now - failed[0] <= self.window:
                began = failed[1] if began is None else min(began, failed[1])
        if began is not None:
            self._keep_rereading(began)
        return began

    def budget(self, began: float | None, now: float, deadline: float) -> float:
        """Seconds a demand wait starting ``now`` may take: its whole ``deadline``, or for a
        re-read of a wait begun at ``began`` what is left of that one, at least
        ``short_try``."""
        if began is None:
            return deadline
        return max(began + deadline - now, min(self.short_try, deadline))

    def served(self, digests: Iterable[ChunkDigest], began: float | None) -> None:
        """A demand wait for ``digests`` had them all: they are no longer failed; if it was
        a re-read of a read begun at ``began``, that read's other chunks keep their window."""
        if not self._failed:
            return
        for d in digests:
            self._failed.pop(d, None)
        if began is not None:
            self._keep_rereading(began)

    def failed(self, digests: Iterable[ChunkDigest], began: float) -> None:
        """A demand wait begun at ``began`` failed for ``digests`` (those it did not have)."""
        now = trio.current_time()
        self._forget(now)
        for d in digests:
            self._mark(d, now, began)

    def failed_read(self, digests: Iterable[ChunkDigest], began: float) -> None:
        """A demand read over ``digests`` (begun at ``began``) failed: a re-read of any of
        them continues its deadline, those it had from the cache included. The kernel
        re-reads a failed read a page at a time, and a chunk that came from the cache may
        have left it (evicted) by its page's turn; fetching it again is part of the failed
        read, not a read of its own. Failed waits of its chunks that began earlier make it
        one read with them: all of them continue the earliest start."""
        digests = list(digests)
        now = trio.current_time()
        self._forget(now)
        noted = [f[1] for d in digests
                 if (f := self._failed.get(d)) is not None and now - f[0] <= self.window]
        first = min([began, *noted])
        for d in digests:
            self._mark(d, now, first)
        if noted and first < max(noted):
            for d, (_, b) in list(self._failed.items()):
                if b in noted:  # one read, one start: _keep_rereading moves them together
                    self._failed[d] = (now, first)

    def _mark(self, digest: ChunkDigest, now: float, began: float) -> None:
        """A demand wait begun at ``began`` failed for ``digest``. A fresh failure of it by a
        read that began earlier keeps that start: a re-read continues the earliest deadline
        it may belong to, never a later one."""
        f = self._failed.get(digest)
        if f is not None and now - f[0] <= self.window:
            began = min(began, f[1])
        self._failed[digest] = (now, began)

    def _keep_rereading(self, began: float) -> None:
        """Restart the window of every chunk whose failed wait began at ``began``: the
        kernel re-reads a failed read a page at a time, one chunk after another, and the
        last chunk's turn may come well after the failure. It continues that read's
        deadline all the same (each chunk then gets at most ``short_try``)."""
        now = trio.current_time()
        for d, (_, b) in self._failed.items():
            if b == began:
                self._failed[d] = (now, b)

    def _forget(self, now: float) -> None:
        if len(self._failed) > KEPT:  # forget what is past the window
            self._failed = {d: f for d, f in self._failed.items() if now - f[0] <= self.window}
