"""What an index must be before a mount uses it: the rules ``IndexReader`` checks.

The writer's exact schema (``writer_schema``: tables, columns, constraints and the indexes
the reader's queries need), and the row rules ``IndexReader.check`` runs in one scan: each
query counts the rows that break one rule of the format. Kept apart from the reader, whose
job is answering questions; the rules are the format's promise to it.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

from .format import CODEC_GZIP_MEMBER, CODEC_GZIP_SPAN, SCHEMA, SIDE_SCHEMA

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
CHECK_RULES = "3"
INODE_RULES: list[tuple[str, str]] = [  # one scan of inodes answers all four
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
ROW_RULES: list[tuple[str, str]] = [
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
     # a gzip span's offset is in the layer's uncompressed tar (its checkpoints, below)
     f"OR (c.codec != {CODEC_GZIP_SPAN} AND c.offset + c.stored_size > b.size) "
     f"OR (c.codec IN (0, {CODEC_GZIP_SPAN}) AND c.stored_size != c.size) "
     # an eStargz member's range runs to the next member its TOC names: the tar headers
     # between them come along (in its blob, as every chunk's range is)
     f"OR (c.codec != {CODEC_GZIP_MEMBER} AND c.stored_size > c.size + c.size / 255 + 16)"),
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


SIDE_ROW_RULES: list[tuple[str, str]] = [
    ("a checkpoint that is malformed or lies outside its blob",
     "SELECT count(*) FROM checkpoints k LEFT JOIN blobs b ON b.id = k.blob "
     "WHERE b.id IS NULL OR typeof(k.uoffset) != 'integer' OR typeof(k.coffset) != 'integer' "
     "OR typeof(k.bits) != 'integer' OR typeof(k.window) != 'blob' "
     f"OR k.uoffset < 0 OR k.uoffset > {MAX_FILE_SIZE * 64} OR k.coffset < 0 "
     "OR k.coffset >= b.size OR k.bits NOT BETWEEN 0 AND 7 OR length(k.window) > 65536"),
    ("checkpoints of a blob whose compressed offsets do not grow with their uncompressed ones",
     "SELECT count(*) FROM checkpoints k JOIN checkpoints n ON n.blob = k.blob "
     "AND n.uoffset = (SELECT min(uoffset) FROM checkpoints WHERE blob = k.blob "
     "AND uoffset > k.uoffset) WHERE n.coffset * 8 + n.bits <= k.coffset * 8 + k.bits"),
    ("a gzip span chunk with no checkpoint at or before it in its blob",
     f"SELECT count(*) FROM chunks c WHERE c.codec = {CODEC_GZIP_SPAN} AND NOT EXISTS "
     "(SELECT 1 FROM checkpoints k WHERE k.blob = c.blob AND k.uoffset <= c.offset)"),
]
"""The rules of what only a side index has: its checkpoints, and the chunks read by them."""


def schema_of(rows: list[Any]) -> dict[str, tuple[str, str, str]]:
    """``sqlite_master`` rows as ``{name: (type, table, definition)}``, whitespace folded."""
    return {str(name): (str(kind), str(table), " ".join(str(sql).split()))
            for kind, name, table, sql in rows}


@functools.cache
def writer_schema(side: bool = False) -> dict[str, tuple[str, str, str]]:
    """What ``IndexWriter`` creates (for a side index, ``side``), read back from SQLite
    itself (so the unnamed indexes of UNIQUE constraints are there as SQLite names them)."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA + (SIDE_SCHEMA if side else ""))
        return schema_of(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
                          .fetchall())
    finally:
        db.close()


DIRECTORIES = f"SELECT count(*) FROM inodes WHERE {_S} = {_DIR}"
"""How many directories the index has."""
REACHED_DIRECTORIES = (
    "WITH RECURSIVE r(ino) AS (SELECT 1 UNION SELECT d.ino FROM dirents d "
    f"JOIN r ON d.parent = r.ino JOIN inodes i ON i.ino = d.ino WHERE {_S} = {_DIR}) "
    "SELECT count(*) FROM r")
"""How many directories are reached from the root: fewer than ``DIRECTORIES`` is a cycle."""

