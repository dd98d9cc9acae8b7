"""Waiting in tests for something to happen: one polling loop with a deadline.

A test never decides an outcome by sleeping (on a slow machine the sleep is too short and
the test passes or fails for nothing); it waits until what it needs is true, and a wait
that runs out fails saying what did not happen. Trio code uses trio's ``MockClock``
instead, or calls this from a thread (``trio.to_thread.run_sync``). A process a test
started is ended the same way: asked, waited for, then killed (``stop_process``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
               alive: subprocess.Popen | None = None, detail: Callable[[], object] | None = None) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something true, and
    return that. After ``timeout`` seconds, or as soon as ``alive`` (a process the wait
    depends on) has exited, raise AssertionError naming ``what``, with ``detail()`` (a
    log's tail, the last status) when given."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if alive is not None and alive.poll() is not None:
            why = f"{alive.args[0] if isinstance(alive.args, list) else alive.args} exited {alive.returncode}"
            break
        if time.monotonic() >= deadline:
            why = f"not within {timeout:g} s"
            break
        time.sleep(interval)
    more = f"\n{detail()}" if detail is not None else ""
    raise AssertionError(f"{what}: {why}{more}")


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def stop_process(proc: subprocess.Popen, timeout: float = 10, sig: int = signal.SIGTERM) -> None:
    """End a process the test started, and reap it: send ``sig``, wait up to ``timeout``
    seconds, then SIGKILL and wait as long again (TimeoutExpired if even that is ignored,
    e.g. a process stuck in the kernel). A process that has already exited is left alone."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
