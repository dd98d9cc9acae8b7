"""What the snapshotter needs from a lazy filesystem: mount, check, unmount.

The snapshot service depends on the three-method ``FileSystem`` interface (stargz's
``snapshot.FileSystem``), so its tests run against a fake. ``LazyFileSystem`` is the real
one: one ``lazyfs mount`` process per image, at ``ROOT/mounts/<hash of the ref>``, with
the node's shared cache at ``ROOT/cache``. Mount processes run in their own session, so
they outlive a snapshotter that dies; a restarted snapshotter finds them by mountpoint.
With ``spare``, one mount process waits ready, Python started and lazyfs imported
(``lazyfs.spare``), for the next image to mount.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import mountinfo
from ..errors import ExitCode, MountError, NotLazyImageError, UserError
from ..process import exited, read_ready, wait_gone
from .usage import CacheUsage

if TYPE_CHECKING:
    from .keychain import Keychain

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
#: how mount processes start (with cwd=PACKAGE_ROOT): from this tree, whatever the
#: snapshotter's working directory
_ENV = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}


class FileSystem(Protocol):
    def mount(self, ref: str, labels: dict[str, str]) -> Path:
        """Mount image ``ref`` (or find it mounted) and return its mountpoint. Raises
        NotLazyImageError when ``ref`` is not a lazyfs image, UserError otherwise."""
        ...

    def check(self, mountpoint: Path) -> None:
        """Raise MountError unless the mount at ``mountpoint`` is alive and answers."""
        ...

    def unmount(self, mountpoint: Path) -> None:
        """Unmount and stop the mount's process; a missing mount is not an error."""
        ...

    def mountpoint(self, ref: str) -> Path:
        """Where ``ref`` is (or would be) mounted."""
        ...

    def usage(self, ref: str, layer: str) -> tuple[int, int]:
        """(bytes on disk, entries) that layer ``layer`` of image ``ref`` (pinned,
        ``NAME@DIGEST``) takes in the node cache."""
        ...


@dataclass(frozen=True, kw_only=True)
class PeerOptions:
    """How the image mounts reach the other nodes. Client side only: the mounts ask peers
    and never listen; the node's ``lazyfs peer`` serves its cache (``ROOT/cache``)."""

    peers_file: Path
    """The cluster's peers, one ``http://HOST:PORT`` a line (each mount re-reads it when it
    changes)."""
    token_file: Path
    """The file holding the cluster token (the mounts read it; it is never in an argv)."""
    advertise: str | None = None
    """This node's URL in the peers file, the one its ``lazyfs peer`` serves at, so that
    rendezvous hashing knows which chunks this node owns (None: the mounts do not know)."""

    def argv(self) -> list[str]:
        return ["--peers-file", str(self.peers_file), "--token-file", str(self.token_file),
                *([] if self.advertise is None else ["--advertise", self.advertise])]


