"""The mount parent: one process per node that image mounts are forked from.

Half of a mount's start is Python starting and importing what a mount runs on, and each
interpreter holds its own copy of those modules (most of a mount's memory). The mount
parent (``python -m lazyfs.mountparent SOCKET_FD``) imports them once, on its main
thread, freezes them out of the garbage collector's reach (``gc.freeze()``: a collection
in a child would otherwise write to every object's header and copy the page it is on),
then forks one child per image: the children share the parent's pages until they write
to them, and still each image is a process of its own, so a crash touches one image.

The parent stays single-threaded (no trio run, no thread: forking a process with threads
leaves their locks held in the child), reads requests with plain blocking calls, and
ignores SIGCHLD, so that the kernel reaps its children. A request is one datagram on a
``SOCK_SEQPACKET`` socket, ``{"argv": [...], "log_file": "..."}`` (the arguments of
``lazyfs mount``, image and mountpoint first), carrying the write end of the mount's
ready pipe (``SCM_RIGHTS``). The parent answers ``{"pid": N}`` at once; the child, in a
session of its own (so that it outlives the parent and its starter, whatever signal
their process group gets), with the parent's signal handlers reset and no descriptor but
its log and the ready pipe, becomes that mount, ``--foreground``, and says "ok" or
"error CODE MESSAGE" on the pipe as a mount does. End of input (its starter stopped, or
died) ends the parent; its children keep running.

``MountParent`` is the starter's side: it starts the parent, hands it requests, and
starts a new parent when the last one has died.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)

#: the imports run at this much lower priority (when this process may raise it back: as
#: root), so that a new mount parent does not take the CPU from the containers running
IMPORT_NICE = 10
#: the largest request (an argv of paths)
MAX_REQUEST = 1 << 16
#: how long a starter waits for the parent's answer: a new parent imports first
ANSWER_TIMEOUT = 120.0

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# -- the parent ----------------------------------------------------------------------------

def _import_for_mount() -> None:
    """Import what a mount runs on, at lower priority if it can be raised back."""
    niced = os.geteuid() == 0
    if niced:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(before + IMPORT_NICE, 19))
    try:
        # pyfuse3, trio and lazyfs; and what a mount imports when it first talks HTTP or
        # reads its config, and the system's TLS trust store: imported in a child, each was
        # that child's own memory (the HTTP client's modules alone about 3 MB) and start time
        import encodings.idna  # noqa: F401
        import stringprep  # noqa: F401
        import tomllib  # noqa: F401

        import httpcore  # noqa: F401
        import pyfuse3  # noqa: F401 - the point of a mount parent: imported once, shared
        import trio  # noqa: F401

        from fetcher.transport import tls_context

        from . import cli, malloc, mount, process  # noqa: F401
        from .cli import mount as mount_command  # noqa: F401 - and what it imports: the child's argv

        tls_context(None)
    finally:
        if niced:
            os.setpriority(os.PRIO_PROCESS, 0, before)
    gc.collect()
    gc.freeze()


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    _import_for_mount()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 1)
        except InterruptedError:  # pragma: no cover - Python retries EINTR itself
            continue
        if not data:
            return 0
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"error": "a request carries one ready pipe"}).encode())
            continue
        [ready_fd] = fds
        try:
            request = json.loads(data)
            args = [str(a) for a in request["argv"]]
            log_file = str(request["log_file"])
        except (ValueError, KeyError, TypeError):
            os.close(ready_fd)
            sock.send(json.dumps({"error": "malformed request"}).encode())
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; tested through the mounts it serves
            sock.close()
            _child(args, log_file, ready_fd)
        os.close(ready_fd)
        sock.send(json.dumps({"pid": pid}).encode())


def _child(args: list[str], log_file: str, ready_fd: int) -> NoReturn:
    """The forked mount: the parent's signal handlers undone, then detached and
    ``lazyfs mount ARGS --foreground``. The frozen objects stay frozen: collecting them
    here would copy every page they are on."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            log_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            os.write(ready_fd, f"error 7 cannot write log file {log_file}: {exc.strerror}\n".encode())
            code = 7
        else:
            from . import cli
            from .process import detach

            detach(log_fd, keep=ready_fd)
            code = cli.main(["mount", *args, "--foreground", "--ready-fd", str(ready_fd),
                             "--log-file", log_file])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a bug: its traceback to the log, not to the parent
        traceback.print_exc()
    finally:
        logging.shutdown()
        os._exit(code)


# -- the starter's side --------------------------------------------------------------------

class MountParentGone(Exception):
    """The mount parent did not take the request (dead, or no answer in time)."""


class MountParent:
    """Starts a mount parent and hands it mounts to fork; a dead parent is replaced on
    the next request. Thread-safe: requests are handed over one at a time (a fork is a
    few milliseconds), the mounts then start side by side."""

    def __init__(self, log_file: Path, env: dict[str, str]) -> None:
        self.log_file = log_file
        self.env = env
        self.answer_timeout = ANSWER_TIMEOUT
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """The parent's pid, while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the parent unless it runs; it imports while nothing waits on it."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as logf:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "lazyfs.mountparent", str(theirs.fileno())],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(theirs.fileno(),),
                    start_new_session=True, cwd=PACKAGE_ROOT, env=self.env)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(self.answer_timeout)
        self._sock = ours
        log.info("started mount parent %d", self._proc.pid)

    def fork(self, argv: list[str], log_file: Path, ready_fd: int) -> int:
        """Have the parent fork ``lazyfs mount ARGV --foreground`` logging to ``log_file``
        and saying "ok" or why not on ``ready_fd`` (the pipe's write end, kept open here);
        its pid. A parent found dead is replaced once; MountParentGone if that fails too."""
        request = json.dumps({"argv": argv, "log_file": str(log_file)}).encode()
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._start()
                    assert self._sock is not None
                    socket.send_fds(self._sock, [request], [ready_fd])
                    answer = self._sock.recv(MAX_REQUEST)
                except OSError as exc:  # dead (EPIPE, ECONNRESET), timed out, or not startable
                    problem = f"{type(exc).__name__}: {exc}"
                    answer = b""
                else:
                    problem = "it ended"
                if answer:
                    reply = json.loads(answer)
                    if "pid" not in reply:
                        raise MountParentGone(f"the mount parent refused the request: {reply.get('error')}")
                    return int(reply["pid"])
                log.warning("mount parent %s did not take the mount (%s)%s", self.pid or "", problem,
                            ": starting another" if attempt == 1 else "")
                self._kill()
        raise MountParentGone(f"no mount parent could take the mount; see {self.log_file}")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._stop()

    def _stop(self) -> None:
        """End of input ends the parent (its children stay); reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None

    def close(self) -> None:
        """Stop the parent (the mounts it forked keep running)."""
        with self._lock:
            self._stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
