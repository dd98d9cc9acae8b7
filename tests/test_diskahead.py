"""Readahead in the node cache: ``DiskAhead`` (which entries a read that waited for the
disk asks for along, given a fake ``chunks_after`` and a fake thread pool) and
``ChunkStore.will_need`` on real entries."""

from __future__ import annotations

import hashlib

import pytest

from blockindex.format import Blob, Chunk, ChunkDigest
from cache.store import ChunkStore
from fetcher.diskahead import _REMEMBERED, AGAIN_AFTER, WINDOW, DiskAhead
from testkit.waiting import wait_until

from .cachekit import drop_from_page_cache, resident_pages

BLOB = Blob(1, "sha256:" + "ab" * 32, 1 << 40)


def chunk(i: int) -> Chunk:
    """The ``i``-th chunk of one blob, 1000 stored bytes each, side by side."""
    return Chunk(ChunkDigest(hashlib.sha256(b"%d" % i).digest()), BLOB, i * 1000, 1000, 4096, 0)


class Blobs:
    """A fake ``digests_after``: the next ``follow`` chunks of the blob, whatever the window;
    and a fake ``submit`` that records the jobs instead of running them."""

    def __init__(self, follow: int = 3) -> None:
        self.follow = follow
        self.asked: list[tuple[Chunk, int]] = []
        self.jobs: list[tuple[object, tuple]] = []

    def after(self, c: Chunk, nbytes: int) -> list[bytes]:
        self.asked.append((c, nbytes))
        i = c.offset // 1000
        return [chunk(j).digest for j in range(i + 1, i + 1 + self.follow)]

    def submit(self, fn: object, *args: object) -> None:
        self.jobs.append((fn, args))

    def submitted(self) -> list[list[ChunkDigest]]:
        return [list(args[0]) for _, args in self.jobs]  # type: ignore[call-overload]


@pytest.fixture
def store(tmp_path):
    return ChunkStore(tmp_path / "cache")


def test_a_cold_read_from_a_chunks_start_asks_once_for_the_entries_after_it(store):
    blobs = Blobs()
    ahead = DiskAhead(store, blobs.after, submit=blobs.submit)
    ahead.cold(chunk(0), 0)
    assert blobs.asked == [(chunk(0), WINDOW)]
    [(fn, _)] = blobs.jobs
    assert fn == store.will_need  # run in the pool: the reader waits for none of it
    assert blobs.submitted() == [[chunk(j).digest for j in (1, 2, 3)]]
    assert ahead.asked == 3
    ahead.cold(chunk(0), 0)  # the same read again (another reader, a re-read)
    assert len(blobs.jobs) == 1 and ahead.asked == 3


def test_a_read_inside_a_chunk_asks_for_nothing(store):
    """Random small reads do not start at a chunk's first byte: they bring only their
    own blocks, not the blob after them."""
    blobs = Blobs()
    ahead = DiskAhead(store, blobs.after, submit=blobs.submit)
    for offset in (1, 4095, 64 << 10):
        ahead.cold(chunk(0), offset)
    assert blobs.asked == [] and blobs.jobs == [] and ahead.asked == 0


def test_a_walk_asks_for_each_entry_once_and_the_index_once_a_window(store):
    """A reader walking through the blob meets each window many times: a read of a chunk
    asked for lately asks nothing (not even the index: its followers were asked with it),
    and past the window only the entries not asked for before are asked for."""
    blobs = Blobs(follow=3)
    ahead = DiskAhead(store, blobs.after, window=3000, submit=blobs.submit, clock=lambda: 100.0)
    for i in range(6):
        ahead.cold(chunk(i), 0)
    assert [c for c, _ in blobs.asked] == [chunk(0), chunk(4)]  # 1-3 were asked with chunk 0
    assert blobs.submitted() == [[chunk(j).digest for j in (1, 2, 3)],
                                 [chunk(j).digest for j in (5, 6, 7)]]
    assert ahead.asked == 6
    blobs.follow = 0  # the last chunk of its blob
    ahead.cold(chunk(20), 0)
    assert len(blobs.jobs) == 2


def test_a_second_walk_later_asks_again(store):
    """The page cache may have let the entries go (a second tar after a drop of the page
    cache): what was asked for more than AGAIN_AFTER seconds ago is asked for again."""
    now = [100.0]
    blobs = Blobs(follow=2)
    ahead = DiskAhead(store, blobs.after, submit=blobs.submit, clock=lambda: now[0])
    ahead.cold(chunk(0), 0)
    ahead.cold(chunk(1), 0)
    assert len(blobs.jobs) == 1
    now[0] += AGAIN_AFTER + 0.1
    ahead.cold(chunk(1), 0)
    assert blobs.submitted()[-1] == [chunk(2).digest, chunk(3).digest]


def test_what_it_remembers_is_bounded_and_the_oldest_is_asked_for_again(store):
    blobs = Blobs(follow=1)
    ahead = DiskAhead(store, blobs.after, submit=blobs.submit)
    ahead.cold(chunk(0), 0)  # asks for chunk 1
    for i in range(2, 2 * _REMEMBERED + 3, 2):  # asks for more than it remembers (odd
        ahead.cold(chunk(i), 0)                   # chunks after chunk 1)
    assert len(ahead._asked) == _REMEMBERED
    asked = ahead.asked
    ahead.cold(chunk(0), 0)  # forgotten: asked for again
    assert blobs.submitted()[-1] == [chunk(1).digest] and ahead.asked == asked + 1
    ahead.cold(chunk(2 * _REMEMBERED), 0)  # one of the last: still remembered
    assert ahead.asked == asked + 1


def test_will_need_asks_for_the_entries_it_has_and_skips_the_missing(store):
    present = [hashlib.sha256(b"%d" % i).digest() for i in range(3)]
    for i, digest in enumerate(present):
        assert store.put(digest, bytes([i]) * (200 << 10))
    missing = [b"\x00" * 32, b"\xff" * 32]
    assert store.will_need([missing[0], present[0], missing[1], present[1], present[2]]) == 3
    assert store.will_need(missing) == 0
    assert store.will_need([]) == 0


def test_will_need_brings_entries_into_the_page_cache(store):
    """An entry out of the page cache cannot be read without waiting for the disk; after
    ``will_need`` it can, without anyone reading it first."""
    digests = [hashlib.sha256(b"%d" % i).digest() for i in range(4)]
    for i, digest in enumerate(digests):
        store.put(digest, bytes([i]) * (300 << 10))
    drop_from_page_cache(store.path(d) for d in digests)

    def in_memory(digest: bytes) -> bool:
        resident, pages = resident_pages(store.path(digest))
        return resident == pages

    assert not any(resident_pages(store.path(d))[0] for d in digests)
    assert store.will_need(digests[:3]) == 3
    wait_until(lambda: all(in_memory(d) for d in digests[:3]), 30, "the entries in the page cache")
    assert resident_pages(store.path(digests[3]))[0] == 0  # not asked for
