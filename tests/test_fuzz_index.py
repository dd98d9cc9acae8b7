"""Property and fuzz tests of the index reader with hostile indexes.

A valid index is mutated: bytes flipped, any column of any row set to a hostile value
(negative, huge, text where an integer belongs, names with '/', NUL or '..'), rows added
that make directory cycles or hard-linked directories, tables dropped or replaced by
views, triggers added, the format version changed. Opening it, ``check`` and walking it
(attr, lookup, children, readlink, xattrs, chunks, all_chunks, totals, paths) either work
or raise ``IndexFormatError``; never another exception, never a hang. And whatever
``check`` accepts walks as a tree whose every answer has the types and ranges the FUSE
adapter hands the kernel (its EntryAttributes build, the next readdir position fits).
Opening demands the writer's schema exactly, so every question a handler asks is
answered from an index: the query plans of those questions are checked here too.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import stat
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from blockindex.convert import convert
from blockindex.errors import IndexFormatError
from blockindex.format import ROOT_INO, InodeT
from blockindex.reader import IndexReader
from lazyfs.fs import entry_attributes

from .imagekit import d, entry, make_tar
from .test_fuzz_tar import SETTINGS, no_hang

CS = 4096
RANDOM = bytes((i * 7919 + 13) % 251 for i in range(3 * CS + 5))


@pytest.fixture(scope="module")
def good_index(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("good")
    tar = make_tar([
        d("etc"), entry("etc/f", RANDOM, pax={"SCHILY.xattr.user.k": "v"}),
        entry("etc/hole", bytes(2 * CS) + b"end"),
        entry("etc/s", type=tarfile.SYMTYPE, linkname="/etc/f"),
        entry("etc/h", type=tarfile.LNKTYPE, linkname="etc/f"),
        d("dev"), entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
        entry("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
        entry("fifo", type=tarfile.FIFOTYPE), d("a/b/c"), entry("a/b/c/deep", b"deep"),
    ])
    (tmp / "l.tar").write_bytes(tar)
    res = convert(f"tar:{tmp / 'l.tar'}", f"oci:{tmp / 'out'}", chunk_size=CS)
    path = tmp / "index.sqlite"
    shutil.copy(tmp / "out" / "blobs" / "sha256" / res.index_digest.removeprefix("sha256:"), path)
    return path


def explore(path: Path) -> str:
    """Open, check and walk an index as a mount would; 'refused' or 'accepted'.

    Raises whatever the reader raises other than IndexFormatError, and AssertionError
    when an index that passed ``check`` answers something the kernel must never get."""
    try:
        r = IndexReader(path)
    except IndexFormatError:
        return "refused"
    try:
        r.check()
    except IndexFormatError:
        r.close()
        return "refused"
    try:
        _walk_checked(r)
    finally:
        r.close()
    return "accepted"


def _walk_checked(r: IndexReader) -> None:
    inodes = r.totals()["inodes"]
    seen: set[int] = set()
    todo = [ROOT_INO]
    while todo:
        ino = todo.pop()
        assert ino not in seen, f"directory {ino} reached twice: not a tree"
        seen.add(ino)
        assert len(seen) <= inodes
        for pos, name, node in r.children(InodeT(ino)):
            assert type(pos) is int and 0 <= pos and pos + 1 < 1 << 63  # readdir's off_t
            entry_attributes(node)  # what the kernel is told: every value fits its C type
            assert 1 <= len(name) <= 255 and b"/" not in name and b"\0" not in name
            assert name not in (b".", b"..")
            assert all(type(v) is int for v in node)
            assert 0 <= node.uid < 1 << 32 and 0 <= node.gid < 1 << 32 and node.nlink >= 1
            assert 0 <= node.size <= 1 << 40 and 0 <= node.rdev < 1 << 32
            assert r.lookup(InodeT(ino), name) is not None
            assert r.attr(node.ino) == node
            r.xattrs(node.ino)
            kind = stat.S_IFMT(node.mode)
            if kind == stat.S_IFDIR:
                todo.append(node.ino)
            elif kind == stat.S_IFLNK:
                target = r.readlink(node.ino)
                assert 1 <= len(target) <= 4095 and b"\0" not in target
            elif kind == stat.S_IFREG:
                for off in (0, max(node.size - 1, 0), node.size // 2):
                    covered = 0
                    for span in r.chunks(node.ino, off, 2 * CS):
                        assert span.file_offset == off + covered
                        covered += span.length
                        c = span.chunk
                        if c is not None:
                            assert 0 <= span.chunk_offset < c.size <= r.chunk_size
                            assert span.chunk_offset + span.length <= c.size
                            assert c.offset + c.stored_size <= c.blob.size
                            end = c.offset + c.stored_size
                            for n in r.chunks_after(c, 4 * CS):  # what a miss fetches along
                                assert n.blob == c.blob and end <= n.offset
                                end = n.offset + n.stored_size
                                assert end <= c.offset + c.stored_size + 4 * CS
                    assert covered == max(0, min(2 * CS, node.size - off))
                r.chunks_of(node.ino)
    for c in r.all_chunks():
        assert len(c.digest) == 32 and c.blob.digest.startswith("sha256:")
    r.paths(set(range(1, inodes + 1)))
    for ino in range(1, inodes + 2):
        r.path_of(InodeT(ino))


def test_the_good_index_is_accepted(good_index):
    assert explore(good_index) == "accepted"


# -- byte flips ---------------------------------------------------------------------------


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_flipped_bytes_are_refused_or_walk_cleanly(good_index, tmp_path_factory, flips):
    data = bytearray(good_index.read_bytes())
    for pos, value in flips:
        data[pos % len(data)] = value
    path = tmp_path_factory.mktemp("flip") / "i.sqlite"
    path.write_bytes(data)
    with no_hang():
        event(explore(path))


# -- hostile rows ---------------------------------------------------------------------------

KEYS = {"meta": "key", "inodes": "ino", "dirents": "parent, pos", "xattrs": "ino, name",
        "blobs": "id", "chunks": "id", "extents": "ino, idx"}
COLUMNS = {
    "meta": ["value"], "inodes": ["ino", "mode", "uid", "gid", "size", "mtime_ns", "nlink",
                                  "rdev", "target"],
    "dirents": ["parent", "pos", "name", "ino"], "xattrs": ["ino", "name", "value"],
    "blobs": ["id", "digest", "size"],
    "chunks": ["digest", "blob", "offset", "stored_size", "size", "codec"],
    "extents": ["ino", "idx", "chunk"],
}
VALUES = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 7, 255, CS, CS + 1, 1 << 31, 1 << 32, 1 << 40, (1 << 63) - 1,
                     -(1 << 63), 0o040755, 0o100644, 0o120777, 0o140777, 0o170000, 0o020644]),
    st.sampled_from([b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256, b"\0" * 32, b"ok",
                     "text", "sha256:" + "0" * 64, "sha256:../../../etc/passwd", "1", "2",
                     "../x", None, 1.5]),
    st.integers(-(1 << 63), (1 << 63) - 1), st.binary(max_size=40),
)


@st.composite
def row_edits(draw):
    table = draw(st.sampled_from(sorted(COLUMNS)))
    return ("set", table, draw(st.sampled_from(COLUMNS[table])),
            draw(st.integers(0, 20)), draw(VALUES))


STRUCTURAL = st.sampled_from([
    ("sql", "INSERT INTO dirents VALUES (3, 99, x'6c6f6f70', 1)"),  # the root inside a dir
    ("sql", "INSERT INTO dirents VALUES (1, 99, x'6c6f6f70', 2)"),  # a dir with two names
    ("cycle",),
    ("sql", "DELETE FROM dirents WHERE ino = 2"),
    ("sql", "DELETE FROM inodes WHERE ino = 1"),
    ("sql", "DELETE FROM blobs"),
    ("sql", "UPDATE meta SET value = '3' WHERE key = 'format'"),
    ("sql", "UPDATE meta SET value = 'x' WHERE key = 'chunk_size'"),
    ("sql", "UPDATE meta SET value = '3000' WHERE key = 'chunk_size'"),
    ("sql", "DELETE FROM meta WHERE key = 'chunk_size'"),
    ("sql", "INSERT OR REPLACE INTO meta VALUES ('prefetch_files', '[[\"x\"]]')"),
    ("sql", "DROP TABLE extents"),
    ("sql", "DROP TABLE xattrs"),
    ("sql", "ALTER TABLE chunks RENAME TO old_chunks"),
    ("sql", "ALTER TABLE inodes DROP COLUMN target"),
    ("view",),
    ("sql", "CREATE TRIGGER t AFTER INSERT ON meta BEGIN SELECT 1; END"),
    ("sql", "DROP INDEX dirents_by_name"),
])


def apply_edit(db: sqlite3.Connection, edit: tuple) -> None:
    if edit[0] == "sql":
        db.execute(edit[1])
    elif edit[0] == "script":
        db.executescript(edit[1])
    elif edit[0] == "cycle":  # a directory made its own grandparent, away from the root
        row = db.execute("SELECT d.ino, d.parent FROM dirents d JOIN inodes i ON i.ino = d.ino "
                         "WHERE (i.mode & 61440) = 16384 AND d.parent != 1 LIMIT 1").fetchone()
        if row:
            db.execute("UPDATE dirents SET parent = ?, pos = pos + 1000 WHERE ino = ?",
                       (row[0], row[1]))
    elif edit[0] == "view":  # an endless view where a table belongs
        db.execute("DROP TABLE dirents")
        db.execute("CREATE VIEW dirents AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL "
                   "SELECT x + 1 FROM n) SELECT x AS parent, x AS pos, x'61' AS name, "
                   "x AS ino FROM n")
    else:
        _, table, column, nth, value = edit
        key = KEYS[table]
        db.execute(f"UPDATE OR IGNORE {table} SET {column} = ? WHERE ({key}) IN "
                   f"(SELECT {key} FROM {table} LIMIT 1 OFFSET ?)", (value, nth))


@SETTINGS
@given(edits=st.lists(st.one_of(row_edits(), STRUCTURAL), min_size=1, max_size=4))
def test_hostile_rows_are_refused_or_walk_cleanly(good_index, tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("rows") / "i.sqlite"
    shutil.copy(good_index, path)
    db = sqlite3.connect(path)
    for e in edits:
        # An edit after the endless view would read it forever: give each one a deadline.
        deadline = time.monotonic() + 10
        db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)  # noqa: B023
        try:
            apply_edit(db, e)
        except sqlite3.Error:  # the edit does not apply to what earlier ones left
            pass
    db.set_progress_handler(None, 0)
    db.commit()
    db.close()
    with no_hang():
        event(explore(path))


@pytest.mark.parametrize("edit", [
    ("set", "inodes", "size", 0, -1),
    ("set", "inodes", "mode", 0, "text"),
    ("set", "inodes", "uid", 2, 1 << 40),
    ("set", "dirents", "name", 0, b"a/b"),
    ("set", "dirents", "name", 0, b".."),
    ("set", "dirents", "name", 1, b"a\0b"),
    ("set", "dirents", "pos", 0, (1 << 63) - 1),
    ("set", "chunks", "offset", 0, 1 << 40),
    ("set", "chunks", "size", 0, CS + 1),
    ("set", "chunks", "codec", 0, 7),
    ("set", "blobs", "digest", 0, "sha256:../../../etc/passwd"),
    ("set", "extents", "idx", 0, 1 << 30),
    ("set", "meta", "value", 0, "2"),
    ("sql", "INSERT INTO dirents VALUES (1, 99, x'6c6f6f70', 1)"),
    ("sql", "INSERT INTO dirents VALUES (1, 99, x'6c6f6f70', 2)"),
    ("cycle",),
    ("view",),
    ("sql", "DROP TABLE extents"),
    ("sql", "CREATE TRIGGER t AFTER INSERT ON meta BEGIN SELECT 1; END"),
])
def test_each_hostile_kind_is_refused_with_a_clear_error(good_index, tmp_path, edit):
    path = tmp_path / "i.sqlite"
    shutil.copy(good_index, path)
    db = sqlite3.connect(path)
    apply_edit(db, edit)
    db.commit()
    assert db.total_changes > 0 or edit[0] in ("view", "sql")
    db.close()
    with no_hang(), pytest.raises(IndexFormatError, match=str(path)) as info:
        r = IndexReader(path)
        r.check()
    assert "\n" not in str(info.value)


def test_a_position_whose_successor_is_an_off_t_is_accepted(good_index, tmp_path):
    path = tmp_path / "i.sqlite"
    shutil.copy(good_index, path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE dirents SET pos = ? WHERE (parent, pos) = "
                   "(SELECT parent, max(pos) FROM dirents WHERE parent = 1)", ((1 << 63) - 2,))
    assert explore(path) == "accepted"


# -- the schema, and the plans of the reader's queries ---------------------------------------

NO_UNIQUE_DIGEST = (  # chunks as written, less the UNIQUE that indexes chunk(digest)
    "PRAGMA legacy_alter_table = ON; ALTER TABLE chunks RENAME TO c0; "
    "CREATE TABLE chunks (id INTEGER PRIMARY KEY, digest BLOB NOT NULL, "
    "blob INTEGER NOT NULL REFERENCES blobs (id), offset INTEGER NOT NULL, "
    "stored_size INTEGER NOT NULL, size INTEGER NOT NULL, codec INTEGER NOT NULL); "
    "INSERT INTO chunks SELECT * FROM c0; DROP TABLE c0")


@pytest.mark.parametrize(("script", "problem"), [
    ("DROP INDEX dirents_by_name", "no index dirents_by_name"),
    ("DROP INDEX dirents_by_name; CREATE INDEX dirents_by_name ON dirents (name)",
     "index dirents_by_name is not defined as lazyfs writes it"),
    (NO_UNIQUE_DIGEST, "no index sqlite_autoindex_chunks_1"),
    ("ANALYZE", "an unexpected table sqlite_stat1"),  # statistics that steer the planner
    ("CREATE INDEX extra ON inodes (mode)", "an unexpected index extra"),
    ("CREATE VIEW v AS SELECT 1", "an unexpected view v"),
], ids=["no-dirents_by_name", "other-dirents_by_name", "no-chunk-digest-index", "statistics",
        "extra-index", "view"])
def test_an_index_without_the_writers_schema_is_refused_at_open(good_index, tmp_path, script,
                                                                 problem):
    path = tmp_path / "i.sqlite"
    shutil.copy(good_index, path)
    db = sqlite3.connect(path)
    apply_edit(db, ("script", script))
    db.close()
    with pytest.raises(IndexFormatError, match=re.escape(f"{path}: not a lazyfs index ({problem})")):
        IndexReader(path)


class _Recorder:
    """An sqlite3 connection that remembers the SQL of every statement run on it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.asked: dict[str, tuple | dict] = {}  # SQL: the arguments it was last run with

    def execute(self, sql: str, args=()):
        self.asked[sql] = args
        return self.db.execute(sql, args)


