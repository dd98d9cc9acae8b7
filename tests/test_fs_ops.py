"""The FUSE adapter in-process: handlers called directly, no kernel involved."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import shutil
import sqlite3
import stat

import pyfuse3
import pytest
import trio
import trio.testing

from blockindex.codec import decode
from blockindex.errors import IndexFormatError
from blockindex.format import ROOT_INO
from blockindex.reader import IndexReader
from blockindex.writer import IndexWriter
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.errors import UnreachableError
from lazyfs.content import ImageContent
from lazyfs.fs import STATUS_XATTR, LazyOperations

from .fakes import ScriptedSource, make_blob

CS = 4096
A = os.urandom(CS)
B = b"tail" * 100


@pytest.fixture
def image(tmp_path):
    blob, (ca, cb), raw = make_blob([A, B])
    w = IndexWriter(CS)
    w.add_inode(1, mode=0o40755, uid=0, gid=0, size=0, mtime_ns=5, nlink=2)
    # file: chunk 0 = A, chunk 1 = hole, chunk 2 = B
    size = 2 * CS + len(B)
    w.add_inode(2, mode=0o100644, uid=1000, gid=100, size=size, mtime_ns=1_700_000_000_123_456_789,
                nlink=1)
    w.add_inode(3, mode=0o120777, uid=0, gid=0, size=6, mtime_ns=0, nlink=1, target=b"target")
    w.add_dirent(1, 0, b"file", 2)
    w.add_dirent(1, 1, b"link", 3)
    w.add_xattr(2, b"user.k", b"\x00\xffv")
    w.add_blob(1, blob.digest, blob.size)
    w.add_chunk(1, ca.digest, blob=1, offset=ca.offset, stored_size=ca.stored_size, size=ca.size,
                codec=ca.codec)
    w.add_chunk(2, cb.digest, blob=1, offset=cb.offset, stored_size=cb.stored_size, size=cb.size,
                codec=cb.codec)
    w.add_extent(2, 0, 1)
    w.add_extent(2, 2, 2)
    w.write(tmp_path / "index")
    return IndexReader(tmp_path / "index"), ScriptedSource({blob.digest: raw}), size


def run(tmp_path, image, body, script=(), clock=None, with_content=False):
    index, source, size = image
    source.script = list(script)

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, source, ChunkStore(tmp_path / "cache"),
                                   FetchConfig(deadline=2))
            content = ImageContent(index, fetcher)
            ops = LazyOperations(index, content, lambda: {"pid": 1})
            await (body(ops, size, content) if with_content else body(ops, size))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return source


def test_tree_and_attributes(tmp_path, image):
    async def body(ops, size):
        entry = await ops.lookup(ROOT_INO, b"file", None)
        assert entry.st_ino == 2 and entry.st_size == size and entry.st_uid == 1000
        assert entry.st_mtime_ns == 1_700_000_000_123_456_789
        assert stat.S_ISREG(entry.st_mode)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(ROOT_INO, b"missing", None)
        assert e.value.errno == errno.ENOENT
        assert await ops.readlink(3, None) == b"target"
        assert await ops.getxattr(2, b"user.k", None) == b"\x00\xffv"
        assert await ops.listxattr(2, None) == [b"user.k"]
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getxattr(2, b"user.none", None)
        assert e.value.errno == errno.ENODATA
        assert json.loads(await ops.getxattr(ROOT_INO, STATUS_XATTR, None)) == {"pid": 1}

    run(tmp_path, image, body)


def test_reads_fetch_lazily_and_fill_holes(tmp_path, image):
    async def body(ops, size):
        fi = await ops.open(2, os.O_RDONLY, None)
        assert fi.keep_cache
        assert bytes(await ops.read(fi.fh, 0, 100)) == A[:100]
        assert bytes(await ops.read(fi.fh, CS - 10, 20)) == A[-10:] + bytes(10)
        whole = bytes(await ops.read(fi.fh, 0, 1 << 20))
        assert whole == A + bytes(CS) + B
        assert bytes(await ops.read(fi.fh, size, 10)) == b""

    source = run(tmp_path, image, body)
    # the first read fetched chunk A alone; the whole-file read fetched B alone
    assert [r[2] for r in source.requests] == [len(A), source.requests[1][2]]
    assert len(source.requests) == 2


def test_bad_bytes_are_eio_never_served(tmp_path, image):
    async def body(ops, size):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(2, 0, 100)
        assert e.value.errno == errno.EIO
        assert bytes(await ops.read(2, 0, 100)) == A[:100]  # a retry fetches good bytes

    run(tmp_path, image, body, script=["corrupt"])


def test_a_reread_of_a_failed_read_continues_its_deadline_for_chunks_it_had(tmp_path, image):
    """A read over chunks A and B: A comes from the cache, B's fetch stalls, the read fails
    at its deadline, and the kernel re-reads it a page at a time. If A left the cache in
    between (evicted), its re-read is part of the failed read and gets a short try, not a
    deadline of its own (a soak saw 6.7 s for a 5 s deadline)."""
    async def body(ops, size, content):
        assert bytes(await ops.read(2, 0, 100)) == A[:100]
        a = content.index.chunks(2, 0, 1)[0].chunk.digest
        store = ChunkStore(tmp_path / "cache")
        # A's cache write is a thread's, and A's in-flight entry answers for it until that
        # thread's end reaches the loop, some time after the entry is on disk: an entry
        # still there would serve the re-read below whatever the cache holds
        while content.fetcher._inflight.get(a) is not None:  # noqa: ASYNC110
            await trio.sleep(0.01)
        assert store.contains(a)
        start = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError):
            await ops.read(2, 0, size)  # B stalls: the read fails at its 2 s deadline
        assert trio.current_time() - start == pytest.approx(2, abs=0.1)
        content._lru.clear()  # A leaves memory and the cache, as an eviction would take it
        store.remove(a)
        start = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError):
            await ops.read(2, 0, 4096)  # the kernel's re-read of the first page: a short try
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.1)

    source = run(tmp_path, image, body, script=["ok", "stall", "stall"],
                 clock=trio.testing.MockClock(autojump_threshold=0), with_content=True)
    assert len(source.requests) == 3


def test_writes_are_refused(tmp_path, image):
    async def body(ops, size):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(2, os.O_WRONLY, None)
        assert e.value.errno == errno.EROFS
        for call in (ops.mkdir, ops.unlink, ops.write, ops.setxattr):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call(1, b"x", 0, None)
            assert e.value.errno == errno.EROFS

    run(tmp_path, image, body)


def test_an_unexpected_error_in_a_handler_is_eio_and_the_mount_serves_on(tmp_path, image, caplog):
    """A hand-made index that ``check`` refuses, served without that check (as a node
    that checked it under older rules would): an entry at position 2**63 - 1, whose
    successor pyfuse3.readdir_reply cannot take (OverflowError). That listing answers
    EIO, logged once with its traceback, and the next requests are served."""
    _index, source, size = image
    path = tmp_path / "hostile"
    shutil.copy(tmp_path / "index", path)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO inodes VALUES (4, ?, 0, 0, 0, 0, 2, 0, NULL)", (0o40755,))
        db.execute("INSERT INTO dirents VALUES (1, 2, x'646972', 4)")
        db.execute("INSERT INTO dirents VALUES (4, ?, x'78', 2)", ((1 << 63) - 1,))
    index = IndexReader(path)
    with pytest.raises(IndexFormatError, match="bad position"):
        index.check()

    async def body(ops, size):
        fh = await ops.opendir((await ops.lookup(ROOT_INO, b"dir", None)).st_ino, None)
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError) as e:
                # the lone entry fails readdir_reply's arguments: the token is never used
                await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
            assert e.value.errno == errno.EIO
        assert (await ops.getattr(2, None)).st_size == size
        assert bytes(await ops.read(2, 0, 100)) == A[:100]
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(ROOT_INO, b"missing", None)
        assert e.value.errno == errno.ENOENT  # a handler's own answer passes as it is

    with caplog.at_level(logging.ERROR, logger="lazyfs.fs"):
        run(tmp_path, (index, source, size), body)
    logged = [r for r in caplog.records if r.name == "lazyfs.fs"]
    assert [bool(r.exc_info) for r in logged] == [True, False]  # one traceback
    assert logged[0].exc_info[0] is OverflowError
    assert all(r.getMessage().startswith("readdir failed (EIO)") for r in logged)


def test_a_cancelled_handler_is_cancelled_never_eio(tmp_path, image):
    async def body(ops, size):
        with trio.move_on_after(1) as scope:
            await ops.read(2, 0, 100)  # the fetch stalls; the deadline is 2 s
        assert scope.cancelled_caught

    run(tmp_path, image, body, script=["stall"], clock=trio.testing.MockClock(autojump_threshold=0))


def test_every_handler_answers_at_the_edge():
    handlers = {name: h for name, h in vars(LazyOperations).items()
                if name in vars(pyfuse3.Operations) and inspect.iscoroutinefunction(h)}
    assert {"lookup", "getattr", "readdir", "read", "getxattr"} <= handlers.keys()
    assert [n for n, h in handlers.items() if not hasattr(h, "__wrapped__")] == []


def _one_chunk_file(tmp_path, data: bytes, *, cached: bool = True):
    """An index of one file ``f`` (inode 2) of one chunk, and a cache that holds it
    (empty unless ``cached``)."""
    blob, (chunk,), raw = make_blob([data])
    w = IndexWriter(1 << 20)
    w.add_inode(1, mode=0o40755, uid=0, gid=0, size=0, mtime_ns=0, nlink=2)
    w.add_inode(2, mode=0o100644, uid=0, gid=0, size=len(data), mtime_ns=0, nlink=1)
    w.add_dirent(1, 0, b"f", 2)
    w.add_blob(1, blob.digest, blob.size)
    w.add_chunk(1, chunk.digest, blob=1, offset=chunk.offset, stored_size=chunk.stored_size,
                size=chunk.size, codec=chunk.codec)
    w.add_extent(2, 0, 1)
    w.write(tmp_path / "index")
    store = ChunkStore(tmp_path / "cache")
    if cached:
        store.put(chunk.digest,
                  decode(chunk.codec, chunk.size, raw[chunk.offset : chunk.offset + chunk.stored_size]))
    return IndexReader(tmp_path / "index"), store, chunk


def test_many_readers_of_a_chunk_being_loaded_never_trip_over_each_other(tmp_path):
    """Readers that find a chunk being loaded from the cache wait for that load; one that
    arrives just as it ends starts its own. Readers keep coming while loads end: each
    load's bookkeeping must stay its own (a reader that deleted another's crashed the
    mount with a KeyError, which a benchmark's mount hit)."""
    big = os.urandom(300 << 10)  # loaded in a worker thread: the loads overlap
    index, _, _ = _one_chunk_file(tmp_path, big, cached=False)
    outcomes: list[str] = []

    async def main():
        async with trio.open_nursery() as nursery:
            offline = ChunkFetcher(nursery, None, ChunkStore(tmp_path / "cache"))
            await readers(ImageContent(index, offline, memory_chunks=0))
            nursery.cancel_scope.cancel()

    async def readers(content: ImageContent) -> None:
        async def reader(delay: float) -> None:
            await trio.sleep(delay)
            try:
                await content.read(2, 0, 4096)  # not cached, and offline: UnreachableError
                outcomes.append("read")
            except UnreachableError:
                outcomes.append("offline")

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(reader, (i % 30) * 0.0005)

    trio.run(main)
    assert outcomes == ["offline"] * 300


