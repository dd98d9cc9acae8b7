"""What the kernel says about mounts (``/proc/self/mountinfo``), without touching them.

Asking the kernel rather than ``stat``-ing a mountpoint matters here: a stat of our own
FUSE mount from inside the process that serves it would wait on itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
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


def check_mountpoint(path: Path) -> None:
    entry = find(os.path.abspath(path), resolved=True)
    if entry is not None and entry.fstype == FSTYPE and not _answers(path):
        raise MountError(f"mountpoint {path} holds a lazyfs mount whose process has died; "
                         f"run 'lazyfs umount {path}' first")
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
        os.statvfs(path)  # not stat: the kernel answers that from its cache
    except OSError:
        return False
    return True


def read_status(mountpoint: Path) -> dict[str, Any]:
    """The status a lazyfs mount reports about itself; MountError if it is not one or
    its process does not answer."""
    entry = find(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        raise MountError(f"{mountpoint} is not a lazyfs mount")
    try:
        return json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    except OSError as exc:
        raise MountError(f"{mountpoint}: the mount does not answer ({exc.strerror})") from exc