# Reader methods that read whole tables on purpose, never for a FUSE request: the check,
# counts for statfs and status (once per reader), the prefetch's list of all chunks, path
# finding for traces and failure messages (dirents have no index by inode).
WHOLE_INDEX = {"check", "totals", "all_chunks", "paths", "path_of", "close", "blobs"}
_SMALL_TABLES = {"meta", "blobs", "sqlite_master"}  # read once, at open


def unindexed(db: sqlite3.Connection, sql: str, args: tuple | dict) -> list[str]:
    """What in the plan of ``sql`` reads more than the rows it answers: a scan of a big
    table, a sort, or a search that leaves a compared column to be filtered row by row
    (``lookup`` without ``dirents_by_name`` searches the whole directory by parent)."""
    alias = {a or t: t for t, a in re.findall(
        r"(?:FROM|JOIN) (\w+)(?: (?!WHERE|ORDER|JOIN|ON|LIMIT|GROUP)(\w+))?", sql)}
    equal = re.findall(r"(?:(\w+)\.)?(\w+) = [?:]", sql)
    found = []
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args)]
    for step in plan:
        scan = re.match(r"SCAN (\w+)", step)
        if scan and alias.get(scan[1], scan[1]) not in _SMALL_TABLES and scan[1] != "CONSTANT":
            found.append(step)
        if "TEMP B-TREE" in step:
            found.append(step)
        search = re.match(r"SEARCH (\w+) USING (.*)\((.*)\)$", step)
        if search:
            used = set(re.findall(r"(\w+)[=<>]", search[3]))
            for who, column in equal:
                if (who or search[1]) == search[1] and column not in used and not (
                        "INTEGER PRIMARY KEY" in search[2] and used == {"rowid"}):
                    found.append(f"{step} (filters {column} row by row)")
    return found


