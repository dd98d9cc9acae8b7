"""Range planning on its own: which requests fetch a set of chunks, how a demand miss
grows by its neighbours, and what a queued background request still has to fetch when its
turn comes."""

from __future__ import annotations

import os

from fetcher.plan import Range, amplify, asked_first, claim, plan_ranges

from .fakes import make_blob

PIECES = [os.urandom(5000), b"a" * 7000, os.urandom(3000), b"b" * 9000]


def test_plan_merges_neighbours_and_respects_limits():
    blob, chunks, _ = make_blob(PIECES)
    [one] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    assert (one.start, one.end) == (0, blob.size)
    assert len(one.chunks) == 4
    # a gap larger than max_gap splits the request
    parts = plan_ranges([chunks[0], chunks[3]], max_request=1 << 20, max_gap=10)
    assert [len(r.chunks) for r in parts] == [1, 1]
    # the size limit splits too
    parts = plan_ranges(chunks, max_request=6000, max_gap=1 << 20)
    assert all(r.end - r.start <= 6000 or len(r.chunks) == 1 for r in parts)
    assert sum(len(r.chunks) for r in parts) == 4


def test_a_gap_within_the_limit_is_read_through_and_chunks_come_in_blob_order():
    _, chunks, _ = make_blob(PIECES)
    gap = chunks[1].stored_size
    [rng] = plan_ranges([chunks[2], chunks[0]], max_request=1 << 20, max_gap=gap)
    assert rng.chunks == (chunks[0], chunks[2])
    assert (rng.start, rng.end) == (0, chunks[2].offset + chunks[2].stored_size)


def test_chunks_of_two_blobs_never_share_a_request():
    _, first, _ = make_blob(PIECES[:2], blob_id=1)
    _, second, _ = make_blob(PIECES[2:], blob_id=2)
    parts = plan_ranges(first + second, max_request=1 << 30, max_gap=1 << 30)
    assert sorted(len(r.chunks) for r in parts) == [2, 2]
    assert all(len({c.blob.digest for c in r.chunks}) == 1 for r in parts)


class Entry:
    def __init__(self, queued: bool) -> None:
        self.queued = queued


def test_claim_keeps_what_no_demand_fetch_took_over_and_marks_it_under_way():
    _, chunks, _ = make_blob(PIECES)
    [rng] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    entries = {c.digest: Entry(queued=i not in (0, 3)) for i, c in enumerate(chunks)}
    left = claim(rng, entries)
    assert left == Range(rng.blob, chunks[1].offset, chunks[2].offset + chunks[2].stored_size,
                         (chunks[1], chunks[2]))
    assert not any(e.queued for e in entries.values())
    assert claim(rng, entries) is None  # a second claim finds nothing left


def test_claim_of_a_range_nobody_took_is_the_range_itself():
    _, chunks, _ = make_blob(PIECES)
    [rng] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    assert claim(rng, {c.digest: Entry(queued=True) for c in chunks}) is rng


def _end(c):
    return c.offset + c.stored_size


def test_a_miss_grows_by_the_chunks_after_it_up_to_the_window():
    _, chunks, _ = make_blob(PIECES)
    [rng] = plan_ranges(chunks[:1], max_request=1 << 20, max_gap=0)
    every = amplify(rng, chunks[1:], window=1 << 20, free=lambda c: True)
    assert every == Range(rng.blob, 0, _end(chunks[3]), tuple(chunks), neighbours=3)
    # the window bounds the whole request: a chunk that would pass it is left out, and so
    # is everything after it
    window = _end(chunks[2]) - 1
    part = amplify(rng, chunks[1:], window=window, free=lambda c: True)
    assert part.chunks == (chunks[0], chunks[1]) and part.end - part.start <= window
    assert amplify(rng, chunks[1:], window=_end(chunks[0]), free=lambda c: True) is rng
    # a chunk cached or in flight ends it: its bytes are never fetched twice
    taken = amplify(rng, chunks[1:], window=1 << 20, free=lambda c: c is not chunks[2])
    assert taken.chunks == (chunks[0], chunks[1]) and taken.neighbours == 1


def test_an_amplified_request_never_crosses_its_blob():
    _, first, _ = make_blob(PIECES[:2], blob_id=1)
    _, second, _ = make_blob(PIECES[2:], blob_id=2)
    [rng] = plan_ranges(first[:1], max_request=1 << 20, max_gap=0)
    # the following chunks as an index out of order might give them: another blob's, then
    # one that overlaps the range
    assert amplify(rng, second, window=1 << 30, free=lambda c: True) is rng
    assert amplify(rng, first, window=1 << 30, free=lambda c: True) is rng
    grown = amplify(rng, first[1:] + second, window=1 << 30, free=lambda c: True)
    assert grown.chunks == tuple(first) and {c.blob.digest for c in grown.chunks} == {rng.blob}


def test_the_asked_chunks_are_handed_over_before_the_neighbours():
    _, chunks, _ = make_blob(PIECES)
    [rng] = plan_ranges(chunks[:2], max_request=1 << 20, max_gap=0)
    assert asked_first(rng) == [rng]
    grown = amplify(rng, chunks[2:], window=1 << 20, free=lambda c: True)
    asked, extra = asked_first(grown)
    assert asked == rng
    assert extra == Range(rng.blob, chunks[2].offset, _end(chunks[3]), tuple(chunks[2:]), 2)
