"""What the kernel says about mounts (``/proc/self/mountinfo``), without touching them.

Asking the kernel rather than ``stat``-ing a mountpoint matters here: a stat of our own
FUSE mount from inside the process that serves it would wait on itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import MountError

FSTYPE = "fuse.lazyfs"

STATUS_XATTR = b"user.lazyfs.status"
"""Read from a mount's root directory: the mount's status as JSON (``lazyfs status``)."""

STATE_XATTR = b"user.lazyfs.state"
"""Read from any file of a mount: how much of it is cached and where the bytes this mount
served came from, as JSON (not listed by listxattr, so copies of the tree do not carry it)."""


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    major: int
    minor: int
    source: str


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            major, minor = (int(x) for x in fields[2].split(":"))
            out.append(MountEntry(_unescape(fields[4]), rfields[0], major, minor,
                                  _unescape(rfields[1]) if len(rfields) > 1 else ""))
    return out


def find(mountpoint: str | Path, *, resolved: bool = False) -> MountEntry | None:
    """The topmost mount at ``mountpoint``, if any. Pass ``resolved=True`` with a path
    already made canonical by ``os.path.realpath`` when the mount may be our own and not
    yet serving: resolving it would ask the mount itself and wait forever."""
    target = str(mountpoint) if resolved else os.path.realpath(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found


def readahead_path(entry: MountEntry) -> Path:
    return Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")


def set_readahead(entry: MountEntry, kib: int) -> bool:
    """Raise the mount's readahead (FUSE's default of 128 KiB halves sequential reads).

    Call it once the FUSE INIT request has been answered: the kernel applies the INIT
    reply's readahead (capped at what it offered at mount time, 128 KiB) when the reply
    arrives, undoing any earlier write."""
    path = readahead_path(entry)
    try:
        path.write_text(str(kib))
        return int(path.read_text()) == kib
    except (OSError, ValueError):
        return False


FUSECTL = Path("/sys/fs/fuse/connections")
"""The FUSE control filesystem: a directory per FUSE connection with its kernel limits."""

MAX_BACKGROUND = 128
"""Readahead requests the kernel lets a lazyfs mount have in flight at once (its default
is 12). A read's pages are fetched by readahead requests, and past that limit the kernel
holds them back until earlier ones end; with the origin stalled, a held-back read reaches
the mount only when earlier reads fail, and its deadline starts then: a read would take
nearly two deadlines. Each request in flight costs the mount a waiting task and its
request buffer (132 KiB), not a fetch (requests for the same chunks share one); the
mount's main loop runs up to ``WORKERS`` of them."""

WORKERS = MAX_BACKGROUND + 64
"""Requests the mount works on at once (pyfuse3's worker tasks, 99 by default): every
readahead request the kernel may send, and room for lookups and other reads beside them."""


def connection_dir(entry: MountEntry) -> Path:
    """The mount's directory in the FUSE control filesystem, named by the kernel's own
    encoding of the mount's device number."""
    return FUSECTL / str((entry.major << 20) | entry.minor)


def _mount_fusectl() -> bool:
    """Mount the FUSE control filesystem if it is not (systemd mounts it at boot; a
    minimal system or a container may not have). True if it is mounted now."""
    if any(m.fstype == "fusectl" for m in mounts()):
        return True
    if not FUSECTL.is_dir():
        return False
    done = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                          capture_output=True, timeout=10)
    return done.returncode == 0


def set_max_background(entry: MountEntry, requests: int = MAX_BACKGROUND) -> bool:
    """Let the mount have ``requests`` readahead requests in flight (see ``MAX_BACKGROUND``),
    and mark it congested (the kernel then skips speculative readahead) at three quarters
    of that, the kernel's own ratio. Needs root. Call it before the kernel's INIT request is
    answered, so that no read queues behind the default: the answer leaves both as they
    are (libfuse sends zero for them). False if it could not be done."""
    d = connection_dir(entry)
    try:
        if not d.is_dir() and not (_mount_fusectl() and d.is_dir()):
            return False
        (d / "max_background").write_text(str(requests))
        (d / "congestion_threshold").write_text(str(requests * 3 // 4))
        return int((d / "max_background").read_text()) == requests
    except (OSError, ValueError, subprocess.SubprocessError):
        return False


def check_mountpoint(path: Path) -> None:
    entry = find(os.path.abspath(path), resolved=True)
    if entry is not None and entry.fstype == FSTYPE and not _answers(path):
        raise MountError(f"mountpoint {path} holds a lazyfs mount whose process has died or does "
                         f"not answer; run 'lazyfs umount {path}' first")
    if not path.exists():
        raise MountError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    if find(path) is not None and os.path.ismount(path):
        raise MountError(f"mountpoint {path} is busy: something is mounted there already")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not available (load the fuse module; run as root)")


def _answers(path: Path) -> bool:
    try:
        _bounded(lambda: os.statvfs(path), STATUS_TIMEOUT)  # not stat: the kernel answers that from its cache
    except (OSError, TimeoutError):
        return False
    return True


STATUS_TIMEOUT = 10.0
"""Seconds to wait for a mount to answer its status (``lazyfs status``, ``umount``, the
snapshotter's check): a mount process that is alive but stuck (stopped, or wedged)
answers nothing, and the kernel makes the asker wait for as long as that lasts."""


class NotAnsweringError(MountError):
    """The mount exists and its process is alive, but it does not answer in time."""


def _bounded(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread, waited for at most ``timeout`` seconds: a call into a
    stuck FUSE mount cannot be interrupted, so the thread is left behind (blocked in the
    kernel until the mount answers or goes) and TimeoutError raised."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=call, name="lazyfs-mount-probe", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_status(mountpoint: Path, timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
    """The status a lazyfs mount reports about itself; MountError if it is not one or
    its process does not answer (``NotAnsweringError`` if it is alive but answers nothing
    within ``timeout`` seconds)."""
    entry = find(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        raise MountError(f"{mountpoint} is not a lazyfs mount")
    try:
        return json.loads(_bounded(lambda: os.getxattr(mountpoint, STATUS_XATTR), timeout))
    except TimeoutError:
        raise NotAnsweringError(f"{mountpoint}: the mount's process is alive but does not answer "
                                f"within {timeout:g}s (stopped or stuck)") from None
    except OSError as exc:
        raise MountError(f"{mountpoint}: the mount does not answer ({exc.strerror})") from exc
