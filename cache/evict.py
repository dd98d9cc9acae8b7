"""Least-recently-used eviction under a size limit, never touching pinned images.

The limit (``--cache-size``) is node-wide: every process that uses the cache directory
and was given a limit keeps it. An eviction runs under an exclusive ``flock`` of
``CACHE/evict.lock`` (one at a time per node; a process that finds another evicting
skips its turn), and goes:

1. read the live pins (``cache.pins``) and list every chunk of the pinned images;
2. walk the entries (size and mtime: the mtime is the last use, see ``cache.store``);
3. delete unpinned entries, oldest first, until the cache is at ``low_water`` of the
   limit;
4. delete the ``complete`` marker of every unpinned image that lost a chunk, so that it
   is not mounted offline as if it were whole.

Deleting is ``unlink``: a reader that has an entry open reads it whole, a reader that
opens it after finds nothing and fetches the chunk again; an entry is never half gone.
If the pinned images alone need more than the limit, nothing of theirs is deleted: the
cache stays over its limit (logged once, shown by ``lazyfs status`` and ``lazyfs cache``)
and serving goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Set
from pathlib import Path

import trio

from .catalog import image_chunks, index_digest
from .images import ImageStore
from .pins import live_pins
from .store import ChunkStore

log = logging.getLogger(__name__)


class EvictionBusy(Exception):
    """Another process is evicting from this cache right now."""


@contextlib.contextmanager
def eviction_lock(root: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold the cache's eviction lock (``flock``; released if the holder dies)."""
    fd = os.open(root / "evict.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise EvictionBusy(str(root)) from None
        yield
    finally:
        os.close(fd)


@dataclasses.dataclass
class EvictionResult:
    entries: int = 0
    bytes: int = 0
    """Entries and bytes in the cache after the eviction."""
    pinned_bytes: int = 0
    """Bytes of cached entries that pinned images need."""
    evicted_entries: int = 0
    evicted_bytes: int = 0
    incomplete: list[str] = dataclasses.field(default_factory=list)
    """Manifests of images that were complete and no longer are."""


def pinned_digests(images: ImageStore) -> set[bytes] | None:
    """Every chunk digest that a live mount's image needs; None if a pinned image's
    index cannot be read (then nothing may be evicted: we cannot tell what it needs)."""
    out: set[bytes] = set()
    for p in live_pins(images):
        chunks = image_chunks(images, p.index)
        if chunks is None:
            log.warning("the index of pinned image %s is not readable; evicting nothing", p.ref or p.manifest)
            return None
        out.update(c.digest for c in chunks)
    return out


def evict(store: ChunkStore, images: ImageStore, target: int, *, only: Set[bytes] | None = None,
          wait: bool = True) -> EvictionResult:
    """Delete unpinned entries, least recently used first, until the cache holds at most
    ``target`` bytes (``only``: consider just these digests). Blocking: run it in a
    thread. Raises EvictionBusy when ``wait`` is false and another process evicts."""
    with eviction_lock(store.root, wait=wait):
        pinned = pinned_digests(images)
        entries = list(store.entries())
        result = EvictionResult(entries=len(entries), bytes=sum(st.st_size for _, st in entries))
        if pinned is None:
            return result
        result.pinned_bytes = sum(st.st_size for d, st in entries if d in pinned)
        if result.bytes <= target:
            return result
        victims = sorted(((st.st_mtime, d, st.st_size) for d, st in entries
                          if d not in pinned and (only is None or d in only)))
        gone: set[bytes] = set()
        for _mtime, digest, size in victims:
            if result.bytes <= target:
                break
            try:
                os.unlink(store.path(digest))
            except FileNotFoundError:
                pass  # someone else removed it
            except OSError as exc:
                log.warning("cannot evict cache entry %s: %s", digest.hex(), exc)
                continue
            gone.add(digest)
            result.bytes -= size
            result.entries -= 1
            result.evicted_entries += 1
            result.evicted_bytes += size
        if gone:
            result.incomplete = unmark_complete(images, gone)
    return result


def unmark_complete(images: ImageStore, gone: set[bytes]) -> list[str]:
    """Drop the ``complete`` marker of each image that lost one of the ``gone`` chunks."""
    out: list[str] = []
    try:
        hexes = [n for n in os.listdir(images.root / "complete") if not n.startswith(".")]
    except OSError:
        return out
    for hexd in hexes:
        manifest = f"sha256:{hexd}"
        try:
            data = images.manifest(manifest)
        except ValueError:
            continue
        index = index_digest(data) if data else None
        chunks = image_chunks(images, index) if index else None
        if chunks is None or any(c.digest in gone for c in chunks):
            with contextlib.suppress(OSError):
                os.unlink(images.root / "complete" / hexd)
            out.append(manifest)
    return out


class CacheKeeper:
    """Keeps one process's view of the cache tidy: flushes read times (LRU order) in
    batches and, with a limit, evicts when the cache has grown past it.

    The size is scanned at start and every ``rescan`` seconds (other processes write
    too); in between it is estimated from what this process wrote, which costs nothing."""

    def __init__(self, store: ChunkStore, images: ImageStore, limit: int | None, *,
                 interval: float = 2.0, rescan: float = 60.0, low_water: float = 0.9) -> None:
        self.store = store
        self.images = images
        self.limit = limit
        self.interval = interval
        self.rescan = rescan
        self.low_water = low_water
        self.size = 0
        self.entries = 0
        self.pinned_bytes = 0
        self.evicted_entries = 0
        self.evicted_bytes = 0
        self.over_limit = False
        self.measure = False
        """Scan the size every ``rescan`` seconds even without a limit (for metrics)."""
        self._written_at_scan = 0
        self._scanned_at = -float("inf")
        self._evict_above = limit or 0
        """Evict once the estimate passes this: the limit, or, while pinned images keep the
        cache over it, what is left plus 5% of the limit (no rescan every tick)."""

    def state(self) -> dict[str, object]:
        return {"limit": self.limit, "size": self.size, "entries": self.entries,
                "pinned_bytes": self.pinned_bytes, "over_limit": self.over_limit,
                "evicted_entries": self.evicted_entries, "evicted_bytes": self.evicted_bytes}

    async def run(self) -> None:
        while True:
            await self.tick()
            await trio.sleep(self.interval)

    async def tick(self) -> None:
        await trio.to_thread.run_sync(self.store.flush_touches)
        if self.limit is None:
            if self.measure and time.monotonic() - self._scanned_at > self.rescan:
                self.entries, self.size = await trio.to_thread.run_sync(self.store.usage)
                self._scanned_at = time.monotonic()
            return
        estimate = self.size + self.store.written_bytes - self._written_at_scan
        stale = time.monotonic() - self._scanned_at > self.rescan
        if estimate > self._evict_above or stale:
            await trio.to_thread.run_sync(self._evict)

    def _evict(self) -> None:
        assert self.limit is not None
        written = self.store.written_bytes
        try:
            r = evict(self.store, self.images, int(self.limit * self.low_water), wait=False)
        except EvictionBusy:
            return
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cache eviction failed: %s", exc)
            return
        self._scanned_at = time.monotonic()
        self._written_at_scan = written
        self.size, self.entries, self.pinned_bytes = r.bytes, r.entries, r.pinned_bytes
        if r.evicted_entries:
            self.evicted_entries += r.evicted_entries
            self.evicted_bytes += r.evicted_bytes
            log.info("evicted %d least recently used cache entries (%d bytes) to keep %s under %d bytes%s",
                     r.evicted_entries, r.evicted_bytes, self.store.root, self.limit,
                     f"; {len(r.incomplete)} images no longer complete" if r.incomplete else "")
        over = r.bytes > self.limit
        self._evict_above = max(self.limit, r.bytes + self.limit // 20) if over else self.limit
        if over and not self.over_limit:
            log.warning("cache %s holds %d bytes, over its limit of %d: the mounted images need %d bytes "
                        "of it and are kept whole; it shrinks once they are unmounted",
                        self.store.root, r.bytes, self.limit, r.pinned_bytes)
        elif not over and self.over_limit:
            log.info("cache %s is within its limit again", self.store.root)
        self.over_limit = over
