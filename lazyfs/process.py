"""Waiting for a process to end, the one way every part of lazyfs does it."""

from __future__ import annotations

import os
import select
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


def read_ready(fd: int, timeout: float) -> str:
    """The first line a mount process writes on its ready pipe, read end ``fd`` (closed
    here): "ok" or "error CODE MESSAGE"; "" if it closes the pipe or says nothing in
    ``timeout`` seconds."""
    message = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(fd, "rb") as pipe:
        while b"\n" not in message and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([pipe], [], [], min(left, 1.0))
            if ready:
                part = os.read(pipe.fileno(), 4096)
                if not part:
                    break
                message += part
    return message.decode(errors="replace").split("\n", 1)[0].strip()
