"""The node's content-addressed chunk store: one directory shared by every mount.

Layout under the cache root::

    chunks/ab/abcdef...    one entry per chunk, named by its BLAKE3 digest (hex)
    chunks/ab/.tmp.abcdef...PID.TID
                           an entry being written, renamed into place when whole (those
                           of writers that died are swept when a store is opened)

Temp files live in their entry's own directory, never in a common tmp/: a rename across
directories takes the filesystem's rename lock, which overlayfs holds while it copies a
directory up from a lazyfs lower layer and asks this very mount for its attributes. A
mount whose cache sits on the same filesystem as the containers' upper dirs (the
snapshotter's layout) would deadlock against its own container; a rename within one
directory takes only that directory's lock, which overlayfs never holds.

An entry holds a chunk's plain (decoded) bytes, so that a read of the mount is one
``pread`` of the blocks it touches plus a check of those blocks, never a read, hash and
decode of the whole chunk (``read_range``)::

    magic "LZC2" | block size (u32) | chunk size (u64)
    xxh3-64 of each block (u64 each; blocks of BLOCK_SIZE, the last one short)
    xxh3-64 of the header so far (u64)
    the plain bytes: block k at header_size + k * block size

xxh3, not the chunk's BLAKE3 digest: nothing but this node writes its cache, and what
enters it was checked against its digest first; the checksums guard against the disk and
against crashes. Entries are never fsynced: a write torn by a crash fails a checksum when
read back and the entry is dropped and fetched again, so a wrong byte is never served (the
s3ql / stargz idea of atomic cache files, with a checksum instead of a barrier). Entries of
the earlier format ("LZC1", the payload as stored in the blob) are treated as missing:
dropped when met and fetched again.

An entry's mtime is its last use, for least-recently-used eviction (``cache.evict``):
set when it is written, and moved forward in batches (``flush_touches``) when it has been
read and is more than ``TOUCH_AFTER`` seconds old, never once per read.

A full disk (ENOSPC, EDQUOT) is a state, not an error per read: the first refusal is
logged once, later chunks are served from memory without trying the disk again until
``statvfs`` shows room, and the first write that succeeds logs that caching resumed.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .atomic import sweep_dead_temps, write_atomic
from .entry import (
    FIRST_READ,
    OLD_FORMAT,
    check_blocks,
    check_entry,
    entry_size,
    head_size,
    pack_header,
    parse_head,
)
from .errors import CacheError
from .private import claim

log = logging.getLogger(__name__)

_HEADS_KEPT = 1 << 15
"""Entry headers ``read_range`` keeps in memory (about 200 bytes each for 1 MiB chunks)."""

TOUCH_AFTER = 600.0
"""Seconds after which reading an entry moves its mtime (its LRU position) forward."""

STREAM_READ = 64 << 10
"""A read of an entry from disk at least this big brings the rest of the entry in with it
(random small reads bring only their blocks)."""

_ROOM_MARGIN = 256 << 10
"""Free bytes a full disk must show beyond one entry before writes are tried again."""

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ChunkStore:
    """Chunks on local disk, keyed by digest, checked on every read."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._chunks = self.root / "chunks"
        self._prefix = str(self._chunks) + "/"  # entry names are built as strings: pathlib
        # costs more than the stat or the write itself on the prefetch's path
        claim(self.root)  # caches hold private images: its owner's alone
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self._chunks, prefix=".probe-")
            probe.close()
        except OSError as exc:
            raise CacheError(f"cache directory {self.root} is not usable: {exc.strerror}") from exc
        self.write_errors = 0
        self.dropped = 0
        self.written_bytes = 0
        """Bytes of entries this process wrote (the evictor's estimate between scans)."""
        self.full_since: float | None = None
        """``time.time()`` when the disk last refused a write for lack of space; None when
        writes succeed."""
        self.full_events = 0
        self.skipped_full = 0
        """Chunks served without caching because the cache disk was full."""
        self._state = threading.Lock()
        self._touched: set[bytes] = set()
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._heads: dict[bytes, tuple[int, int, int, bytes]] = {}
        """Headers read by ``read_range``: (where the bytes start, block size, chunk size,
        the header's bytes), by digest."""
        self.old_entries = 0
        """Entries of the earlier format met (and dropped) by reads."""
        self.later: Callable[..., object] | None = None
        """Where ``read_range`` sends work its reader need not wait for (``later(fn,
        *args)``: a low-priority thread's queue); None: done at once."""
        self.swept = 0
        """Temp entries of dead writers removed by ``sweep_temps``."""
        self._sweeper = threading.Thread(target=self.sweep_temps, name="lazyfs-sweep", daemon=True)
        self._sweeper.start()

    def sweep_temps(self) -> int:
        """Delete temp entries left by writers that died (a SIGKILLed mount leaves its
        half-written entries behind forever otherwise), in every entry directory. A temp
        name ends in ``.PID.TID``; only those whose process is gone are removed, so the
        mounts sharing this cache keep theirs. Runs in a thread of its own when a store is
        opened: listing a big cache takes a while, and nothing waits for it."""
        dirs: list[Path] = []
        try:
            dirs += [Path(e.path) for e in os.scandir(self._chunks) if e.is_dir(follow_symlinks=False)]
        except OSError:
            pass
        swept = sweep_dead_temps(dirs)
        with self._state:
            self.swept += swept
        if swept:
            log.info("removed %d temp entries left by writers that died", swept)
        return swept

    def path(self, digest: bytes) -> Path:
        return Path(self._entry(digest))

    def _entry(self, digest: bytes) -> str:
        hexd = digest.hex()
        return f"{self._prefix}{hexd[:2]}/{hexd}"

    def contains(self, digest: bytes, size: int | None = None) -> bool:
        """Whether an entry exists; given the chunk's (plain) ``size``, also whether the
        entry has the length a whole entry has (one stat, no read): a write torn by a
        crash is most often short, and must not count as cached (nor does an entry of
        the earlier format, whose length differs)."""
        try:
            st = os.stat(self._entry(digest))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return size is None or st.st_size == entry_size(size)

    def get(self, digest: bytes) -> memoryview | None:
        """The plain bytes of a whole, intact entry (every block checked), or None.

        A torn or rotten entry is logged, deleted and reported as missing."""
        path = self._entry(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("cache entry %s unreadable (%s); fetching it again", digest.hex(), exc)
            return None
        problem = check_entry(data)
        if problem:
            self._drop(digest, problem)
            return None
        self._touched.add(digest)
        return memoryview(data)[head_size(data) :]

    def read_range(self, digest: bytes, offset: int, size: int, *, nowait: bool = False,
                   then_wait: Callable[[], bool] | None = None) -> bytes | memoryview | None:
        """Bytes ``[offset, offset + size)`` of the chunk ``digest`` (short at its end),
        read with one ``pread`` of the blocks they touch, each of them checked; None if
        the cache has no intact entry (a torn or rotten one is logged and deleted).

        An entry's header is read once (with the first 4 KiB, which hold all of a small
        chunk) and remembered: it follows from the chunk's bytes, so it stays right
        however often the entry is evicted and written again.

        Blocking; with ``nowait``, it raises ``BlockingIOError`` instead of waiting for
        the disk (the bytes are not all in the page cache, or the filesystem cannot tell):
        a caller on an event loop then asks again from a worker thread. With ``then_wait``
        as well, it first asks ``then_wait()`` whether to wait here after all, and if so
        reads again on the same descriptor."""
        if nowait and not self._nowait:
            if then_wait is None or not then_wait():
                raise BlockingIOError(errno.EAGAIN, "reads that never wait are not supported here")
            nowait = False
        path = self._entry(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("cache entry %s unreadable (%s); fetching it again", digest.hex(), exc)
            return None
        known = self._heads.get(digest)
        try:
            try:
                problem, data = self._read_open(fd, path, digest, known, offset, size, nowait)
            except BlockingIOError:
                if not nowait or then_wait is None or not then_wait():
                    raise
                problem, data = self._read_open(fd, path, digest, known, offset, size, False)
        except BlockingIOError:
            raise
        except OSError as exc:
            log.warning("cache entry %s unreadable (%s); fetching it again", digest.hex(), exc)
            return None
        finally:
            os.close(fd)
        if problem is not None:
            if known is not None:  # perhaps written since with another block size: look again
                self._heads.pop(digest, None)
                return self.read_range(digest, offset, size, nowait=nowait, then_wait=then_wait)
            self._drop(digest, problem)
            return None
        self._touched.add(digest)
        return data

    def _read_open(self, fd: int, path: str, digest: bytes, known: tuple[int, int, int, bytes] | None,
                   offset: int, size: int, nowait: bool) -> tuple[str | None, memoryview]:
        """``read_range`` on the entry open at ``fd``: ``(problem, the bytes asked for)``; a
        header read here is remembered once its blocks pass."""
        head: bytes | bytearray
        if known is not None:
            at, block, chunk_size, head = known
        else:
            head = self._pread(fd, FIRST_READ, 0, nowait)
            problem, at, block, chunk_size = parse_head(head)
            if problem is not None:
                if nowait and len(head) < FIRST_READ:
                    raise BlockingIOError(errno.EAGAIN, "maybe read in part")  # the disk decides
                return problem, memoryview(b"")
        offset = min(offset, chunk_size)
        end = min(offset + size, chunk_size)
        first, last = offset // block, -(-end // block)
        lo, hi = at + first * block, at + max(min(last * block, chunk_size), first * block)
        if known is None and hi <= len(head):
            data = memoryview(head)[lo:hi]
        else:
            data = memoryview(self._pread(fd, hi - lo, lo, nowait))
            if not nowait and hi - lo >= STREAM_READ and hi < at + chunk_size:
                # A read of an entry not in the page cache may be the first of a file
                # read through, or of random reads that come back to this entry: ask
                # for the rest of it, so that the next reads find it (each read opens
                # the entry anew, which leaves the kernel no readahead state to go
                # on). After the read, not before: its own blocks then come in one
                # small disk request, not at the end of the entry's megabyte; and
                # not on the reader's time where there is a thread to ask (asking
                # for a megabyte takes the kernel 0.1-0.3 ms)
                if self.later is not None:
                    self.later(self.will_need_from, path, hi)
                else:
                    os.posix_fadvise(fd, hi, 0, os.POSIX_FADV_WILLNEED)
            if len(data) < hi - lo and nowait:
                raise BlockingIOError(errno.EAGAIN, "read in part")
        problem = check_blocks(head, data, first, block) if len(data) == hi - lo else "truncated"
        if problem is not None:
            return problem, memoryview(b"")
        if known is None:
            if len(self._heads) >= _HEADS_KEPT:
                self._heads.clear()
            self._heads[digest] = (at, block, chunk_size, bytes(head[:at]))
        skip = offset - first * block
        return None, data[skip : skip + end - offset]

    @staticmethod
    def will_need_from(path: str, at: int) -> None:
        """Ask the disk for the entry at ``path`` from byte ``at`` on (a missing one is
        skipped)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, at, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def will_need(self, digests: Iterable[bytes]) -> int:
        """Ask the disk for the entries of ``digests`` (``POSIX_FADV_WILLNEED``: the
        kernel reads them into the page cache in the background); blocking only for the
        opens. Missing entries are skipped. Returns how many were asked for."""
        asked = 0
        for digest in digests:
            try:
                fd = os.open(self._entry(digest), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                asked += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return asked

    def _pread(self, fd: int, n: int, at: int, nowait: bool) -> bytes | bytearray:
        if not nowait:
            return os.pread(fd, n, at)
        buf = bytearray(n)
        try:
            got = os.preadv(fd, [buf], at, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False  # this filesystem cannot say: blocking reads from now on
            raise BlockingIOError(errno.EAGAIN, "reads that never wait are not supported here") from exc
        del buf[got:]
        return buf

    def _drop(self, digest: bytes, problem: str) -> None:
        self._heads.pop(digest, None)
        if problem == OLD_FORMAT:
            if not self.old_entries:
                log.warning("old cache format in %s: entries are refetched", self.root)
            self.old_entries += 1
        else:
            log.warning("cache entry %s is %s; dropped, it will be fetched again", digest.hex(), problem)
            self.dropped += 1
        try:
            os.unlink(self._entry(digest))
        except OSError:
            pass

    def flush_touches(self) -> int:
        """Move the mtime of entries read since the last flush and not touched for
        ``TOUCH_AFTER`` seconds to now: one ``stat`` per entry read, and a ``utime`` for
        those, in a batch (a read itself costs no ``stat``). Blocking. Returns how many
        were moved."""
        touched, self._touched = self._touched, set()
        moved = 0
        now = time.time()
        for digest in touched:
            path = self._entry(digest)
            try:
                if now - os.stat(path).st_mtime > TOUCH_AFTER:
                    os.utime(path)
                    moved += 1
            except OSError:
                pass  # evicted meanwhile
        return moved

    @property
    def full(self) -> bool:
        return self.full_since is not None

    def has_room(self, nbytes: int) -> bool:
        """Whether the cache's filesystem has ``nbytes`` free, with a margin (one statvfs)."""
        try:
            st = os.statvfs(self._chunks)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= nbytes + _ROOM_MARGIN

    def put(self, digest: bytes, plain: bytes | memoryview) -> bool:
        """Store the plain bytes of a verified chunk atomically. Returns False (and logs)
        when the disk refuses: a full cache must not fail a read that the network has
        served."""
        if self.contains(digest, len(plain)):
            # Written meanwhile by another process of this cache (the node's `lazyfs peer`
            # that fetched it for this mount, another mount of the image): one stat, where
            # writing it again cost a create, a write and a rename.
            return True
        path = self._entry(digest)
        if self.full_since is not None and not self.has_room(entry_size(len(plain))):
            self.skipped_full += 1
            return False
        header = pack_header(plain)
        try:
            write_atomic(path, [header, plain])
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                self._became_full(exc)
                return False
            self.write_errors += 1
            level = logging.WARNING if self.write_errors < 10 else logging.DEBUG
            log.log(level, "cannot cache chunk %s (%s); serving it from the network", digest.hex(),
                    exc.strerror)
            return False
        self.written_bytes += len(header) + len(plain)
        if self.full_since is not None:
            self._has_space_again()
        return True

    def _became_full(self, exc: OSError) -> None:
        with self._state:
            self.skipped_full += 1
            if self.full_since is not None:
                return
            self.full_since = time.time()
            self.full_events += 1
        log.warning("cache full: %s refused a write (%s); chunks are served from memory without "
                    "being cached until space returns", self.root, os.strerror(exc.errno or errno.ENOSPC))

    def _has_space_again(self) -> None:
        with self._state:
            if self.full_since is None:
                return
            took = time.time() - self.full_since
            self.full_since = None
        log.warning("cache has space again after %.0fs: caching resumed (%d chunks were served "
                    "without caching)", took, self.skipped_full)

    def cache_state(self) -> dict[str, object]:
        """What ``lazyfs status`` shows about the cache disk."""
        return {"dir": str(self.root), "full": self.full, "full_since": self.full_since,
                "full_events": self.full_events, "served_uncached": self.skipped_full,
                "write_errors": self.write_errors, "dropped_entries": self.dropped,
                "old_format_entries": self.old_entries}

    def remove(self, digest: bytes) -> None:
        try:
            os.unlink(self._entry(digest))
        except FileNotFoundError:
            pass

    def entries(self) -> Iterator[tuple[bytes, os.stat_result]]:
        """Every entry with its stat (size, mtime): ``(digest, stat)``. Entries removed
        while the walk runs are skipped."""
        try:
            subs = list(os.scandir(self._chunks))
        except OSError:
            return
        for sub in subs:
            try:
                it = os.scandir(sub.path)
            except OSError:
                continue
            with it:
                for entry in it:
                    try:
                        digest = bytes.fromhex(entry.name)
                        st = entry.stat()
                    except (ValueError, OSError):
                        continue
                    if len(digest) == 32:
                        yield digest, st

    def usage(self) -> tuple[int, int]:
        """``(entries, bytes on disk)`` of the whole store."""
        count = total = 0
        for _digest, st in self.entries():
            count += 1
            total += st.st_size
        return count, total
