"""Reads of the node cache that have to wait for the disk: on the trio loop while the disk
answers quickly, in worker threads for a while after one that did not; the rest of an
entry is asked for off the reader's time; and the same descriptor serves the read that
tried not to wait and the one that then waits."""

from __future__ import annotations

import os

import pytest
import trio

from cache.entry import BLOCK_SIZE
from cache.store import ChunkStore
from fetcher.verify import InlineWaits, Verifier

from .fakes import make_blob


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_read_sends_the_next_to_threads_for_the_back_off_then_one_is_tried_again():
    clock = Clock()
    waits = InlineWaits(slow=0.002, back_off=1.0, clock=clock)
    assert waits.allowed()
    waits.took(0.0005)
    assert waits.allowed() and (waits.reads, waits.slow_reads) == (1, 0)
    waits.took(0.010)
    assert not waits.allowed() and waits.slow_reads == 1
    clock.now += 0.99
    assert not waits.allowed()
    clock.now += 0.02
    assert waits.allowed()


def _cache_with(tmp_path, plain: bytes):
    _, [c], _ = make_blob([plain])
    store = ChunkStore(tmp_path)
    store.put(c.digest, plain)
    store._nowait = False  # as on a filesystem that cannot say: every read "would wait"
    return store, c


def _count_threads(monkeypatch) -> list:
    """What is handed to worker threads from now on (``trio.to_thread.run_sync``)."""
    threads = []
    real = trio.to_thread.run_sync

    async def counted(fn, *args, **kw):
        threads.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return threads


@pytest.mark.parametrize("allowed", [True, False])
def test_a_read_that_would_wait_waits_on_the_loop_only_while_that_is_allowed(tmp_path, monkeypatch, allowed):
    plain = os.urandom(3 * BLOCK_SIZE)
    store, c = _cache_with(tmp_path, plain)
    clock = Clock()
    waits = InlineWaits(clock=clock)
    if not allowed:
        waits.took(1.0)  # a slow one just now
    verifier = Verifier(thread_above=128 << 10, inline=waits)
    threads = _count_threads(monkeypatch)
    told = []

    async def main():
        return await verifier.cached_range(store, c, BLOCK_SIZE + 10, 5000,
                                           on_disk=lambda chunk, at: told.append(at))

    got = trio.run(main)
    assert bytes(got) == plain[BLOCK_SIZE + 10 : BLOCK_SIZE + 5010]
    assert told == [BLOCK_SIZE + 10]  # the disk-ahead is told either way
    assert (len(threads), waits.reads) == ((0, 1) if allowed else (1, 1))


def test_a_large_read_always_goes_to_a_thread(tmp_path, monkeypatch):
    plain = os.urandom(4 * BLOCK_SIZE)
    store, c = _cache_with(tmp_path, plain)
    verifier = Verifier(thread_above=64 << 10, inline=InlineWaits())
    threads = _count_threads(monkeypatch)
    got = trio.run(verifier.cached_range, store, c, 0, 3 * BLOCK_SIZE)
    assert bytes(got) == plain[: 3 * BLOCK_SIZE] and len(threads) == 1


def test_then_wait_reads_on_the_same_descriptor_and_refusing_it_raises(tmp_path, monkeypatch):
    plain = os.urandom(2 * BLOCK_SIZE)
    store, c = _cache_with(tmp_path, plain)
    opens = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **kw: opens.append(a[0]) or real_open(*a, **kw))
    with pytest.raises(BlockingIOError):
        store.read_range(c.digest, 0, 100, nowait=True, then_wait=lambda: False)
    assert bytes(store.read_range(c.digest, 0, 100, nowait=True, then_wait=lambda: True)) == plain[:100]
    store._nowait = True
    store._heads.clear()
    asked = []

    def then_wait():
        asked.append(1)
        return True

    # where the filesystem can say, a read the page cache holds never asks
    assert bytes(store.read_range(c.digest, 5, 10, nowait=True, then_wait=then_wait)) == plain[5:15]
    assert len(opens) == 2 and asked in ([], [1])


def test_the_rest_of_an_entry_read_from_disk_is_asked_for_later_not_by_the_reader(tmp_path):
    plain = os.urandom(8 * BLOCK_SIZE)
    _, [c], _ = make_blob([plain])
    store = ChunkStore(tmp_path)
    store.put(c.digest, plain)
    later = []
    store.later = lambda fn, *args: later.append((fn, args))
    assert bytes(store.read_range(c.digest, 0, BLOCK_SIZE)) == plain[:BLOCK_SIZE]
    [(fn, (path, at))] = later
    assert fn == ChunkStore.will_need_from and os.path.exists(path) and at > BLOCK_SIZE
    fn(path, at)  # what the thread then does: no error, whatever the page cache holds
    fn(str(tmp_path / "gone"), 0)  # an entry evicted meanwhile is skipped
    later.clear()
    last = 7 * BLOCK_SIZE
    assert bytes(store.read_range(c.digest, last, 100)) == plain[last : last + 100]
    assert later == []  # the last block: nothing after it to ask for
