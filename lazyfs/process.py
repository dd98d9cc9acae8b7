"""Waiting for a process to end, the one way every part of lazyfs does it."""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

from cache.pids import alive


def exited(pid: int) -> bool:
    """Whether ``pid`` has stopped running: gone, or a zombie its parent has not reaped
    (``alive`` counts those: it is for processes this one must reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return not alive(pid)
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


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


def wait_exited(pid: int, timeout: float, *, kill: bool = False) -> bool:
    """Wait up to ``timeout`` seconds for ``pid``, a process this one did not start (so
    cannot reap), to stop running; True if it did (see ``exited``). With ``kill``, it gets
    SIGKILL first."""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.025)
    return True


def detach(log_fd: int, keep: int) -> None:
    """Make this (just forked) process a daemon of its own: a new session (so that a
    signal to its starter's process group misses it), stdin from /dev/null, stdout and
    stderr to ``log_fd`` (closed here), and no descriptor open but those and ``keep``."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in {null, log_fd} - {0, 1, 2, keep}:
        os.close(fd)
    os.closerange(3, keep)  # what the starter left open (a pipe, a socket, a shell's fds)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def reap_child(pid: int, timeout: float) -> int | None:
    """The exit status of child ``pid`` once it has exited (waiting up to ``timeout``
    seconds), else None."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


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


def hide_in_cmdline(secret: str) -> bool:
    """Overwrite every copy of ``secret`` in this process's command line (what ``ps`` and
    ``/proc/PID/cmdline`` show) with ``*``, as database clients do with a password given
    as an argument; True if the command line no longer holds it. The memory is the
    argument area the kernel names in ``/proc/self/stat`` (arg_start, arg_end), written
    through ``/proc/self/mem``. A process forked afterwards inherits the clean copy."""
    needle = secret.encode()
    if not needle:
        return True
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            area = mem.read(end - start)
            if needle in area:
                mem.seek(start)
                mem.write(area.replace(needle, b"*" * len(needle)))
        with open("/proc/self/cmdline", "rb") as f:
            return needle not in f.read()
    except (OSError, ValueError, IndexError):
        return False
