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

An entry is a 24-byte header (magic, codec, uncompressed size, stored size, xxh3-64 of
the payload) followed by the payload exactly as it came from the blob. Entries are never
fsynced: a write torn by a crash fails its checksum when read back and is dropped and
fetched again, so a wrong byte is never served (the s3ql / stargz idea of atomic cache
files, with a checksum instead of a barrier).

An entry's mtime is its last use, for least-recently-used eviction (``cache.evict``):
set when it is written, and moved forward when it is read and is more than
``TOUCH_AFTER`` seconds old, in batches (``flush_touches``), never once per read.

A full disk (ENOSPC, EDQUOT) is a state, not an error per read: the first refusal is
logged once, later chunks are served from memory without trying the disk again until
``statvfs`` shows room, and the first write that succeeds logs that caching resumed.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import xxhash

from blockindex.format import CODECS

from .errors import CacheError
from .pids import alive
from .private import claim

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<4sB3xIIQ")
_MAGIC = b"LZC1"
HEADER_SIZE = _HEADER.size

TOUCH_AFTER = 600.0
"""Seconds after which reading an entry moves its mtime (its LRU position) forward."""

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

    def contains(self, digest: bytes, stored_size: int | None = None) -> bool:
        """Whether an entry exists; given the chunk's ``stored_size``, also whether the
        entry has the length a whole entry has (one stat, no read): a write torn by a
        crash is most often short, and must not count as cached."""
        try:
            st = os.stat(self._entry(digest))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stored_size is None or st.st_size == _HEADER.size + stored_size

    def get(self, digest: bytes) -> tuple[int, int, memoryview] | None:
        """``(codec, size, payload)`` of a whole, intact entry, or None.

        A torn or rotten entry is logged, deleted and reported as missing."""
        path = self._entry(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache entry %s unreadable (%s); fetching it again", digest.hex(), exc)
            return None
        problem = _check(data)
        if problem:
            log.warning("cache entry %s is %s; dropped, it will be fetched again", digest.hex(), problem)
            self.dropped += 1
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        if time.time() - mtime > TOUCH_AFTER:
            self._touched.add(digest)
        _, codec, size, _, _ = _HEADER.unpack_from(data)
        return codec, size, memoryview(data)[_HEADER.size :]

    def flush_touches(self) -> int:
        """Move the mtime of entries read since the last flush (and not touched for
        ``TOUCH_AFTER`` seconds) to now: one ``utime`` per entry, in a batch. Blocking."""
        touched, self._touched = self._touched, set()
        for digest in touched:
            try:
                os.utime(self._entry(digest))
            except OSError:
                pass  # evicted meanwhile
        return len(touched)

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

    def put(self, digest: bytes, codec: int, size: int, payload: bytes | memoryview) -> bool:
        """Store a verified chunk atomically. Returns False (and logs) when the disk
        refuses: a full cache must not fail a read that the network has served."""
        path = self._entry(digest)
        if self.full_since is not None and not self.has_room(_HEADER.size + len(payload)):
            self.skipped_full += 1
            return False
        header = _HEADER.pack(_MAGIC, codec, size, len(payload), xxhash.xxh3_64_intdigest(payload))
        try:
            write_atomic(path, [header, payload])
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                self._became_full(exc)
                return False
            self.write_errors += 1
            level = logging.WARNING if self.write_errors < 10 else logging.DEBUG
            log.log(level, "cannot cache chunk %s (%s); serving it from the network", digest.hex(),
                    exc.strerror)
            return False
        self.written_bytes += _HEADER.size + len(payload)
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
                "write_errors": self.write_errors, "dropped_entries": self.dropped}

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


TEMP_PREFIX = ".tmp."
"""Names starting with a dot are never entries: listings skip them."""


def temp_path(path: str | Path) -> str:
    """Where ``write_atomic`` writes ``path`` before renaming it: the same directory (see
    the module docstring for why), a name unique per writer thread without mkstemp's
    cost, ending in ``.PID.TID`` so that a sweep can tell a dead writer's."""
    parent, name = os.path.split(path)
    return f"{parent}/{TEMP_PREFIX}{name}.{os.getpid()}.{threading.get_ident()}"


def write_atomic(path: str | Path, parts: list[bytes | memoryview]) -> None:
    """Write ``parts`` to ``path`` whole or not at all: into a temp file in ``path``'s own
    directory (created if needed), then renamed into place. Raises OSError."""
    tmp = temp_path(path)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = os.writev(fd, parts)
            if written != sum(map(len, parts)):
                raise OSError(errno.EIO, f"short write ({written} bytes)")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sweep_dead_temps(dirs: list[Path]) -> int:
    """Remove the temp files of writers whose process is gone from ``dirs``; their count."""
    swept = 0
    for directory in dirs:
        try:
            names = [n for n in os.listdir(directory) if not n.startswith(".probe-")]
        except OSError:
            continue
        for name in names:
            parts = name.rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or alive(int(parts[1])):
                continue
            if not name.startswith(TEMP_PREFIX):
                continue
            try:
                os.unlink(directory / name)
                swept += 1
            except OSError:
                pass
    return swept


def check_entry(data: bytes) -> str | None:
    """What is wrong with the bytes of an entry file (header, length, xxh3), or None."""
    return _check(data)


def unpack_entry(data: bytes) -> tuple[int, int, memoryview]:
    """``(codec, size, payload)`` of an entry that ``check_entry`` passed."""
    _, codec, size, _, _ = _HEADER.unpack_from(data)
    return codec, size, memoryview(data)[_HEADER.size :]


def _check(data: bytes) -> str | None:
    if len(data) < _HEADER.size:
        return "truncated"
    magic, codec, _size, stored, checksum = _HEADER.unpack_from(data)
    if magic != _MAGIC or codec not in CODECS:
        return "not a chunk entry"
    payload = memoryview(data)[_HEADER.size :]
    if len(payload) != stored:
        return "truncated"
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        return "corrupt (checksum mismatch)"
    return None
