"""The index reader's memory of the files read last (``IndexReader.chunks`` and ``attr``):
the same answers as a fresh reader's, for files of every length it treats apart, holes
included, and no question to SQLite for a file it remembers."""

from __future__ import annotations

import hashlib
import random

import pytest

from blockindex.format import ROOT_INO, InodeT
from blockindex.reader import _MEMO_CHUNKS, _MEMO_FILES, PAGE_CACHE_KIB, IndexReader
from blockindex.writer import IndexWriter

CS = 4096
LENGTHS = {2: 0, 3: 1, 4: _MEMO_CHUNKS, 5: _MEMO_CHUNKS + 1, 6: 3 * _MEMO_CHUNKS}
"""Files by inode: how many chunks long (0: empty; up to ``_MEMO_CHUNKS``: rows kept whole)."""
SMALL = range(100, 100 + _MEMO_FILES + 60)
"""One-chunk files, more of them than the reader remembers."""


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """Files whose every third chunk is a hole, and whose last chunk is short."""
    w = IndexWriter(CS)
    w.add_inode(ROOT_INO, mode=0o40755, uid=0, gid=0, size=0, mtime_ns=0, nlink=2)
    w.add_blob(1, "sha256:" + "cd" * 32, 1 << 30)
    next_id = 1
    for ino, n in [*LENGTHS.items(), *((ino, 1) for ino in SMALL)]:
        size = max(0, n * CS - 100)
        w.add_inode(ino, mode=0o100644, uid=0, gid=0, size=size, mtime_ns=ino, nlink=1)
        w.add_dirent(ROOT_INO, ino, b"f%d" % ino, ino)
        for idx in range(n):
            if idx % 3 == 2:
                continue
            plain = min(CS, size - idx * CS)
            w.add_chunk(next_id, hashlib.sha256(b"%d" % next_id).digest(), blob=1,
                        offset=next_id * 1000, stored_size=1000, size=plain, codec=0)
            w.add_extent(ino, idx, next_id)
            next_id += 1
    path = tmp_path_factory.mktemp("memo") / "index"
    w.write(path)
    return path


def questions(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Reads of a file as the kernel and people make them: whole, in 128 KiB requests,
    across chunk edges, at and past the end, and some at random."""
    asks = [(0, size), (0, 1), (size, 10), (size + CS, 1), (0, 0)]
    asks += [(off, 128 << 10) for off in range(0, size, 128 << 10)]
    asks += [(idx * CS - 1, 2) for idx in range(1, size // CS + 1)]
    asks += [(rng.randrange(size + 1), rng.randrange(1, 5 * CS)) for _ in range(20)]
    return asks


class Queries:
    """Counts the statements a reader sends to SQLite."""

    def __init__(self, reader: IndexReader) -> None:
        self.count = 0
        reader._db.set_trace_callback(self._seen)

    def _seen(self, _sql: str) -> None:
        self.count += 1


@pytest.mark.parametrize("ino", list(LENGTHS))
def test_reads_answer_as_a_fresh_reader_does_without_asking_again(index, ino):
    """Once a file is read, its inode and (up to ``_MEMO_CHUNKS``) its chunk rows are
    remembered: a longer file asks only for the rows of each read, never for its inode."""
    reader = IndexReader(index)
    node = reader.attr(InodeT(ino))
    reader.chunks(InodeT(ino), 0, 1)
    queries = Queries(reader)
    asked = 0
    for offset, n in questions(node.size, random.Random(ino)):
        fresh = IndexReader(index)
        try:
            want = fresh.chunks(InodeT(ino), offset, n)
        finally:
            fresh.close()
        assert reader.chunks(InodeT(ino), offset, n) == want, (offset, n)
        asked += min(offset + n, node.size) > offset
    assert reader.attr(InodeT(ino)) == node
    assert queries.count == (0 if LENGTHS[ino] <= _MEMO_CHUNKS else asked)
    if LENGTHS[ino]:
        spans = reader.chunks(InodeT(ino), 0, node.size)
        assert sum(s.length for s in spans) == node.size
        assert [s.chunk is None for s in spans[:3]] == [False, False, True][: len(spans)]


def test_attr_of_a_remembered_inode_is_the_indexs(index):
    reader = IndexReader(index)
    fresh = IndexReader(index)
    for ino in [*LENGTHS, ROOT_INO]:
        reader.chunks(InodeT(ino), 0, 1)
        queries = Queries(reader)
        assert reader.attr(InodeT(ino)) == fresh.attr(InodeT(ino))
        assert queries.count == 0
        reader._db.set_trace_callback(None)
    with pytest.raises(KeyError):
        reader.attr(InodeT(99))
    with pytest.raises(KeyError):
        reader.chunks(InodeT(99), 0, 1)


def test_more_files_than_it_remembers_are_all_answered_right(index):
    """Reading each of more files than the memory holds, twice over in the same order (so
    the second pass finds none of the first files remembered), and the last ones again
    (remembered): every answer is a fresh reader's, and the memory stays bounded."""
    reader = IndexReader(index)
    fresh = IndexReader(index)
    want = {ino: fresh.chunks(InodeT(ino), 0, CS) for ino in SMALL}
    for _ in range(2):
        for ino in SMALL:
            assert reader.attr(InodeT(ino)).size == CS - 100
            assert reader.chunks(InodeT(ino), 0, CS) == want[ino]
            assert len(reader._memo) <= _MEMO_FILES
    queries = Queries(reader)
    for ino in SMALL[-_MEMO_FILES:]:
        assert reader.chunks(InodeT(ino), 0, CS) == want[ino]
    assert queries.count == 0
    reader._db.set_trace_callback(None)
    first = Queries(reader)
    assert reader.chunks(InodeT(SMALL[0]), 0, CS) == want[SMALL[0]]  # forgotten: asked again
    assert first.count > 0


def test_a_reader_keeps_a_small_page_cache(index) -> None:
    """The index is in the kernel's page cache already: a reader's own SQLite cache is
    PAGE_CACHE_KIB, not SQLite's 2 MiB a connection."""
    reader = IndexReader(index)
    try:
        for ino in SMALL:
            reader.chunks(InodeT(ino), 0, CS)
        assert reader._db.execute("PRAGMA cache_size").fetchone() == (-PAGE_CACHE_KIB,)
    finally:
        reader.close()
