"""Worker threads at a lower CPU priority, for background work that must give way.

The prefetch checks and caches what it fetched in worker threads. With trio's own
threads, that work competes for the CPU as an equal of the main thread, which serves
every FUSE read: on a busy machine a read waits for its time slice behind the
prefetch's hashing and file writes. Linux keeps a nice value per thread, so these
threads lower their own priority once (``nice`` 10 by default: about a tenth of the
CPU of a thread at 0 when both want it) and the kernel runs the reads' thread first,
with no polling. They never do a demand read's work: trio's threads would keep a
lowered priority for whatever they run next, these are kept apart.

    result = await BACKGROUND.run_sync(fn, arg)   # fn(arg) in one of the process's two

One pool per process, like trio's own thread cache: every fetcher of a process (a peer
server has one per origin) shares it, so background work as a whole is bounded.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome], object]]


class LowPriorityThreads:
    """``threads`` daemon threads at ``nice``, started by the first calls, taking jobs in
    the order they come; they live as long as the process."""

    def __init__(self, threads: int = 2, *, nice: int = 10, name: str = "lazyfs-background") -> None:
        self._max = threads
        self._nice = nice
        self._name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads; its result, or its exception raised here.

        Like ``trio.to_thread.run_sync`` without ``cancellable``: a cancelled caller still
        waits for the call to finish (its results are what the work was for)."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the loop ended while this ran: nobody waits for it

        self._submit((lambda: fn(*args), done))

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the thread cannot be stopped halfway

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` in one of the threads, some time; nobody waits for it, and what it
        raises is logged."""
        self._submit((lambda: fn(*args), _log_failure))

    def _submit(self, job: _Job) -> None:
        with self._lock:
            start = self._started < self._max
            self._started += start
        if start:
            threading.Thread(target=self._work, name=self._name, daemon=True).start()
        self._jobs.put(job)

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        except OSError as exc:  # still correct, only not deferring to the reads
            log.debug("cannot lower the priority of a background thread: %s", exc)
        while True:
            fn, done = self._jobs.get()
            done(outcome.capture(fn))


def _log_failure(result: outcome.Outcome) -> None:
    if isinstance(result, outcome.Error):
        log.warning("background job failed: %r", result.error)


BACKGROUND = LowPriorityThreads()
"""The process's threads for background (prefetch) work."""