def counting_gets(monkeypatch) -> list[bytes]:
    """The digests of every read of the node cache, in order."""
    gets: list[bytes] = []
    get = ChunkStore.get

    def counted(self, digest):
        gets.append(digest)
        return get(self, digest)

    monkeypatch.setattr(ChunkStore, "get", counted)
    return gets


def test_a_reader_joins_the_fetch_of_a_chunk_instead_of_reading_the_cache_again(tmp_path, image,
                                                                                monkeypatch):
    """One load per chunk, from the cache or the network: a reader that comes while the
    chunk is on the network waits for that fetch; it does not look in the cache first."""
    gets = counting_gets(monkeypatch)

    async def body(ops, size):
        got = []

        async def reader(delay: float) -> None:
            await trio.sleep(delay)
            got.append(bytes(await ops.read(2, 0, 100)))

        async with trio.open_nursery() as n:
            n.start_soon(reader, 0)
            n.start_soon(reader, 0.1)  # the fetch answers after 0.4 s
        assert got == [A[:100]] * 2

    source = run(tmp_path, image, body, script=["slow"], clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(source.requests) == 1
    assert len(gets) == 1




def test_loads_of_a_whole_chunk_from_the_cache_are_shared(tmp_path, monkeypatch):
    big = os.urandom(300 << 10)  # read in a worker thread: the loads overlap it
    _, store, chunk = _one_chunk_file(tmp_path, big)
    gets = counting_gets(monkeypatch)
    got: list[bytes] = []

    async def main():
        async with trio.open_nursery() as nursery:
            offline = ChunkFetcher(nursery, None, store)

            async def reader() -> None:
                data, cached = await offline.read([chunk])
                assert chunk.digest in cached
                got.append(bytes(data[chunk.digest]))

            async with trio.open_nursery() as readers:
                for _ in range(5):
                    readers.start_soon(reader)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert got == [big] * 5
    assert gets == [chunk.digest]


def test_a_read_of_a_cached_chunk_reads_only_the_blocks_it_touches(tmp_path, monkeypatch):
    """A demand read of a chunk the cache holds is one read of the blocks it touches:
    no load, hash or decode of the whole chunk."""
    big = os.urandom(1 << 20)
    index, store, _ = _one_chunk_file(tmp_path, big)
    gets = counting_gets(monkeypatch)
    preads: list[int] = []
    real = os.pread

    def pread(fd, n, at):
        preads.append(n)
        return real(fd, n, at)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(store, "_nowait", False)  # every read goes through os.pread

    async def main():
        async with trio.open_nursery() as nursery:
            offline = ChunkFetcher(nursery, None, store)
            content = ImageContent(index, offline, memory_chunks=0)
            for offset, size in [(0, 4096), (100_000, 4096), (65_530, 20), ((1 << 20) - 10, 4096)]:
                assert bytes(await content.read(2, offset, size)) == big[offset : offset + size]
            assert content.stats.chunk_hits_cache == 4
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert gets == []
    # the header once, then one pread of one or two 64 KiB blocks per read
    assert preads == [4096, 64 << 10, 64 << 10, 128 << 10, 64 << 10]
