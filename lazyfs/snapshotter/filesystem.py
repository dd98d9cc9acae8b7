"""What the snapshotter needs from a lazy filesystem: mount, check, unmount.

The snapshot service depends on the three-method ``FileSystem`` interface (stargz's
``snapshot.FileSystem``), so its tests run against a fake. ``LazyFileSystem`` is the real
one: one ``lazyfs mount`` process per image, at ``ROOT/mounts/<hash of the ref>``, with
the node's shared cache at ``ROOT/cache``. Mount processes run in their own session, so
they outlive a snapshotter that dies; a restarted snapshotter finds them by mountpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from .. import mountinfo
from ..errors import ExitCode, MountError, NotLazyImageError, UserError
from ..process import wait_gone
from .usage import CacheUsage

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


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


class LazyFileSystem:
    """Images mounted by ``lazyfs mount`` processes under ``root``."""

    def __init__(self, root: Path, *, timeout: float = 30.0, prefetch: bool = True,
                 cache_size: int | None = None) -> None:
        self.root = root
        self.cache = root / "cache"
        self.timeout = timeout
        self.prefetch = prefetch
        self.cache_size = cache_size
        """Passed to every image mount: the node-wide limit of the shared cache."""
        self._usage = CacheUsage(self.cache)

    def mountpoint(self, ref: str) -> Path:
        return self.root / "mounts" / hashlib.sha256(ref.encode()).hexdigest()[:24]

    def mount(self, ref: str, labels: dict[str, str]) -> Path:
        mnt = self.mountpoint(ref)
        try:
            self.check(mnt)
            return mnt
        except MountError:
            pass
        self._detach(mnt)
        mnt.mkdir(parents=True, exist_ok=True)
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "lazyfs", "mount", ref, str(mnt), "--cache", str(self.cache),
                "--allow-other", "--timeout", str(self.timeout), "--log-file", str(logs / f"{mnt.name}.log"),
                *([] if self.prefetch else ["--no-prefetch"]),
                *([] if self.cache_size is None else ["--cache-size", str(self.cache_size)])]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=PACKAGE_ROOT,
                              env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)})
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            message = message.removeprefix("lazyfs: error: ")
            if done.returncode == ExitCode.IMAGE:
                raise NotLazyImageError(message)
            raise UserError(f"cannot mount {ref}: {message}",
                            ExitCode(done.returncode) if done.returncode in set(ExitCode) else None)
        log.info("mounted %s at %s", ref, mnt)
        return mnt

    def usage(self, ref: str, layer: str) -> tuple[int, int]:
        return self._usage.layer(ref.rpartition("@")[2], layer)

    def status(self, mountpoint: Path) -> dict:
        return mountinfo.read_status(mountpoint)

    def check(self, mountpoint: Path) -> None:
        self.status(mountpoint)

    def unmount(self, mountpoint: Path) -> None:
        pid = None
        try:
            pid = int(self.status(mountpoint)["pid"])
        except MountError:
            pass
        self._detach(mountpoint)
        if pid is not None:
            wait_gone(pid, 10.0, kill=True)
        try:
            mountpoint.rmdir()
        except OSError:
            pass
        log.info("unmounted %s", mountpoint)

    def _detach(self, mountpoint: Path) -> None:
        """Lazily detach whatever is at ``mountpoint`` (a live or a dead FUSE mount)."""
        if mountinfo.find(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


