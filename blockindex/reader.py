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

import functools
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import IndexFormatError
from .format import (
    CODEC_NAMES,
    CODECS_OF_FORMAT,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ROOT_INO,
    SCHEMA,
    Blob,
    Chunk,
    ChunkDigest,
    Inode,
    InodeT,
    Span,
)

_INODE_COLS = "ino, mode, uid, gid, size, mtime_ns, nlink, rdev"
_BLOB_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_FILE_SIZE = 1 << 40  # as the converter (ingest.MAX_FILE_SIZE)
MAX_BLOB_SIZE = 1 << 42

# What ``check`` asks: each query counts the rows that break one rule of the format.
_S = "(mode & 61440)"  # the file type bits (S_IFMT)
_DIR, _REG, _LNK, _CHR, _BLK, _FIFO = 16384, 32768, 40960, 8192, 24576, 4096
_U32 = (1 << 32) - 1
# The kernel resumes a listing at the position readdir handed it, ``pos + 1``, an off_t:
# a larger one ends pyfuse3.readdir_reply in OverflowError.
MAX_DIRENT_POS = (1 << 63) - 2
# Two integer columns have no upper bound in the rules below, since any 64-bit value fits
# where they go: ``ino`` (a fuse_ino_t, uint64; >= 1 as the rowid entries name) and
# ``mtime_ns`` (EntryAttributes splits it into a time_t and nanoseconds).
# Check rules change with the reader: a node that checked an index under older rules
# checks it again (cache.images keeps the version a check passed under).
CHECK_RULES = "2"
_INODE_RULES: list[tuple[str, str]] = [  # one scan of inodes answers all four
    ("an inode column that is not an integer",
     "typeof(ino) != 'integer' OR typeof(mode) != 'integer' OR typeof(uid) != 'integer' "
     "OR typeof(gid) != 'integer' OR typeof(size) != 'integer' "
     "OR typeof(mtime_ns) != 'integer' OR typeof(nlink) != 'integer' "
     "OR typeof(rdev) != 'integer'"),
    ("an inode with an impossible mode, owner, link count or device number",
     f"ino < 1 OR mode < 0 OR mode > 65535 "
     f"OR {_S} NOT IN ({_DIR}, {_REG}, {_LNK}, {_CHR}, {_BLK}, {_FIFO}) "
     f"OR uid < 0 OR uid > {_U32} OR gid < 0 OR gid > {_U32} OR nlink < 1 OR nlink > {_U32} "
     f"OR rdev < 0 OR rdev > {_U32} OR (rdev != 0 AND {_S} NOT IN ({_CHR}, {_BLK}))"),
    ("an inode whose size is negative, absurd, or does not fit its type",
     f"size < 0 OR size > {MAX_FILE_SIZE} OR ({_S} NOT IN ({_REG}, {_LNK}) AND size != 0)"),
    ("a symlink target that is missing, empty, too long or holds a NUL, or a target on "
     "something that is not a symlink",
     f"({_S} = {_LNK} AND (typeof(target) != 'blob' "
     f"OR length(target) NOT BETWEEN 1 AND 4095 OR size != length(target) "
     f"OR instr(target, x'00') > 0)) OR ({_S} != {_LNK} AND target IS NOT NULL)"),
]
_RULES: list[tuple[str, str]] = [
    ("a root inode that is not a directory",
     f"SELECT count(*) FROM inodes WHERE ino = 1 AND {_S} != {_DIR}"),
    ("a directory entry with a bad name (empty, '.', '..', over 255 bytes, holding '/' or "
     "NUL) or a bad position",
     "SELECT count(*) FROM dirents WHERE typeof(name) != 'blob' OR length(name) NOT BETWEEN 1 "
     "AND 255 OR name IN (x'2e', x'2e2e') OR instr(name, x'2f') > 0 OR instr(name, x'00') > 0 "
     f"OR typeof(pos) != 'integer' OR pos < 0 OR pos > {MAX_DIRENT_POS} "
     "OR typeof(parent) != 'integer' "
     "OR typeof(ino) != 'integer'"),
    ("a directory entry in something that is not a directory, or naming a missing inode",
     f"SELECT count(*) FROM dirents d LEFT JOIN inodes p ON p.ino = d.parent "
     f"LEFT JOIN inodes i ON i.ino = d.ino "
     f"WHERE p.ino IS NULL OR (p.mode & 61440) != {_DIR} OR i.ino IS NULL"),
    ("a name listed twice in one directory",
     "SELECT count(*) FROM (SELECT 1 FROM dirents GROUP BY parent, name HAVING count(*) > 1)"),
    ("a directory with more than one name, or a name for the root (a hard link to a "
     "directory, or a cycle)",
     f"SELECT count(*) FROM (SELECT 1 FROM dirents d JOIN inodes i ON i.ino = d.ino "
     f"WHERE (i.mode & 61440) = {_DIR} GROUP BY d.ino HAVING count(*) > 1 OR d.ino = 1)"),
    ("a blob row that is malformed",
     "SELECT count(*) FROM blobs WHERE typeof(id) != 'integer' OR typeof(size) != 'integer' "
     f"OR size < 0 OR size > {MAX_BLOB_SIZE} OR typeof(digest) != 'text'"),
    ("a chunk record that is malformed or lies outside its blob",
     "SELECT count(*) FROM chunks c LEFT JOIN blobs b ON b.id = c.blob "
     "WHERE b.id IS NULL OR typeof(c.digest) != 'blob' OR length(c.digest) != 32 "
     "OR typeof(c.offset) != 'integer' OR typeof(c.stored_size) != 'integer' "
     "OR typeof(c.size) != 'integer' "
     "OR c.offset < 0 OR c.stored_size < 1 OR c.size < 1 OR c.size > :cs "
     "OR c.offset + c.stored_size > b.size OR (c.codec = 0 AND c.stored_size != c.size) "
     "OR c.stored_size > c.size + c.size / 255 + 16"),
    ("a file extent that is malformed, outside its file, or whose chunk has the wrong size",
     f"SELECT count(*) FROM extents e LEFT JOIN inodes i ON i.ino = e.ino "
     f"LEFT JOIN chunks c ON c.id = e.chunk "
     f"WHERE i.ino IS NULL OR (i.mode & 61440) != {_REG} OR c.id IS NULL "
     f"OR typeof(e.idx) != 'integer' OR e.idx < 0 OR e.idx * :cs >= i.size "
     f"OR c.size != min(:cs, i.size - e.idx * :cs)"),
    ("an extended attribute that is malformed or of a missing inode",
     "SELECT count(*) FROM xattrs x LEFT JOIN inodes i ON i.ino = x.ino WHERE i.ino IS NULL "
     "OR typeof(x.name) != 'blob' OR length(x.name) NOT BETWEEN 1 AND 255 "
     "OR instr(x.name, x'00') > 0 OR typeof(x.value) != 'blob' OR length(x.value) > 65536"),
]


