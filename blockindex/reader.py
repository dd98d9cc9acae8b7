"""Read a block index: a synchronous, network-free API over one SQLite file.

The index is pinned by its digest, but a hostile image author signs their own: the
reader treats its content as untrusted. Opening checks the schema (exactly the tables
and indexes the writer creates: no views or triggers to run, no statistics to steer the
query planner, and every index the reader's queries need, so that no question a FUSE
handler asks scans a table), the meta entries and every blob digest (they end up in URLs
and cache paths); ``check`` scans every row once for what would break a mount (see its
docstring). Any SQLite error on a corrupt file becomes ``IndexFormatError``, never a
bare ``sqlite3`` exception.
"""

from __future__ import annotations

import collections
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .bloborder import BlobOrder
from .checks import (
    DIRECTORIES,
    INODE_RULES,
    MAX_BLOB_SIZE,
    REACHED_DIRECTORIES,
    ROW_RULES,
    SIDE_ROW_RULES,
    schema_of,
    writer_schema,
)
from .errors import IndexFormatError
from .format import (
    CODEC_GZIP_SPAN,
    CODEC_NAMES,
    CODECS_OF_FORMAT,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ROOT_INO,
    SIDE_FORMAT_VERSION,
    Blob,
    Chunk,
    ChunkDigest,
    Inode,
    InodeT,
    Span,
)
from .gzspan import GzipSpan

_INODE_COLS = "ino, mode, uid, gid, size, mtime_ns, nlink, rdev"
_BLOB_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

_MEMO_FILES = 256
"""Files whose inode and chunk rows a reader keeps in memory (``chunks``): a file read
in 128 KiB requests asks for the same rows eight times per 1 MiB chunk."""
_UNREAD: dict[int, Chunk] = {}
"""The chunk rows of a remembered file whose chunks were not asked for yet."""
_MEMO_CHUNKS = 64
"""Chunk rows of one file remembered whole; a longer file's are asked for each read."""
PAGE_CACHE_KIB = 256
"""SQLite's page cache of a reader's connection. The index is immutable and the kernel's
page cache holds it anyway (a page missed here is a ``pread`` of memory); SQLite's default
of 2 MiB a connection was a whole small index copied into every mount process that
had walked it (the prefetcher's reader and the adapter's, each)."""

def _inode(row: tuple) -> Inode:
    return Inode._make(row)


