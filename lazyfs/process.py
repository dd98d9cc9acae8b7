"""Waiting for a process to end, the one way every part of lazyfs does it."""

from __future__ import annotations

import os
import signal
import time


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_gone(pid: int, timeout: float, *, kill: bool = False) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True if it did. With
    ``kill``, a process still there at the deadline gets SIGKILL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.025)
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
    return not alive(pid)
