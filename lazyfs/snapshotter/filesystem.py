"""What the snapshotter needs from a lazy filesystem: mount, check, unmount.

The snapshot service depends on the three-method ``FileSystem`` interface (stargz's
``snapshot.FileSystem``), so its tests run against a fake. ``LazyFileSystem`` is the real
one: one ``lazyfs mount`` process per image, at ``ROOT/mounts/<hash of the ref>``, with
the node's shared cache at ``ROOT/cache``. Mount processes run in their own session, so
they outlive a snapshotter that dies; a restarted snapshotter finds them by mountpoint.
With ``mount_parent``, the mount processes are forked from one process that has Python
started and lazyfs imported (``lazyfs.mountparent``): they start at once and share its
memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import mountinfo
from ..errors import ExitCode, MountError, NotLazyImageError, UserError
from ..mountparent import MountParent, MountParentGone
from ..process import exited, read_ready, wait_exited
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
                 mount_parent: bool = False, keychain: Keychain | None = None,
                 verify_layers: bool = False) -> None:
        self.root = root
        self.cache = root / "cache"
        self.timeout = timeout
        self.prefetch = prefetch
        self.verify_layers = verify_layers
        """Passed to every image mount: an image read by its side index serves nothing
        before its layers are checked (``lazyfs mount --verify-layers``)."""
        self.cache_size = cache_size
        """Passed to every image mount: the node-wide limit of the shared cache."""
        self.peers = peers
        """Passed to every image mount, remounts after a restart included (None: no peers)."""
        self._usage = CacheUsage(self.cache)
        self.ready_timeout = 300.0
        """How long a mount process may take to say it is mounted (it has its own
        network deadlines; this is the backstop against a hung one)."""
        self._children: dict[int, subprocess.Popen] = {}  # mount processes started here, to reap
        self.parent = MountParent(root / "logs" / "mount-parent.log", _ENV) if mount_parent else None
        """What image mounts are forked from (None: each starts a Python of its own)."""
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
                *(["--verify-layers"] if self.verify_layers else []),
                *([] if self.cache_size is None else ["--cache-size", str(self.cache_size)]),
                *([] if self.peers is None else self.peers.argv()), *self._creds_args(ref, mnt)]
        child, pid, r = self._fork(args, log_file) or self._start(args, log_file)
        answer = read_ready(r, self.ready_timeout)
        if answer == "ok":
            if child is not None:
                self._children[pid] = child
            self._pids[mnt.name] = pid
            log.info("mounted %s at %s (pid %d)", ref, mnt, pid)
            return mnt
        if answer.startswith("error "):
            _, code, message = (answer.split(" ", 2) + [""])[:3]
            self._wait(pid, child, 30)
            if code == str(int(ExitCode.IMAGE)):
                raise NotLazyImageError(message)
            raise UserError(f"cannot mount {ref}: {message}",
                            ExitCode(int(code)) if code.isdigit() and int(code) in set(ExitCode) else None)
        if not exited(pid):
            self._wait(pid, child, 10, kill=True)
            raise MountError(f"cannot mount {ref}: not ready in {self.ready_timeout:g}s; see {log_file}")
        status = f" with status {child.wait()}" if child is not None else ""
        raise UserError(f"cannot mount {ref}: its process exited{status}; see {log_file}")

    def _fork(self, args: list[str], log_file: Path) -> tuple[None, int, int] | None:
        """(None, pid, ready pipe) of a mount forked by the mount parent; None when there
        is no mount parent, or it cannot take the mount (the mount starts cold then)."""
        if self.parent is None:
            return None
        r, w = os.pipe()
        try:
            return None, self.parent.fork(args, log_file, w), r
        except MountParentGone as exc:
            log.warning("%s: starting the mount process on its own", exc)
            os.close(r)
            return None
        finally:
            os.close(w)

    @staticmethod
    def _wait(pid: int, child: subprocess.Popen | None, timeout: float, *, kill: bool = False) -> None:
        """Wait for a mount process to end: ``child`` if this process started it (and
        must reap it), else a child of the mount parent's (which the kernel reaps)."""
        if child is None:
            wait_exited(pid, timeout, kill=kill)
            return
        if kill:
            child.kill()
        child.wait(timeout=timeout)

    def _start(self, args: list[str], log_file: Path) -> tuple[subprocess.Popen, int, int]:
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
        return child, child.pid, r

    def start_mount_parent(self) -> None:
        """Start the mount parent, if mounts are forked from one, so that it has imported
        by the time the first image mounts."""
        if self.parent is not None:
            try:
                self.parent.start()
            except OSError as exc:  # no parent yet: the next mount tries again
                log.warning("cannot start the mount parent: %s", exc)

    def close(self) -> None:
        """Stop the mount parent (image mounts keep running)."""
        if self.parent is not None:
            self.parent.close()

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
        try:  # the mount parent's, or an earlier snapshotter's: make sure it is still a lazyfs process
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return  # gone already
        if b"lazyfs" not in cmdline:
            return
        log.warning("killing mount process %d of %s, which does not answer", pid, mountpoint)
        # its parent (the mount parent, an earlier snapshotter, or init) reaps it
        if not wait_exited(pid, 10.0, kill=True):
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
        elif pid is not None:  # forked by the mount parent, or started by an earlier snapshotter
            if not wait_exited(pid, 10.0):
                wait_exited(pid, 10.0, kill=True)
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
