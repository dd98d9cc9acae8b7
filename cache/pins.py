"""Pins: which images mounted processes need kept whole, visible to every process.

A mount writes ``pins/<pid>-<manifest hex>`` in the cache directory (JSON: pid, the
process's start time, manifest and index digests, reference, mountpoint) and removes it
when it unmounts. Eviction never removes a chunk of a pinned image. A mount killed with
SIGKILL cannot remove its pin: a pin whose process is gone, or whose pid now belongs to
a process that started at another time (the pid was reused), is stale; whoever lists
the pins deletes it, which releases its chunks.

Pins are written and the pinned set is read under the cache's eviction lock
(``cache.evict.eviction_lock``), so a mount that pins its image and then counts what is
cached cannot have chunks deleted under it by an eviction that did not see its pin.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from .atomic import write_atomic
from .images import ImageStore
from .pids import alive

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pin:
    path: Path
    pid: int
    manifest: str
    index: str
    ref: str
    mountpoint: str


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    try:
        return int(text[text.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def pin(images: ImageStore, manifest: str, index: str, ref: str, mountpoint: str) -> Path:
    """Pin an image for this process; returns the pin file (remove it with ``unpin``).
    Call it holding the eviction lock. Raises OSError."""
    pid = os.getpid()
    directory = images.root / "pins"
    directory.mkdir(exist_ok=True)
    path = directory / f"{pid}-{manifest.removeprefix('sha256:')}"
    doc = {"pid": pid, "start": start_time(pid), "manifest": manifest, "index": index,
           "ref": ref, "mountpoint": mountpoint}
    write_atomic(path, [json.dumps(doc).encode()])
    return path


def unpin(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def live_pins(images: ImageStore) -> list[Pin]:
    """The pins of processes still running; stale pins are deleted on the way."""
    directory = images.root / "pins"
    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".")]  # not temp files
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = directory / name
        try:
            doc = json.loads(path.read_text())
            p = Pin(path, int(doc["pid"]), str(doc["manifest"]), str(doc["index"]),
                    str(doc.get("ref", "")), str(doc.get("mountpoint", "")))
            started = doc.get("start")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("pin %s is malformed; removed", path)
            unpin(path)
            continue
        if not alive(p.pid) or (started is not None and start_time(p.pid) not in (None, started)):
            log.info("released the pin of %s by process %d, which is gone", p.ref or p.manifest, p.pid)
            unpin(path)
            continue
        out.append(p)
    return out
