"""Read a block index: a synchronous, network-free API over one SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .errors import IndexFormatError
from .format import (
    CODEC_LZ4,
    CODEC_RAW,
    FORMAT_VERSION,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ROOT_INO,
    Blob,
    Chunk,
    ChunkDigest,
    Inode,
    InodeT,
    Span,
)

_INODE_COLS = "ino, mode, uid, gid, size, mtime_ns, nlink, rdev"


def _inode(row: tuple) -> Inode:
    return Inode._make(row)


class IndexReader:
    """Answers filesystem questions about one image from its index.

    Every method is plain and fast (one indexed SQLite query); none touches the network.
    Missing inodes raise ``KeyError``; a malformed index raises ``IndexFormatError``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro&immutable=1"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as exc:
            raise IndexFormatError(f"{self.path}: not a lazyfs index ({exc})") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{self.path}: index format {meta.get('format')!r}, expected {FORMAT_VERSION!r}"
            )
        try:
            self.chunk_size = int(meta["chunk_size"])
        except (KeyError, ValueError) as exc:
            raise IndexFormatError(f"{self.path}: index has no valid chunk_size") from exc
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise IndexFormatError(f"{self.path}: chunk size {self.chunk_size} out of range")
        self.meta = meta
        self._totals: dict[str, int] | None = None
        self._blobs = {
            row[0]: Blob(*row) for row in self._db.execute("SELECT id, digest, size FROM blobs")
        }
        try:
            self.attr(InodeT(ROOT_INO))
        except KeyError as exc:
            raise IndexFormatError(f"{self.path}: index has no root directory") from exc

    def close(self) -> None:
        self._db.close()

    # -- the tree ---------------------------------------------------------------------

    def attr(self, ino: InodeT) -> Inode:
        row = self._db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            raise KeyError(ino)
        return _inode(row)

    def lookup(self, parent: InodeT, name: bytes) -> Inode | None:
        """The inode named ``name`` in directory ``parent``, or None."""
        row = self._db.execute(
            f"SELECT {', '.join('i.' + c.strip() for c in _INODE_COLS.split(','))} "
            "FROM dirents d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.name = ?",
            (parent, name),
        ).fetchone()
        return None if row is None else _inode(row)

    def children(self, ino: InodeT, start: int = 0) -> Iterator[tuple[int, bytes, Inode]]:
        """``(position, name, inode)`` of the entries of directory ``ino`` from ``start``,
        in a stable order; the position of the next entry is ``position + 1``."""
        cur = self._db.execute(
            "SELECT d.pos, d.name, i.ino, i.mode, i.uid, i.gid, i.size, i.mtime_ns, i.nlink, "
            "i.rdev FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? AND d.pos >= ? ORDER BY d.pos",
            (ino, start),
        )
        for row in cur:
            yield row[0], bytes(row[1]), Inode._make(row[2:])

    def path_of(self, ino: InodeT) -> bytes | None:
        """A path of ``ino`` from the root (one of them, for a hard link), for messages;
        None if it is not linked. Slow (dirents are not indexed by inode): use it on
        failures only."""
        parts: list[bytes] = []
        seen = set()
        while ino != ROOT_INO and ino not in seen:
            seen.add(ino)
            row = self._db.execute("SELECT parent, name FROM dirents WHERE ino = ? LIMIT 1",
                                   (ino,)).fetchone()
            if row is None:
                return None
            ino, name = InodeT(row[0]), bytes(row[1])
            parts.append(name)
        return b"/" + b"/".join(reversed(parts))

    def readlink(self, ino: InodeT) -> bytes:
        row = self._db.execute("SELECT target FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None or row[0] is None:
            raise KeyError(ino)
        return bytes(row[0])

    def xattrs(self, ino: InodeT) -> dict[bytes, bytes]:
        return {
            bytes(n): bytes(v)
            for n, v in self._db.execute("SELECT name, value FROM xattrs WHERE ino = ?", (ino,))
        }

    def getxattr(self, ino: InodeT, name: bytes) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name)
        ).fetchone()
        return None if row is None else bytes(row[0])

    # -- contents ---------------------------------------------------------------------

    def _chunk(self, row: tuple) -> Chunk:
        digest, blob_id, offset, stored_size, size, codec = row
        blob = self._blobs.get(blob_id)
        if blob is None or codec not in (CODEC_RAW, CODEC_LZ4) or len(digest) != 32:
            raise IndexFormatError(f"{self.path}: malformed chunk record {bytes(digest).hex()}")
        return Chunk(ChunkDigest(bytes(digest)), blob, offset, stored_size, size, codec)

    def chunks(self, ino: InodeT, offset: int, size: int) -> list[Span]:
        """The spans that make up bytes ``[offset, offset + size)`` of file ``ino``,
        clipped to its size; holes come back with ``chunk=None``."""
        file_size = self.attr(ino).size
        end = min(offset + size, file_size)
        if offset >= end:
            return []
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        stored = {
            row[0]: self._chunk(row[1:])
            for row in self._db.execute(
                "SELECT e.idx, c.digest, c.blob, c.offset, c.stored_size, c.size, c.codec "
                "FROM extents e JOIN chunks c ON c.id = e.chunk "
                "WHERE e.ino = ? AND e.idx BETWEEN ? AND ?",
                (ino, first, last),
            )
        }
        spans = []
        for idx in range(first, last + 1):
            lo, hi = max(offset, idx * cs), min(end, (idx + 1) * cs)
            spans.append(Span(lo, hi - lo, stored.get(idx), lo - idx * cs))
        return spans

    def all_chunks(self) -> Iterator[Chunk]:
        """Every stored chunk once, in blob order (the order a prefetch wants)."""
        cur = self._db.execute(
            "SELECT digest, blob, offset, stored_size, size, codec FROM chunks "
            "ORDER BY blob, offset"
        )
        for row in cur:
            yield self._chunk(row)

    def chunks_of(self, ino: InodeT) -> list[Chunk]:
        """The stored chunks of file ``ino`` in file order."""
        return [
            self._chunk(row)
            for row in self._db.execute(
                "SELECT c.digest, c.blob, c.offset, c.stored_size, c.size, c.codec "
                "FROM extents e JOIN chunks c ON c.id = e.chunk WHERE e.ino = ? ORDER BY e.idx",
                (ino,),
            )
        ]

    def blobs(self) -> list[Blob]:
        return sorted(self._blobs.values(), key=lambda b: b.id)

    def totals(self) -> dict[str, int]:
        """Sizes a person wants to see: inodes, file bytes, chunks, stored bytes. Counted
        once (three scans of the tables: milliseconds for a large image, too much for
        every ``lazyfs status`` and ``statfs``); an index never changes."""
        if self._totals is None:
            self._totals = self._count_totals()
        return dict(self._totals)

    def _count_totals(self) -> dict[str, int]:
        inodes, file_bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM inodes WHERE (mode & 61440) = 32768"
        ).fetchone()
        chunks, stored, raw = self._db.execute(
            "SELECT count(*), coalesce(sum(stored_size), 0), coalesce(sum(size), 0) FROM chunks"
        ).fetchone()
        (all_inodes,) = self._db.execute("SELECT count(*) FROM inodes").fetchone()
        return {
            "inodes": all_inodes,
            "files": inodes,
            "file_bytes": file_bytes,
            "chunks": chunks,
            "chunk_bytes": raw,
            "stored_bytes": stored,
        }

    # -- lookups for learned prefetch (not on the read path) ----------------------------

    def chunk(self, digest: bytes) -> Chunk | None:
        """The stored chunk with this BLAKE3 digest, or None (one indexed query)."""
        row = self._db.execute(
            "SELECT digest, blob, offset, stored_size, size, codec FROM chunks WHERE digest = ?",
            (digest,),
        ).fetchone()
        return None if row is None else self._chunk(row)

    def paths(self, inos: set[int]) -> dict[int, bytes]:
        """A path (``a/b/c``, relative to the root) of each inode in ``inos``. Directory
        entries are indexed by parent, not by inode, so this reads them all once: meant
        for traces and status reports, never for a read."""
        up: dict[int, tuple[int, bytes]] = {}
        for parent, name, ino in self._db.execute("SELECT parent, name, ino FROM dirents"):
            up.setdefault(ino, (parent, bytes(name)))
        out: dict[int, bytes] = {}
        for ino in inos:
            parts: list[bytes] = []
            cur = ino
            while cur != ROOT_INO and cur in up and len(parts) < 4096:
                cur, name = up[cur]
                parts.append(name)
            out[ino] = b"/".join(reversed(parts))
        return out