class IndexReader(BlobOrder):
    """Answers filesystem questions about one image from its index.

    Every method is plain and fast (one indexed SQLite query); none touches the network.
    Missing inodes raise ``KeyError``; a malformed index raises ``IndexFormatError``
    (from any method: a corrupt page can surface at any query). A reader for a mount
    calls ``check`` once first.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro&immutable=1"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise IndexFormatError(f"{self.path}: not a lazyfs index ({exc})") from exc
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        self._q("PRAGMA trusted_schema = OFF")
        self._q(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        self._check_schema()
        meta: dict[Any, Any] = dict(self._q("SELECT key, value FROM meta"))
        if meta.get("format") not in CODECS_OF_FORMAT:
            raise IndexFormatError(
                f"{self.path}: index format {meta.get('format')!r}, expected one of "
                f"{', '.join(map(repr, CODECS_OF_FORMAT))} (a newer lazyfs may read it)"
            )
        self.codecs = CODECS_OF_FORMAT[meta["format"]]
        """The codecs this index's format allows its chunks."""
        if self.side != (meta["format"] == SIDE_FORMAT_VERSION):
            raise IndexFormatError(f"{self.path}: not a lazyfs index (format {meta['format']} "
                                   f"{'without' if not self.side else 'with'} checkpoints)")
        try:
            self.chunk_size = int(meta["chunk_size"])
        except (KeyError, ValueError, TypeError) as exc:
            raise IndexFormatError(f"{self.path}: index has no valid chunk_size") from exc
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE or (
                self.chunk_size & (self.chunk_size - 1)):
            raise IndexFormatError(f"{self.path}: chunk size {self.chunk_size} out of range")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise IndexFormatError(f"{self.path}: a meta entry that is not text")
        self.meta: dict[str, str] = meta
        self._memo: collections.OrderedDict[InodeT, tuple[Inode, dict[int, Chunk] | None]] = \
            collections.OrderedDict()
        """Recently read files: ``(inode, {chunk idx: Chunk})`` (None: too many to keep)."""
        self._totals: dict[str, int] | None = None
        self._blobs: dict[int, Blob] = {}
        for blob_id, digest, size in self._q("SELECT id, digest, size FROM blobs"):
            if not (isinstance(digest, str) and _BLOB_DIGEST.fullmatch(digest)
                    and type(size) is int and 0 <= size <= MAX_BLOB_SIZE):
                raise IndexFormatError(f"{self.path}: malformed blob record {str(digest)[:80]!r}")
            self._blobs[blob_id] = Blob(blob_id, digest, size)
        try:
            root = self.attr(InodeT(ROOT_INO))
        except KeyError as exc:
            raise IndexFormatError(f"{self.path}: index has no root directory") from exc
        if type(root.mode) is not int or root.mode & 0o170000 != 0o040000:
            raise IndexFormatError(f"{self.path}: the root of the index is not a directory")

    def _check_schema(self) -> None:
        """The schema is exactly the writer's, item by item (definitions compared with
        whitespace folded): the tables with their columns and constraints, and the
        indexes the queries rely on (a missing ``dirents_by_name`` makes every lookup
        scan its directory: 40 minutes of one event loop for ``ls -l`` of 200,000
        entries). Nothing else, so no SQL of the file's own runs (views, triggers) and
        no ``sqlite_stat1`` steers the query planner away from an index."""
        have = schema_of(self._q("SELECT type, name, tbl_name, sql FROM sqlite_master"))
        self.side = "checkpoints" in have
        """A side index (format 3): chunks read from an ordinary image's layers."""
        want = writer_schema(self.side)
        problems = [f"no {want[n][0]} {n}" for n in sorted(want.keys() - have.keys())]
        problems += [f"an unexpected {have[n][0]} {n}" for n in sorted(have.keys() - want.keys())]
        problems += [f"{want[n][0]} {n} is not defined as lazyfs writes it"
                     for n in sorted(want.keys() & have.keys()) if want[n] != have[n]]
        if problems:
            raise IndexFormatError(f"{self.path}: not a lazyfs index ({problems[0]})")

    def _q(self, sql: str, args: tuple | dict = ()) -> list[Any]:
        """All rows of one query; IndexFormatError if SQLite finds the file corrupt."""
        try:
            return self._db.execute(sql, args).fetchall()
        except (sqlite3.Error, UnicodeDecodeError) as exc:  # text that is not UTF-8, too
            raise IndexFormatError(f"{self.path}: corrupt index ({exc})") from exc

    def _rows(self, sql: str, args: tuple = ()) -> Iterator[Any]:
        """The rows of one query as they come; IndexFormatError if SQLite finds the file
        corrupt on the way."""
        try:
            yield from self._db.execute(sql, args)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            raise IndexFormatError(f"{self.path}: corrupt index ({exc})") from exc

    def _one(self, sql: str, args: tuple | dict = ()) -> Any:
        rows = self._q(sql, args)
        return rows[0] if rows else None

    def check(self) -> None:
        """Scan the whole index once; IndexFormatError naming the first rule it breaks.

        The rules: every column holds the type the format says; modes are a file type
        lazyfs serves with permission bits, owners and link counts are 32-bit, device
        numbers only on devices; sizes are within the converter's limit and fit the type;
        symlink targets are 1-4095 bytes without NUL; names are 1-255 bytes without '/',
        NUL, and are not '.' or '..', at positions whose successor is an off_t (what
        readdir hands the kernel), once per directory, in directories, of inodes that
        exist; the directories form a tree (each but the root has one name, and all of
        them are reached from the root, so there is no cycle); chunks lie inside their
        blob, are at most one chunk long, and are exactly as long as the part of the file
        each extent covers; codecs are those of the index's format; xattrs have sane names
        and values. SQLite's own check of the file (``integrity_check``: b-trees, and every
        index agreeing with its table, so a lookup by name cannot find what readdir does not
        list) runs first.
        Linear in the size of the index, plus a sort of the directory entries: about 0.7 s
        per 100,000 entries."""
        problems = [row[0] for row in self._q("PRAGMA integrity_check(1)")]
        if problems != ["ok"]:
            raise IndexFormatError(f"{self.path}: corrupt index ({str(problems[0])[:200]})")
        counts = self._one("SELECT " + ", ".join(
            f"coalesce(sum({cond}), 0)" for _, cond in INODE_RULES) + " FROM inodes")
        for (what, _), bad in zip(INODE_RULES, counts, strict=True):
            if bad:
                raise IndexFormatError(f"{self.path}: hostile or corrupt index: {what}")
        self._check_codecs()
        for what, sql in ROW_RULES + (SIDE_ROW_RULES if self.side else []):
            (bad,) = self._one(sql, {"cs": self.chunk_size} if ":cs" in sql else ())
            if bad:
                raise IndexFormatError(f"{self.path}: hostile or corrupt index: {what}")
        (dirs,) = self._one(DIRECTORIES)
        (reached,) = self._one(REACHED_DIRECTORIES)
        if reached != dirs:
            raise IndexFormatError(
                f"{self.path}: hostile or corrupt index: {dirs - reached} directories are not "
                "reached from the root (a cycle)")

    def _check_codecs(self) -> None:
        """Every chunk's codec is one of its index format's: one a lazyfs writes in no
        format names itself, one of a later format in a format-1 index is a forgery."""
        allowed = ", ".join(str(c) for c in sorted(self.codecs))
        row = self._one(f"SELECT codec FROM chunks WHERE typeof(codec) != 'integer' "
                        f"OR codec NOT IN ({allowed}) LIMIT 1")
        if row is not None:
            names = ", ".join(f"{c} {CODEC_NAMES[c]}" for c in sorted(self.codecs))
            raise IndexFormatError(
                f"{self.path}: hostile or corrupt index: a chunk compressed with codec "
                f"{str(row[0])[:20]}, which index format {self.meta['format']} does not have "
                f"(its codecs: {names})")

    def close(self) -> None:
        self._db.close()

    # -- the tree ---------------------------------------------------------------------

    def attr(self, ino: InodeT) -> Inode:
        """The inode ``ino`` (remembered, as its chunks are, for the files asked of last:
        a file is opened, then read)."""
        memo = self._memo.get(ino)
        if memo is not None:
            return memo[0]
        row = self._one(f"SELECT {_INODE_COLS} FROM inodes WHERE ino = ?", (ino,))
        if row is None:
            raise KeyError(ino)
        node = _inode(row)
        self._keep(ino, (node, _UNREAD))
        return node

    def lookup(self, parent: InodeT, name: bytes) -> Inode | None:
        """The inode named ``name`` in directory ``parent``, or None."""
        row = self._one(
            f"SELECT {', '.join('i.' + c.strip() for c in _INODE_COLS.split(','))} "
            "FROM dirents d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.name = ?",
            (parent, name),
        )
        return None if row is None else _inode(row)

    def children(self, ino: InodeT, start: int = 0) -> Iterator[tuple[int, bytes, Inode]]:
        """``(position, name, inode)`` of the entries of directory ``ino`` from ``start``,
        in a stable order; the position of the next entry is ``position + 1``."""
        for row in self._rows(
            "SELECT d.pos, d.name, i.ino, i.mode, i.uid, i.gid, i.size, i.mtime_ns, i.nlink, "
            "i.rdev FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? AND d.pos >= ? ORDER BY d.pos",
            (ino, start),
        ):
            yield row[0], bytes(row[1]), Inode._make(row[2:])

    def path_of(self, ino: InodeT) -> bytes | None:
        """A path of ``ino`` from the root (one of them, for a hard link), for messages;
        None if it is not linked. Slow (dirents are not indexed by inode): use it on
        failures only."""
        parts: list[bytes] = []
        seen = set()
        while ino != ROOT_INO and ino not in seen:
            seen.add(ino)
            row = self._one("SELECT parent, name FROM dirents WHERE ino = ? LIMIT 1", (ino,))
            if row is None:
                return None
            ino, name = InodeT(row[0]), bytes(row[1])
            parts.append(name)
        return b"/" + b"/".join(reversed(parts))

    def readlink(self, ino: InodeT) -> bytes:
        row = self._one("SELECT target FROM inodes WHERE ino = ?", (ino,))
        if row is None or row[0] is None:
            raise KeyError(ino)
        return bytes(row[0])

    def xattrs(self, ino: InodeT) -> dict[bytes, bytes]:
        return {
            bytes(n): bytes(v)
            for n, v in self._q("SELECT name, value FROM xattrs WHERE ino = ?", (ino,))
        }

    def getxattr(self, ino: InodeT, name: bytes) -> bytes | None:
        row = self._one("SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name))
        return None if row is None else bytes(row[0])

    # -- contents ---------------------------------------------------------------------

    def _chunk(self, row: tuple) -> Chunk:
        digest, blob_id, offset, stored_size, size, codec = row
        blob = self._blobs.get(blob_id)
        if (blob is None or codec not in self.codecs or not isinstance(digest, bytes)
                or len(digest) != 32 or not all(type(v) is int for v in (offset, stored_size, size, codec))
                or offset < 0 or stored_size < 1
                or (codec != CODEC_GZIP_SPAN and offset + stored_size > blob.size)
                or not 1 <= size <= self.chunk_size):
            raise IndexFormatError(f"{self.path}: malformed chunk record {str(digest)[:80]}")
        if codec == CODEC_GZIP_SPAN:
            return self._gzip_chunk(ChunkDigest(bytes(digest)), blob, offset, size)
        return Chunk(ChunkDigest(bytes(digest)), blob, offset, stored_size, size, codec)

    def _gzip_chunk(self, digest: ChunkDigest, blob: Blob, uoffset: int, size: int) -> Chunk:
        """A chunk of a gzip layer of a side index: its stored bytes are the compressed
        range from the last checkpoint at or before it to the first at or past its end
        (the end of the blob when there is none)."""
        start = self._one("SELECT uoffset, coffset, bits, window FROM checkpoints "
                          "WHERE blob = ? AND uoffset <= ? ORDER BY uoffset DESC LIMIT 1",
                          (blob.id, uoffset))
        after = self._one("SELECT coffset FROM checkpoints WHERE blob = ? AND uoffset >= ? "
                          "ORDER BY uoffset LIMIT 1", (blob.id, uoffset + size))
        if start is None or not all(type(v) is int for v in start[:3]) or not isinstance(start[3], bytes):
            raise IndexFormatError(f"{self.path}: no checkpoint for chunk {digest.hex()[:80]}")
        point, coffset, bits, window = start
        end = blob.size if after is None else after[0]
        # zran's bits count back from coffset: the block starts ``bits`` high bits into the
        # byte before it; GzipSpan counts from the first byte fetched.
        first = coffset - 1 if bits else coffset
        if type(end) is not int or not 0 <= first < end <= blob.size or not 0 <= bits <= 7:
            raise IndexFormatError(f"{self.path}: malformed checkpoint for chunk {digest.hex()[:80]}")
        span = GzipSpan(bits=(8 - bits) % 8, skip=uoffset - point, window=window, point=point)
        return Chunk(digest, blob, first, end - first, size, CODEC_GZIP_SPAN, span)

    def chunks(self, ino: InodeT, offset: int, size: int) -> list[Span]:
        """The spans that make up bytes ``[offset, offset + size)`` of file ``ino``,
        clipped to its size; holes come back with ``chunk=None``.

        The rows of the last ``_MEMO_FILES`` files read are kept (an index never
        changes): a read of a file read before costs no query."""
        memo = self._memo.get(ino)
        if memo is None or memo[1] is _UNREAD:
            memo = self._remember(ino)
        else:
            try:
                self._memo.move_to_end(ino)
            except KeyError:  # dropped meanwhile by a reader in another thread
                pass
        file_size, rows = memo[0].size, memo[1]
        end = min(offset + size, file_size)
        if offset >= end:
            return []
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        stored = rows if rows is not None else self._extents(ino, first, last)
        spans = []
        for idx in range(first, last + 1):
            lo, hi = max(offset, idx * cs), min(end, (idx + 1) * cs)
            spans.append(Span(lo, hi - lo, stored.get(idx), lo - idx * cs))
        return spans

    def _remember(self, ino: InodeT) -> tuple[Inode, dict[int, Chunk] | None]:
        node = self.attr(ino)
        count = -(-node.size // self.chunk_size)
        memo = (node, self._extents(ino, 0, count - 1) if count <= _MEMO_CHUNKS else None)
        self._keep(ino, memo)
        return memo

    def _keep(self, ino: InodeT, memo: tuple[Inode, dict[int, Chunk] | None]) -> None:
        self._memo[ino] = memo
        while len(self._memo) > _MEMO_FILES:
            try:
                self._memo.popitem(last=False)
            except KeyError:
                break

    def _extents(self, ino: InodeT, first: int, last: int) -> dict[int, Chunk]:
        return {
            row[0]: self._chunk(row[1:])
            for row in self._q(
                "SELECT e.idx, c.digest, c.blob, c.offset, c.stored_size, c.size, c.codec "
                "FROM extents e JOIN chunks c ON c.id = e.chunk "
                "WHERE e.ino = ? AND e.idx BETWEEN ? AND ?",
                (ino, first, last),
            )
        }

    def all_chunks(self) -> Iterator[Chunk]:
        """Every stored chunk once, in blob order (the order a prefetch wants)."""
        for row in self._rows(
            "SELECT digest, blob, offset, stored_size, size, codec FROM chunks "
            "ORDER BY blob, offset"
        ):
            yield self._chunk(row)

    def chunks_of(self, ino: InodeT) -> list[Chunk]:
        """The stored chunks of file ``ino`` in file order."""
        return [
            self._chunk(row)
            for row in self._q(
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
        inodes, file_bytes = self._one(
            "SELECT count(*), coalesce(sum(size), 0) FROM inodes WHERE (mode & 61440) = 32768")
        chunks, stored, raw = self._one(
            "SELECT count(*), coalesce(sum(stored_size), 0), coalesce(sum(size), 0) FROM chunks")
        (all_inodes,) = self._one("SELECT count(*) FROM inodes")
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
        row = self._one(
            "SELECT digest, blob, offset, stored_size, size, codec FROM chunks WHERE digest = ?",
            (digest,),
        )
        return None if row is None else self._chunk(row)

    def paths(self, inos: set[int]) -> dict[int, bytes]:
        """A path (``a/b/c``, relative to the root) of each inode in ``inos``. Directory
        entries are indexed by parent, not by inode, so this reads them all once: meant
        for traces and status reports, never for a read."""
        up: dict[int, tuple[int, bytes]] = {}
        for parent, name, ino in self._q("SELECT parent, name, ino FROM dirents"):
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