class LazyFileSystem:
    """Images mounted by ``lazyfs mount`` processes under ``root``."""

    def __init__(self, root: Path, *, timeout: float = 30.0, prefetch: bool = True,
                 cache_size: int | None = None, peers: PeerOptions | None = None,
                 spare: bool = False, keychain: Keychain | None = None) -> None:
        self.root = root
        self.cache = root / "cache"
        self.timeout = timeout
        self.prefetch = prefetch
        self.cache_size = cache_size
        """Passed to every image mount: the node-wide limit of the shared cache."""
        self.peers = peers
        """Passed to every image mount, remounts after a restart included (None: no peers)."""
        self._usage = CacheUsage(self.cache)
        self.ready_timeout = 300.0
        """How long a mount process may take to say it is mounted (it has its own
        network deadlines; this is the backstop against a hung one)."""
        self._children: dict[int, subprocess.Popen] = {}  # mount processes started here, to reap
        self.keep_spare = spare
        """Keep one mount process started ahead of need (see ``start_spare``)."""
        self._spare: tuple[subprocess.Popen, int] | None = None  # the process, its ready pipe
        self._spare_lock = threading.Lock()
        self._pids: dict[str, int] = {}
        """The mount process of each mountpoint (by name) seen answering: what a stuck one is
        killed by."""
        self.status_timeout = mountinfo.STATUS_TIMEOUT
        self.keychain = keychain
        """Pods' pull credentials (``--cri-keychain``): an image pulled with them is mounted
        with them, from a credentials file of its own (``creds_file``)."""

    def mountpoint(self, ref: str) -> Path:
        return self.root / "mounts" / hashlib.sha256(ref.encode()).hexdigest()[:24]

    def creds_file(self, mountpoint: Path) -> Path:
        """The credentials an image's mount was given by a pull (0600; kept while it is
        mounted, so that a remount after a crash has them too)."""
        return self.root / "creds" / f"{mountpoint.name}.json"

    def _creds_args(self, ref: str, mnt: Path) -> list[str]:
        path = self.creds_file(mnt)
        found = self.keychain.lookup(ref) if self.keychain is not None else None
        if found is not None:
            from .keychain import write_creds_file

            write_creds_file(path, *found)
            log.info("mounting %s with the credentials of its pull", ref)
        return ["--creds-file", str(path)] if path.exists() else []

    def mount(self, ref: str, labels: dict[str, str]) -> Path:
        self._reap()
        mnt = self.mountpoint(ref)
        try:
            self.check(mnt)
            return mnt
        except mountinfo.NotAnsweringError as exc:
            log.warning("%s: replacing it", exc)
            self._kill_stuck(mnt)
        except MountError:
            pass
        self._detach(mnt)
        mnt.mkdir(parents=True, exist_ok=True)
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"{mnt.name}.log"
        args = [ref, str(mnt), "--cache", str(self.cache), "--allow-other", "--timeout", str(self.timeout),
                *([] if self.prefetch else ["--no-prefetch"]),
                *([] if self.cache_size is None else ["--cache-size", str(self.cache_size)]),
                *([] if self.peers is None else self.peers.argv()), *self._creds_args(ref, mnt)]
        child, r = self._hand_to_spare(args, log_file) or self._start(args, log_file)
        try:
            answer = read_ready(r, self.ready_timeout)
        finally:
            self.start_spare()
        if answer == "ok":
            self._children[child.pid] = child
            self._pids[mnt.name] = child.pid
            log.info("mounted %s at %s (pid %d)", ref, mnt, child.pid)
            return mnt
        if answer.startswith("error "):
            _, code, message = (answer.split(" ", 2) + [""])[:3]
            child.wait(timeout=30)
            if code == str(int(ExitCode.IMAGE)):
                raise NotLazyImageError(message)
            raise UserError(f"cannot mount {ref}: {message}",
                            ExitCode(int(code)) if code.isdigit() and int(code) in set(ExitCode) else None)
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
            raise MountError(f"cannot mount {ref}: not ready in {self.ready_timeout:g}s; see {log_file}")
        raise UserError(f"cannot mount {ref}: its process exited with status {child.returncode}; "
                        f"see {log_file}")

    def _start(self, args: list[str], log_file: Path) -> tuple[subprocess.Popen, int]:
        """Start a mount process for ``lazyfs mount ARGS``: its own session, so that it
        outlives the snapshotter; it says "ok" or "error CODE MESSAGE" on the pipe whose
        read end is returned. Started here rather than through ``lazyfs mount``'s launcher:
        one Python start less on every lazy pull."""
        r, w = os.pipe()
        argv = [sys.executable, "-m", "lazyfs", "mount", *args, "--foreground", "--ready-fd", str(w),
                "--log-file", str(log_file)]
        try:
            with open(log_file, "ab") as logf:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         pass_fds=(w,), start_new_session=True, cwd=PACKAGE_ROOT,
                                         env=_ENV)
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        return child, r

    def start_spare(self) -> None:
        """Start a spare mount process (``lazyfs.spare``) unless one is waiting already or
        spares are off. Its output goes to ``ROOT/logs/spare.log`` until it is given an
        image; it exits when the snapshotter closes its input, or dies."""
        if not self.keep_spare:
            return
        with self._spare_lock:
            if self._spare is not None and self._spare[0].poll() is None:
                return
            self._drop_spare()
            logs = self.root / "logs"
            r, w = os.pipe()
            try:
                logs.mkdir(parents=True, exist_ok=True)
                with open(logs / "spare.log", "ab") as logf:
                    proc = subprocess.Popen([sys.executable, "-m", "lazyfs.spare", str(w)],
                                            stdin=subprocess.PIPE, stdout=logf, stderr=logf,
                                            pass_fds=(w,), start_new_session=True, cwd=PACKAGE_ROOT,
                                            env=_ENV)
            except OSError as exc:  # no spare: the next mount starts cold
                os.close(r)
                log.warning("cannot start a spare mount process: %s", exc)
                return
            finally:
                os.close(w)
            self._spare = (proc, r)

    def _hand_to_spare(self, args: list[str], log_file: Path) -> tuple[subprocess.Popen, int] | None:
        """Give the spare mount process its image; None when there is no live spare."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        proc, r = spare
        request = json.dumps({"argv": args, "log_file": str(log_file)}).encode() + b"\n"
        try:
            assert proc.stdin is not None
            proc.stdin.write(request)
            proc.stdin.close()
        except OSError:  # it died waiting: start one the ordinary way
            os.close(r)
            proc.kill()
            proc.wait(timeout=10)
            return None
        return proc, r

    def _drop_spare(self) -> None:
        if self._spare is None:
            return
        proc, r = self._spare
        self._spare = None
        os.close(r)
        if proc.stdin is not None:
            try:
                proc.stdin.close()  # end of input: the spare exits without mounting
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the spare mount process (image mounts keep running)."""
        with self._spare_lock:
            self.keep_spare = False
            self._drop_spare()

    def usage(self, ref: str, layer: str) -> tuple[int, int]:
        return self._usage.layer(ref.rpartition("@")[2], layer)

    def status(self, mountpoint: Path) -> dict:
        status = mountinfo.read_status(mountpoint, self.status_timeout)
        self._pids[mountpoint.name] = int(status["pid"])
        return status

    def _kill_stuck(self, mountpoint: Path) -> None:
        """Kill the process of a mount that is alive but does not answer (its readers get
        ENOTCONN instead of waiting forever), if this snapshotter has seen which it is."""
        pid = self._pids.pop(mountpoint.name, None)
        if pid is None:
            log.warning("the process of the stuck mount at %s is unknown here: left running", mountpoint)
            return
        child = self._children.pop(pid, None)
        if child is not None:
            log.warning("killing mount process %d of %s, which does not answer", pid, mountpoint)
            child.kill()
            child.wait(timeout=10.0)
            return
        try:  # started by an earlier snapshotter: make sure the pid is still a lazyfs process
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return  # gone already
        if b"lazyfs" not in cmdline:
            return
        log.warning("killing mount process %d of %s, which does not answer", pid, mountpoint)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10.0  # its parent (an earlier snapshotter, or init) reaps it
        while not exited(pid) and time.monotonic() < deadline:
            time.sleep(0.025)
        if not exited(pid):
            log.warning("mount process %d did not end after SIGKILL", pid)

    def check(self, mountpoint: Path) -> None:
        self.status(mountpoint)

    def unmount(self, mountpoint: Path) -> None:
        pid = None
        try:
            pid = int(self.status(mountpoint)["pid"])
        except mountinfo.NotAnsweringError:
            self._kill_stuck(mountpoint)
        except MountError:
            pass
        self._pids.pop(mountpoint.name, None)
        self._detach(mountpoint)
        child = self._children.pop(pid, None) if pid is not None else None
        if child is not None:  # ours: wait for it, or it stays a zombie that looks alive
            try:
                child.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10.0)
        elif pid is not None:  # started by an earlier snapshotter: init reaps it
            wait_gone(pid, 10.0, kill=True)
        try:
            mountpoint.rmdir()
        except OSError:
            pass
        self.creds_file(mountpoint).unlink(missing_ok=True)
        log.info("unmounted %s", mountpoint)

    def _reap(self) -> None:
        """Collect mount processes started here that have exited (died, or unmounted by
        someone else)."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    def _detach(self, mountpoint: Path) -> None:
        """Lazily detach whatever is at ``mountpoint`` (a live or a dead FUSE mount)."""
        if mountinfo.find(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
