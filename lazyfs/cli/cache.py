"""``lazyfs cache``: what the node cache holds, pruning it, verifying it.

    lazyfs cache [--cache DIR] [--json]                   usage, per image
    lazyfs cache prune [--to SIZE] [--image REF]          evict unpinned entries, LRU first
    lazyfs cache verify                                   check every entry in full

Sizes are bytes of entry files (header and stored payload). An image is "pinned" while a
live mount uses it (``cache.pins``); prune never removes a pinned image's chunks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExitCode, UserError
from .common import DEFAULT_CACHE, human, size

if TYPE_CHECKING:
    from cache.images import ImageStore
    from cache.store import ChunkStore

    from .common import SubParsers


def register(sub: SubParsers) -> None:
    """Add ``cache`` and its actions to the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", default=argparse.SUPPRESS,
                        help=f"node cache directory (default {DEFAULT_CACHE}, or $LAZYFS_CACHE)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    p = sub.add_parser("cache", parents=[common], help="show the node cache's usage; prune or verify it")
    p.set_defaults(func=cmd_cache, cache=str(DEFAULT_CACHE), json=False, cache_action="show")
    actions = p.add_subparsers(dest="cache_action", metavar="ACTION")
    a = actions.add_parser("show", parents=[common], help="usage in total and per image (the default)")
    a = actions.add_parser("prune", parents=[common],
                           help="evict entries of images no mount uses, least recently used first")
    a.add_argument("--to", type=size, default=0, metavar="SIZE",
                   help="stop once the cache holds at most SIZE (default 0: evict every unpinned entry)")
    a.add_argument("--image", metavar="REF",
                   help="evict only this image's chunks (a reference or sha256:...)")
    actions.add_parser("verify", parents=[common],
                       help="check every entry in full (xxh3 and BLAKE3); drop the bad ones")


def cmd_cache(args: argparse.Namespace) -> int:
    # the cache's modules (its index reader, pins, eviction): for this command only
    from cache.errors import CacheError
    from cache.images import ImageStore
    from cache.store import ChunkStore

    root = Path(args.cache).absolute()
    if not (root / "chunks").is_dir():
        raise UserError(f"{root} is not a lazyfs cache (no chunks/ directory)", ExitCode.CACHE)
    try:
        store, images = ChunkStore(root), ImageStore(root)
    except CacheError as exc:
        raise UserError(str(exc), ExitCode.CACHE) from exc
    if args.cache_action == "prune":
        return _prune(args, store, images)
    if args.cache_action == "verify":
        return _verify(args, store, images)
    report = usage(store, images)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"{report['cache']}: {human(report['bytes'])} in {report['entries']} entries")
    for im in report["images"]:
        name = ", ".join(im["refs"]) or im["manifest"]
        if im["bytes"] is None:
            print(f"  {name}\n    index not cached: chunks unknown")
            continue
        frac = im["cached_bytes"] / im["bytes"] if im["bytes"] else 1.0
        state = "complete" if im["complete"] else "incomplete"
        pinned = ", ".join(f"pid {p['pid']} at {p['mountpoint']}" for p in im["pinned_by"])
        print(f"  {name}\n    {human(im['cached_bytes'])} / {human(im['bytes'])} ({frac:.1%}), "
              f"{im['cached_chunks']} / {im['chunks']} chunks, {state}, "
              + (f"pinned by {pinned}" if pinned else "not mounted"))
    if report["other_entries"]:
        print(f"  (entries of no known image: {report['other_entries']}, {human(report['other_bytes'])})")
    return 0


def usage(store: ChunkStore, images: ImageStore) -> dict[str, Any]:
    """Usage in total and per known image (what ``lazyfs cache --json`` prints)."""
    # the index reader (sqlite3) and the pins: when used
    from cache.catalog import image_chunks, known_images
    from cache.entry import entry_size
    from cache.pins import live_pins

    entries = {d: st.st_size for d, st in store.entries()}
    pinned: dict[str, list[dict[str, Any]]] = {}
    for p in live_pins(images):
        pinned.setdefault(p.manifest, []).append({"pid": p.pid, "mountpoint": p.mountpoint, "ref": p.ref})
    claimed: set[bytes] = set()
    out = []
    for k in known_images(images):
        chunks = image_chunks(images, k.index) if k.index else None
        item: dict[str, Any] = {"refs": list(k.refs), "manifest": k.manifest, "index": k.index,
                                "pinned_by": pinned.get(k.manifest, []),
                                "marked_complete": images.is_complete(k.manifest)}
        if chunks is None:
            item.update(chunks=None, bytes=None, cached_chunks=None, cached_bytes=None, complete=False)
            out.append(item)
            continue
        unique = {c.digest: entry_size(c.size) for c in chunks}
        cached = [n for d, n in unique.items() if entries.get(d) == n]
        claimed.update(unique)
        item.update(chunks=len(unique), bytes=sum(unique.values()), cached_chunks=len(cached),
                    cached_bytes=sum(cached), complete=len(cached) == len(unique))
        out.append(item)
    other = [n for d, n in entries.items() if d not in claimed]
    return {"cache": str(store.root), "entries": len(entries), "bytes": sum(entries.values()),
            "images": out, "other_entries": len(other), "other_bytes": sum(other)}


def _prune(args: argparse.Namespace, store: ChunkStore, images: ImageStore) -> int:
    from cache.catalog import image_chunks, index_digest  # as in usage
    from cache.evict import evict

    only = None
    if args.image:
        digest = args.image if args.image.startswith("sha256:") else images.resolve(args.image)
        try:
            manifest = images.manifest(digest) if digest else None
        except ValueError:
            manifest = None
        index = index_digest(manifest) if manifest else None
        chunks = image_chunks(images, index) if index else None
        if chunks is None:
            raise UserError(f"image {args.image} is not in the cache at {store.root}", ExitCode.IMAGE)
        only = {c.digest for c in chunks}
    r = evict(store, images, args.to, only=only)
    if args.json:
        print(json.dumps({"evicted_entries": r.evicted_entries, "evicted_bytes": r.evicted_bytes,
                          "entries": r.entries, "bytes": r.bytes, "pinned_bytes": r.pinned_bytes,
                          "no_longer_complete": r.incomplete}, indent=2, sort_keys=True))
        return 0
    print(f"evicted {r.evicted_entries} entries ({human(r.evicted_bytes)}); the cache holds "
          f"{human(r.bytes)} in {r.entries} entries, {human(r.pinned_bytes)} of it pinned by "
          "mounted images")
    if r.bytes > args.to and not args.image:
        print(f"still over {human(args.to)}: the rest belongs to mounted images")
    return 0


def _verify(args: argparse.Namespace, store: ChunkStore, images: ImageStore) -> int:
    from cache.verify import verify  # BLAKE3 and lz4: when used

    r = verify(store, images)
    if args.json:
        print(json.dumps({"checked": r.checked, "checked_bytes": r.checked_bytes,
                          "bad": [{"digest": d, "problem": p} for d, p in r.bad],
                          "no_longer_complete": r.incomplete}, indent=2, sort_keys=True))
        return 0
    print(f"checked {r.checked} entries ({human(r.checked_bytes)}): {len(r.bad)} bad, dropped")
    for d, problem in r.bad:
        print(f"  {d}: {problem}")
    for m in r.incomplete:
        print(f"  image {m} is no longer complete (the next mount fetches what is missing)")
    return 0