def test_every_question_a_handler_asks_is_answered_from_an_index(good_index, tmp_path):
    # Every public method of the reader is either asked per FUSE request, and walked
    # here, or listed in WHOLE_INDEX: a new one must be placed.
    public = {n for n in dir(IndexReader) if not n.startswith("_") and callable(getattr(
        IndexReader, n))}
    asked = {"attr", "lookup", "children", "readlink", "xattrs", "getxattr", "chunks",
             "chunks_of", "chunk", "chunks_after", "chunks_within", "digests_after"}
    assert public == asked | WHOLE_INDEX
    r = IndexReader(good_index)
    rec = _Recorder(r._db)
    r._db = rec  # type: ignore[assignment]
    f = r.lookup(InodeT(ROOT_INO), b"etc")
    f = r.lookup(f.ino, b"f")
    s = r.lookup(r.lookup(InodeT(ROOT_INO), b"etc").ino, b"s")
    r.attr(f.ino)
    list(r.children(InodeT(ROOT_INO), 1))
    r.readlink(s.ino)
    r.xattrs(f.ino)
    r.getxattr(f.ino, b"user.k")
    spans = r.chunks(f.ino, 0, 3 * CS)
    r.chunks_of(f.ino)
    r.chunk(spans[0].chunk.digest)
    after = r.chunks_after(spans[0].chunk, 1 << 20)
    assert after[: len(spans) - 1] == [s.chunk for s in spans[1:]]
    assert r.digests_after(spans[0].chunk, 1 << 20) == [c.digest for c in after]
    middle = spans[1].chunk
    assert r.chunks_within(middle, spans[0].chunk.offset, spans[2].chunk.offset + spans[2].chunk.stored_size
                           ) == [spans[0].chunk, spans[2].chunk]
    assert len(rec.asked) >= len(asked)
    assert {sql: unindexed(rec.db, sql, args) for sql, args in rec.asked.items()} == {
        sql: [] for sql in rec.asked}
    r._db = rec.db
    r.close()
    # The rule sees a missing index: without dirents_by_name, lookup reads its directory.
    path = tmp_path / "i.sqlite"
    shutil.copy(good_index, path)
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX dirents_by_name")
        lookup, children = (next(q for q in rec.asked.items() if part in q[0])
                            for part in ("d.name = ?", "d.pos >= ?"))
        assert unindexed(db, *lookup) and not unindexed(db, *children)
        db.execute("DROP TABLE chunks")
        db.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, digest BLOB, blob, offset, "
                   "stored_size, size, codec)")
        assert unindexed(db, *next(q for q in rec.asked.items() if "WHERE digest = ?" in q[0]))


def test_settings_are_shared():
    # The tar fuzz module's settings (LAZYFS_FUZZ_EXAMPLES scales both) apply here too.
    assert isinstance(SETTINGS, settings) and HealthCheck.too_slow in SETTINGS.suppress_health_check
