"""``lazyfs status DIR`` and ``lazyfs umount DIR``: the commands that ask a running mount
(its ``user.lazyfs.status`` attribute, ``lazyfs.mountinfo``), and how status prints it."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MountError
from ..process import wait_gone
from .common import human, seconds
from .trace import run_source

if TYPE_CHECKING:
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("umount", help="unmount a lazyfs mount and stop its process")
    p.add_argument("mountpoint")
    p.add_argument("--lazy", "-z", action="store_true", help="detach even if busy")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("status", help="what a mount has cached and fetched")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--slow", action="store_true", help="also the reads that waited longest on the network")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help="how long to wait for the mount to answer (default 10): a stuck one answers nothing")
    p.set_defaults(func=cmd_status)


def _read_status(mountpoint: Path, timeout: float | None = None) -> dict[str, Any]:
    from ..mountinfo import STATUS_TIMEOUT, read_status  # status and umount only

    return read_status(mountpoint, STATUS_TIMEOUT if timeout is None else timeout)


def cmd_umount(args: argparse.Namespace) -> int:
    from .. import mountinfo  # status and umount only

    mountpoint = Path(args.mountpoint).absolute()
    stuck = False
    try:
        pid: int | None = int(_read_status(mountpoint)["pid"])
    except MountError as exc:
        entry = mountinfo.find(mountpoint, resolved=True)
        if entry is None or entry.fstype != mountinfo.FSTYPE:
            raise
        # a lazyfs mount whose process has died, or is stuck: detach what is left
        pid, stuck = None, isinstance(exc, mountinfo.NotAnsweringError)
    cmd = ["fusermount3", "-u", *(["-z"] if args.lazy or pid is None else []), str(mountpoint)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise MountError(f"cannot unmount {mountpoint}: {reason} (--lazy detaches it anyway)")
    if pid is not None and not wait_gone(pid, 30):
        raise MountError(f"unmounted {mountpoint}, but mount process {pid} is still running")
    if stuck:
        print(f"detached {mountpoint}: its process did not answer within {mountinfo.STATUS_TIMEOUT:g}s "
              "and is still running (find it with: pgrep -af 'lazyfs')")
    else:
        print(f"unmounted {mountpoint}" + (" (its process had died)" if pid is None else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _read_status(Path(args.mountpoint).absolute(), args.timeout)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    p = status["prefetch"]
    total = p["total_bytes"] or 1
    frac = p["cached_bytes"] / total if p["total_bytes"] else 1.0
    bar = "#" * int(frac * 30)
    print(f"{status['ref']}  at {status['mountpoint']}  (pid {status['pid']})")
    print(f"  image     {status['image']['files']} files, {human(status['image']['file_bytes'])}, "
          f"{status['image']['chunks']} chunks")
    print(f"  cached    [{bar:<30}] {frac:6.1%}  {human(p['cached_bytes'])} / {human(p['total_bytes'])}")
    print(f"  prefetch  {p['state']}" + ("  (cached counts only chunks this mount has read)"
                                          if p["state"] == "off" else ""))
    sources = ", ".join(f"{k} {human(v)}" for k, v in status["bytes_by_source"].items())
    print(f"  fetched   {sources}")
    peers = status.get("peers")
    if peers:
        bad = peers["bad_peers"]
        print(f"  peers     {len(peers['peers'])}, this node {peers['self'] or '(not in the list)'}"
              + (f", sent wrong bytes (avoided): {' '.join(bad)}" if bad else ""))
    r = status["reads"]
    disk = f" ({status['fetch']['disk_reads']} waited for the disk)" if status.get("fetch") else ""
    print(f"  reads     {r['reads']} ({human(r['bytes_read'])}), chunk hits: memory "
          f"{r['chunk_hits_memory']}, cache {r['chunk_hits_cache']}{disk}, misses {r['chunk_misses']}, "
          f"failed reads {r['failed_reads']}")
    c = status.get("cache_state") or {}
    if c.get("limit") is not None:
        over = (f"; OVER the limit: mounted images need {human(c['pinned_bytes'])}"
                if c.get("over_limit") else "")
        print(f"  cache     {human(c['size'])} of a {human(c['limit'])} limit, "
              f"{c['evicted_entries']} entries evicted{over}")
    if c.get("full"):
        print(f"  cache     FULL ({c['dir']}): {c['served_uncached']} chunks served without caching; "
              "the prefetch waits for space")
    _print_layers(status)
    _print_trace(status)
    if args.slow:
        _print_slow(status)
    return 0


def _print_layers(status: dict[str, Any]) -> None:
    """The side index's layer check (an ordinary image), in one line."""
    lc = status.get("layers")
    if not lc:
        return
    strict = " (--verify-layers: reads wait for it)" if lc["strict"] else ""
    if lc["state"] == "verified":
        how = "on this node before" if lc["recorded"] else f"{lc['checked_layers']} layers read whole"
        line = f"verified: the side index matches the image's layers ({how})"
    elif lc["state"] == "failed":
        line = f"FAILED, every read of this image is refused: {lc['problem']}"
    elif lc["state"] == "unchecked":
        line = "unchecked: nothing has read the layers whole (--no-prefetch); trusted as pushed"
    else:
        line = f"{lc['state']}: {lc['checked_layers']} of {lc['layers_to_check']} layers"
    print(f"  layers    {line}{strict}")


def _print_trace(status: dict[str, Any]) -> None:
    """The learned-prefetch lines of ``lazyfs status``."""
    t = status.get("trace")
    if not t:
        return
    rec = ("recording" if t["recording"] else "recorded") + f" {t['recorded_chunks']} first reads"
    if t["saved"]:
        rec += f" (saved to {t['saved']})"
    print(f"  trace     {rec}")
    if t["lead_state"] != "none" and not t["lead_chunks"]:
        print("  learned   no trace for this image (prefetch in blob order)")
    elif t["lead_state"] != "none":
        print(f"  learned   {t['lead_state']}: {t['lead_chunks']} chunks ({human(t['lead_bytes'])}) "
              f"from {t['lead_source'] or 'nowhere'}, {t['lead_missing']} were missing, "
              f"{t['lead_misses']} waited for by reads")
        runs = t.get("lead_runs") or []
        if runs:
            print("  runs      " + ", ".join(
                f"{r['recorded']} ({r['chunks']} chunks, {run_source(r['source'])})" for r in runs))


def _print_slow(status: dict[str, Any]) -> None:
    """``lazyfs status --slow``: the reads that waited longest on the network."""
    slow = status.get("slow") or []
    t = status.get("trace") or {}
    print(f"  demand    {status['reads']['chunk_misses']} chunks waited on the network"
          + (f" ({t['lead_misses']} of them in the learned order)" if t.get("lead_chunks") else ""))
    if not slow:
        print("  slowest   no read has waited on the network")
        return
    print(f"  slowest   {len(slow)} reads that waited longest on the network:")
    for r in slow:
        more = f" +{r['chunk_count'] - len(r['chunks'])}" if r["chunk_count"] > len(r["chunks"]) else ""
        print(f"    {r['wait'] * 1000:9.1f} ms  /{r['file']} at {r['offset']}+{r['size']} "
              f"({r['at']:.2f}s after mount), chunks {' '.join(c[:16] for c in r['chunks'])}{more}")