def _schema_of(rows: list[Any]) -> dict[str, tuple[str, str, str]]:
    """``sqlite_master`` rows as ``{name: (type, table, definition)}``, whitespace folded."""
    return {str(name): (str(kind), str(table), " ".join(str(sql).split()))
            for kind, name, table, sql in rows}


@functools.cache
def _writer_schema() -> dict[str, tuple[str, str, str]]:
    """What ``IndexWriter`` creates, read back from SQLite itself (so the unnamed indexes
    of UNIQUE constraints are there as SQLite names them)."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return _schema_of(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
                          .fetchall())
    finally:
        db.close()


def _inode(row: tuple) -> Inode:
    return Inode._make(row)


class IndexReader:
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
        self._check_schema()
        meta: dict[Any, Any] = dict(self._q("SELECT key, value FROM meta"))
        if meta.get("format") not in CODECS_OF_FORMAT:
            raise IndexFormatError(
                f"{self.path}: index format {meta.get('format')!r}, expected one of "
                f"{', '.join(map(repr, CODECS_OF_FORMAT))} (a newer lazyfs may read it)"
            )
        self.codecs = CODECS_OF_FORMAT[meta["format"]]
        """The codecs this index's format allows its chunks."""
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
        have = _schema_of(self._q("SELECT type, name, tbl_name, sql FROM sqlite_master"))
        want = _writer_schema()
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
            f"coalesce(sum({cond}), 0)" for _, cond in _INODE_RULES) + " FROM inodes")
        for (what, _), bad in zip(_INODE_RULES, counts, strict=True):
            if bad:
                raise IndexFormatError(f"{self.path}: hostile or corrupt index: {what}")
        self._check_codecs()
        for what, sql in _RULES:
            (bad,) = self._one(sql, {"cs": self.chunk_size} if ":cs" in sql else ())
            if bad:
                raise IndexFormatError(f"{self.path}: hostile or corrupt index: {what}")
        (dirs,) = self._one(f"SELECT count(*) FROM inodes WHERE {_S} = {_DIR}")
        (reached,) = self._one(
            "WITH RECURSIVE r(ino) AS (SELECT 1 UNION SELECT d.ino FROM dirents d "
            f"JOIN r ON d.parent = r.ino JOIN inodes i ON i.ino = d.ino WHERE {_S} = {_DIR}) "
            "SELECT count(*) FROM r")
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
        row = self._one(f"SELECT {_INODE_COLS} FROM inodes WHERE ino = ?", (ino,))
        if row is None:
            raise KeyError(ino)
        return _inode(row)

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
                or offset < 0 or stored_size < 1 or offset + stored_size > blob.size
                or not 1 <= size <= self.chunk_size):
            raise IndexFormatError(f"{self.path}: malformed chunk record {str(digest)[:80]}")
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
            for row in self._q(
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

    def chunks_after(self, chunk: Chunk, nbytes: int) -> list[Chunk]:
        """The chunks of ``chunk``'s blob that follow it, in blob order, as far as they lie
        within ``nbytes`` bytes of its end (what one request may fetch along with it).
        The converter numbers chunks in blob order, so this walks the chunk ids after
        ``chunk``'s and stops at the first that is of another blob, overlaps the one
        before it, or ends past the limit (an index out of order only finds fewer)."""
        end = chunk.offset + chunk.stored_size
        limit = end + nbytes
        out: list[Chunk] = []
        if nbytes <= 0:
            return out
        for row in self._rows(
            "SELECT digest, blob, offset, stored_size, size, codec FROM chunks "
            "WHERE id > (SELECT id FROM chunks WHERE digest = ?) ORDER BY id LIMIT ?",
            (chunk.digest, nbytes),
        ):
            c = self._chunk(row)
            if c.blob.id != chunk.blob.id or c.offset < end or c.offset + c.stored_size > limit:
                break
            out.append(c)
            end = c.offset + c.stored_size
        return out

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
