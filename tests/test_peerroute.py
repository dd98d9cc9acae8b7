"""The peer route on its own, under trio's MockClock: whom it asks for a chunk, when it
hedges, and what it makes of each answer. A scripted peer client and origin stand in for
the network; the fetcher's in-flight bookkeeping is not involved."""

from __future__ import annotations

import math
import os

import pytest
import trio
import trio.lowlevel
import trio.testing

from fetcher.config import FetchStats
from fetcher.errors import IntegrityError
from fetcher.gate import DemandGate
from fetcher.peerroute import PeerRoute
from fetcher.peers import PeerConfig, PeerSet, PeerTier
from fetcher.verify import Verifier

from .fakes import BatchesByChunk, make_blob, peer_answer

OWNER, NEXT = "http://10.0.0.2:7070", "http://10.0.0.3:7070"
PIECE = os.urandom(5000)


class Peers(BatchesByChunk):
    """A PeerClient answering per peer: ``ok``, ``corrupt``, ``refused`` or ``stall``."""

    def __init__(self, raw: bytes, answers: dict[str, str]) -> None:
        self.raw, self.answers = raw, answers
        self.asked: list[tuple[str, float, str | None]] = []

    async def fetch(self, peer, chunk, repository):
        self.asked.append((peer, trio.current_time(), repository))
        return await peer_answer(self.raw, chunk, peer, self.answers.get(peer, "ok"))


def route_run(answers: dict[str, str], body, *, asks=((OWNER, False), (NEXT, False))):
    _, [chunk], raw = make_blob([PIECE])
    peers = PeerSet([OWNER, NEXT], config=PeerConfig(hedge_delay=0.05, request_deadline=10,
                                                      hedge_rate=math.inf))  # delays exact
    client = Peers(raw, answers)
    stats = FetchStats()
    gate = DemandGate(pause=1.0)
    origin_asked: list[tuple[float, bool]] = []
    answered: list[str] = []

    async def origin(c, background):
        origin_asked.append((trio.current_time(), background))
        assert gate.in_flight == (0 if background else 1)
        return PIECE, raw[c.offset : c.offset + c.stored_size]

    route = PeerRoute(PeerTier(peers, client, "reg/app"), stats, Verifier(thread_above=1 << 30),  # type: ignore[arg-type]
                      gate, origin, deadline=30, on_answer=lambda src, n, s: answered.append(src))

    async def main():
        return await body(route, chunk)

    value = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return value, client, origin_asked, stats, peers, answered


def test_the_owner_answers_and_nobody_else_is_asked():
    async def body(route, chunk):
        return await route.demand(chunk, [(OWNER, False), (NEXT, False)])

    (plain, _), client, origin, stats, _, answered = route_run({}, body)
    assert bytes(plain) == PIECE
    assert [p for p, _, _ in client.asked] == [OWNER] and origin == []
    assert (stats.peer_chunks, stats.peer_requests, stats.demand_requests, stats.hedged) == (1, 1, 1, 0)
    assert answered == ["peer"]


def test_a_lying_owner_is_avoided_and_the_next_owner_answers():
    async def body(route, chunk):
        return await route.demand(chunk, [(OWNER, False), (NEXT, False)])

    (plain, _), client, origin, stats, peers, _ = route_run({OWNER: "corrupt"}, body)
    assert bytes(plain) == PIECE and [p for p, _, _ in client.asked] == [OWNER, NEXT]
    assert stats.peer_integrity_failures == 1 and peers.bad_peers() == [OWNER]
    assert origin == []


def test_slow_owners_are_hedged_one_delay_each_then_the_origin_answers():
    async def body(route, chunk):
        return await route.demand(chunk, [(OWNER, False), (NEXT, False)])

    (plain, _), client, origin, stats, _, _ = route_run({OWNER: "stall", NEXT: "stall"}, body)
    assert bytes(plain) == PIECE
    assert [t for _, t, _ in client.asked] == [0, pytest.approx(0.05)]
    assert origin == [(pytest.approx(0.1), False)]
    assert (stats.hedged, stats.hedge_wins, stats.origin_after_peers) == (2, 1, 1)


def test_a_readahead_waits_five_hedge_delays_before_the_next_source():
    async def body(route, chunk):
        return await route.demand(chunk, [(OWNER, False)], speculative=True)

    _, _, origin, _, _, _ = route_run({OWNER: "stall"}, body)
    assert origin == [(pytest.approx(0.25), False)]


def test_the_prefetch_never_hedges_and_reaches_the_origin_by_one_peer_deadline():
    async def body(route, chunk):
        return await route.background(chunk, [(OWNER, True)])

    (plain, _), client, origin, stats, _, _ = route_run({OWNER: "stall"}, body)
    assert bytes(plain) == PIECE
    assert client.asked == [(OWNER, 0, None)]  # cache-only: no repository to fetch from
    assert origin == [(pytest.approx(10), True)]
    assert stats.hedged == 0 and stats.demand_requests == 0


def test_when_the_peers_fail_the_read_gets_the_origins_answer_or_error():
    async def body(route, chunk):
        with pytest.raises(IntegrityError, match="wrong bytes"):
            await route.ask(chunk, OWNER, False)
        return await route.demand(chunk, [(NEXT, False)])

    (plain, _), _, origin, stats, peers, _ = route_run({OWNER: "corrupt", NEXT: "refused"}, body)
    assert bytes(plain) == PIECE and len(origin) == 1
    assert stats.peer_failures == 1 and peers.health[NEXT].failures == 1
