"""pyfuse3's request loop with one scheduler round per request instead of two.

pyfuse3 reads each request in a worker task that takes its read lock (a checkpoint: one
round of trio's scheduler) and then waits for ``/dev/fuse`` to be readable with
``trio.lowlevel.wait_readable``, which parks the task and registers the descriptor with
epoll, so a second round and two ``epoll_ctl`` calls, even when the next request is
already queued, as it is through most of a ``tar`` or a program's start. pyfuse3 looks
trio up through its module global ``trio`` at each call (its asyncio mode replaces that
global the same way), so ``install`` gives it trio with one function changed:
``wait_readable`` first asks ``poll`` with a zero timeout and returns at once when the
descriptor is readable; otherwise, or on any error condition, it waits as trio does. The
read lock's checkpoint still lets every other task run between two requests.
"""

from __future__ import annotations

import select
import types

import pyfuse3
import trio

_READY = select.POLLIN
_polls: dict[int, select.poll] = {}


async def wait_readable(fd: int) -> None:
    """Return when ``fd`` is readable: at once if it is now, else as trio waits."""
    poller = _polls.get(fd)
    if poller is None:
        poller = _polls[fd] = select.poll()
        poller.register(fd, select.POLLIN)
    if poller.poll(0) == [(fd, _READY)]:  # readable, and nothing else to report
        return
    await trio.lowlevel.wait_readable(fd)


def _trio_with(wait: object) -> types.ModuleType:
    lowlevel = types.ModuleType("trio.lowlevel")
    lowlevel.__dict__.update(vars(trio.lowlevel))
    lowlevel.wait_readable = wait  # type: ignore[attr-defined]
    module = types.ModuleType("trio")
    module.__dict__.update(vars(trio))
    module.lowlevel = lowlevel  # type: ignore[attr-defined]
    return module


_FAST_TRIO = _trio_with(wait_readable)


def install() -> None:
    """Give pyfuse3 the trio above (one filesystem per process)."""
    pyfuse3.trio = _FAST_TRIO  # type: ignore[attr-defined]


def uninstall() -> None:
    """pyfuse3 with plain trio again."""
    pyfuse3.trio = trio  # type: ignore[attr-defined]
    _polls.clear()
