"""Hedging follows a batch's progress, under trio's MockClock: an owner that streams a
large batch slowly but steadily is waited for, one that stops in the middle of a batch has
the rest of it sent on to the origin at once, and one that trickles still ends by its
batch's bound. A scripted owner stands in for the network (frames as the wire has them);
the fetcher, its peer route and its batches are the real ones."""

from __future__ import annotations

import math
import os

import pytest
import trio
import trio.testing

from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.peerbatch import PeerBatcher
from fetcher.peers import PeerConfig, PeerSet, PeerTier
from fetcher.peerwire import END, FRAME, OK

from .fakes import FrameReader, ScriptedSource, make_blob

OWNER = "http://10.0.0.2:7070"
DELAY = 0.05
"""The hedge delay (fixed: no answer has been seen when the reads start)."""
DEADLINE = 10.0
"""A peer request's deadline."""


class StreamingOwner:
    """A PeerClient whose batches stream their frames in order, ``gap`` seconds apart; with
    ``stop_after``, it sends that many and then nothing more (the connection stays open);
    with ``trickle``, one byte a second from the start. Notes when each batch ended."""

    def __init__(self, raw: bytes, gap: float, *, stop_after: int | None = None,
                 trickle: bool = False) -> None:
        self.raw, self.gap, self.stop_after, self.trickle = raw, gap, stop_after, trickle
        self.batches: list[int] = []
        self.ended: list[float] = []

    async def fetch(self, peer, chunk, repository):
        raise AssertionError("every read here goes in a batch")

    async def fetch_batch(self, peer, chunks, repository, read, *, deadline, prefetch=False):
        self.batches.append(len(chunks))
        send, receive = trio.open_memory_channel[bytes](0)

        async def stream() -> None:
            async with send:
                for i, c in enumerate(chunks):
                    if i == self.stop_after:
                        await trio.sleep_forever()
                    data = self.raw[c.offset : c.offset + c.stored_size]
                    wire = FRAME.pack(c.digest, OK, c.codec, c.size, len(data)) + data
                    if self.trickle:
                        for b in wire:
                            await trio.sleep(1)
                            await send.send(bytes([b]))
                        continue
                    await trio.sleep(self.gap)
                    await send.send(wire)
                await send.send(FRAME.pack(bytes(32), END, 0, 0, 0))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream)
                result = await read(FrameReader(receive))
                nursery.cancel_scope.cancel()
            return result
        finally:
            self.ended.append(trio.current_time())


def _read(tmp_path, owner_of, n: int = 20):
    """A read of ``n`` chunks at once on a node whose one peer (``owner_of(raw)``) owns
    them all. Returns (owner, origin, stats, time the read ended)."""
    pieces = [os.urandom(5000) for _ in range(n)]
    blob, chunks, raw = make_blob(pieces)
    origin = ScriptedSource({blob.digest: raw})
    owner = owner_of(raw)
    peers = PeerSet([OWNER], config=PeerConfig(hedge_delay=DELAY, request_deadline=DEADLINE,
                                                   hedge_rate=math.inf))  # delays exact
    out = {}

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, origin, ChunkStore(tmp_path), FetchConfig(deadline=30),
                                   peers=PeerTier(peers, owner, "reg/app"))  # type: ignore[arg-type]
            got = await fetcher.get(chunks)
            out["time"] = trio.current_time()
            assert [bytes(got[c.digest]) for c in chunks] == pieces
            out["stats"] = fetcher.stats
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return owner, origin, out["stats"], out["time"]


def test_an_owner_streaming_a_large_batch_steadily_is_waited_for_not_hedged(tmp_path):
    """Each frame comes within the hedge delay of the one before, the whole batch takes
    sixteen hedge delays: no chunk of it is asked of the origin."""
    owner, origin, stats, ended = _read(tmp_path, lambda raw: StreamingOwner(raw, 0.8 * DELAY))
    assert owner.batches == [20]
    assert ended == pytest.approx(20 * 0.8 * DELAY)
    assert origin.requests == []
    assert (stats.hedged, stats.stalled, stats.origin_after_peers, stats.peer_chunks) == (0, 0, 0, 20)


def test_an_owner_that_stops_in_the_middle_of_a_batch_has_the_rest_sent_on_at_once(tmp_path):
    """Five frames, then silence: the fifteen chunks left go to the origin one hedge delay
    after the last frame, all of them whatever the hedge budget (a stall is no hedge of a
    slow answer), and the read ends then, not at the peer's deadline."""
    owner, origin, stats, ended = _read(tmp_path, lambda raw: StreamingOwner(raw, 0.01, stop_after=5))
    assert owner.batches == [20]
    assert ended == pytest.approx(5 * 0.01 + DELAY)
    assert (stats.peer_chunks, stats.stalled, stats.origin_after_peers, stats.hedged) == (5, 15, 15, 0)
    assert stats.hedge_wins == 15


def test_an_owner_that_never_answers_is_hedged_within_the_budget_only(tmp_path):
    """Nothing at all from the owner (it may be fetching from the origin for the whole
    cluster): as many hedges as the budget grants (3, plus 2% of the 20 chunks asked) at
    the hedge delay; the others wait for the owner, and go to the origin at the peer's
    deadline."""
    owner, origin, stats, ended = _read(tmp_path, lambda raw: StreamingOwner(raw, 0, stop_after=0))
    assert (stats.hedged, stats.stalled, stats.origin_after_peers) == (4, 0, 20)
    assert ended == pytest.approx(DEADLINE)  # min(the peer's deadline, half the read's)


def test_a_trickling_owner_ends_by_its_batch_bound():
    """One byte a second, so no frame is ever whole: the batch fails its chunks at its
    bound, one peer deadline plus its share of a full batch's, however long the trickle
    would go on."""
    pieces = [os.urandom(5000) for _ in range(3)]
    _, chunks, raw = make_blob(pieces)
    owner = StreamingOwner(raw, 0, trickle=True)
    errors = []

    async def main():
        async with trio.open_nursery() as nursery:
            batcher = PeerBatcher(owner, nursery, deadline=DEADLINE)  # type: ignore[arg-type]

            async def one(c):
                try:
                    await batcher.fetch(OWNER, c, "reg/app")
                except Exception as exc:  # noqa: BLE001 - the test looks at it
                    errors.append((str(exc), trio.current_time()))

            async with trio.open_nursery() as readers:
                for c in chunks:
                    readers.start_soon(one, c)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    bound = DEADLINE * (1 + sum(c.stored_size for c in chunks) / (4 << 20))
    assert DEADLINE < bound < 2 * DEADLINE
    assert owner.ended == [pytest.approx(bound)]
    assert [t for _, t in errors] == [pytest.approx(bound)] * 3
    assert all("did not answer 3 chunks within" in e for e, _ in errors)
