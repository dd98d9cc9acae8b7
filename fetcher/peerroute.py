"""The way to a chunk through the peers: its owner, the next owner, then the origin.

With a peer tier (``peers.PeerTier``), a chunk owned by another node is asked of that
node first, then of the next owner in rendezvous order, then of the origin: each one
when the ones before have failed (down, busy, wrong bytes) or, for a demand read, have
been silent for the hedge delay; the first verified answer wins (``race.race``). Silent
is counted from the last frame of the chunk's batch (``peerbatch``), not from its start:
an owner busy streaming a large batch is alive, and its late chunks are waited for. A
peer that has not answered yet is hedged within a budget (it may be fetching from the
origin for the whole cluster); a batch that had answered and then stopped (stalled) has
its remaining chunks sent on to the next source at once. A peer never fails a read: the
origin is always asked last, early enough to answer within the read's deadline.

    route = PeerRoute(tier, stats, verifier, gate, origin, deadline=30.0)
    plain, payload = await route.demand(chunk, asks, speculative=False)
    plain, payload = await route.background(chunk, asks)
    asks = route.asks(chunk, background)     # whom to ask (None: the origin alone)

The fetcher owns the chunk's in-flight entry and the origin request (``origin``); this
module decides whom to ask, when to hedge, and what a peer's answer is worth.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio

from blockindex.codec import ChunkDecodeError
from blockindex.format import Chunk, ChunkDigest

from .config import FetchStats
from .errors import AuthError, DeadlineError, FetchError, IntegrityError, UnreachableError
from .gate import DemandGate
from .peerbatch import PeerBatcher
from .peers import PeerIsSelf, PeerTier
from .peerwire import MAX_BATCH_BYTES, MAX_BATCH_CHUNKS, sends_plain
from .race import Pulse, race
from .verify import Verified, Verifier

log = logging.getLogger(__name__)

Asks = list[tuple[str, bool]]
"""The peers to ask for a chunk, in order, each with whether to ask it cache-only (it
will not fetch from the origin for us)."""


PREFETCH_BATCHES = 4
"""Full batches' worth of prefetch chunks on their way through the peers at once (a read
that wants one of them hurries it). With one, its later batches went as slots freed up,
about 7 chunks each, one round trip after another."""


class PeerRoute:
    """Asks a chunk's peers, then ``origin(chunk, background)``, counting in ``stats``.

    ``on_answer`` is called with (``"peer"``, bytes, seconds) after each peer answer that
    passed its check (the fetcher's ``on_request``, looked up at each call)."""

    def __init__(self, tier: PeerTier, stats: FetchStats, verifier: Verifier, gate: DemandGate,
                 origin: Callable[[Chunk, bool], Awaitable[Verified]], *, deadline: float,
                 on_answer: Callable[[str, int, float], object] = lambda *_: None,
                 batches: trio.Nursery | None = None) -> None:
        """With ``batches``, the chunks asked of one peer at once go in one request, sent
        from that nursery (``peerbatch``); without it, each chunk is a request of its own."""
        self.tier = tier
        self._stats = stats
        self._verifier = verifier
        self._gate = gate
        self._origin = origin
        self._deadline = deadline
        self._on_answer = on_answer
        config = tier.peers.config
        self.background_slots = trio.CapacityLimiter(
            PREFETCH_BATCHES * MAX_BATCH_CHUNKS if batches else config.background_concurrency)
        """Prefetch chunks on their way through the peers at once (``PREFETCH_BATCHES``)."""
        self._batcher = PeerBatcher(tier.client, batches, deadline=config.request_deadline,
                                    background_requests=config.background_concurrency,
                                    wait_idle=gate.wait_idle) if batches else None

    def asks(self, c: Chunk, background: bool) -> Asks | None:
        """Whom to ask for ``c``: its owners among the peers; for the background, when this
        node owns it, the node that owned it before (it may hold it from its own
        prefetch), cache-only; None when the origin is the one to ask."""
        peer_set = self.tier.peers
        owners = peer_set.owners(c.digest, peer_set.config.owners_asked)
        if owners:
            return [(o, False) for o in owners]
        if background and (holder := peer_set.runner_up(c.digest)):
            return [(holder, True)]
        return None

    def _attempts(self, c: Chunk, asks: Asks, background: bool,
                  pulses: list[Pulse] | None = None) -> list[Callable[[], Awaitable[Verified]]]:
        def from_peer(i: int, peer: str, cache_only: bool) -> Callable[[], Awaitable[Verified]]:
            async def attempt() -> Verified:
                return await self.ask(c, peer, cache_only, background=background,
                                      pulse=pulses[i] if pulses else None)
            return attempt

        async def from_origin() -> Verified:
            self._stats.origin_after_peers += 1
            return await self._origin(c, background)

        return [from_peer(i, peer, cache_only) for i, (peer, cache_only) in enumerate(asks)] + [from_origin]

    async def demand(self, c: Chunk, asks: Asks, *, speculative: bool = False) -> Verified:
        """The chunk for a reader: each next source is asked when the ones before failed,
        stalled, or (a hedge, within the budget) have not answered within the hedge delay;
        ``speculative`` (readahead) waits five hedge delays, so that guesses do not add to
        the origin's load. Background work gives way meanwhile (``gate``)."""
        peers = self.tier.peers

        def take_hedge(stalled: bool) -> bool:
            if stalled:  # its batch answered, then stopped: no budget, as for a failure
                self._stats.stalled += 1
                return True
            if not peers.may_hedge(self._stats.hedged, self._stats.peer_requests):
                return False
            self._stats.hedged += 1
            return True

        self._stats.demand_requests += 1
        with self._gate.demand():
            delay = peers.hedge_delay(c.stored_size) * (5 if speculative else 1)
            self._stats.peer_requests += 1
            # the origin starts early enough to answer within the read's deadline
            last_by = min(peers.config.request_deadline, self._deadline / 2)
            pulses = [Pulse() for _ in asks]
            won = await race(self._attempts(c, asks, False, pulses), delay, take_hedge=take_hedge,
                             last_by=last_by, pulses=pulses)
        self._stats.hedge_wins += won.hedged
        return won.value

    async def background(self, c: Chunk, asks: Asks) -> Verified:
        """The chunk for the prefetcher: no hedging, it waits for its peers, but asks the
        origin by one peer deadline at the latest (a reader may come to wait on it too)."""
        won = await race(self._attempts(c, asks, True), math.inf,
                         last_by=self.tier.peers.config.request_deadline)
        self._stats.hedge_wins += won.hedged
        return won.value

    def hurry(self, digest: ChunkDigest) -> None:
        """A reader waits for ``digest``, which a prefetch's peer attempt may be asking for:
        ask for it at a read's priority too (``PeerBatcher.hurry``)."""
        if self._batcher is not None:
            self._batcher.hurry(digest)

    async def ask(self, c: Chunk, peer: str, cache_only: bool, *, background: bool = False,
                  pulse: Pulse | None = None) -> Verified:
        """The verified chunk from one peer (``pulse`` beaten at each frame of its batch). A
        peer that is down is put on backoff; one that sends wrong bytes is logged and
        avoided; either way a ``FetchError``."""
        tier = self.tier
        started = time.monotonic()
        # the chunk's batch ends by its own bound, longer than one request's for more bytes
        limit = (self._batcher.bound(MAX_BATCH_BYTES) if self._batcher
                 else tier.peers.config.request_deadline)
        try:
            with trio.move_on_after(limit) as scope:
                repository = None if cache_only else tier.repository
                received = await (self._batcher.fetch(peer, c, repository, background=background, pulse=pulse)
                                  if self._batcher else tier.client.fetch(peer, c, repository))
            if scope.cancelled_caught:
                self._stats.timeouts += 1
                raise DeadlineError(f"peer {peer} sent no answer within {limit:g}s")
        except (UnreachableError, AuthError) as exc:
            self._stats.peer_failures += 1
            tier.peers.mark_down(peer, exc)
            raise
        except PeerIsSelf:
            tier.peers.mark_self(peer)
            raise
        except FetchError as exc:  # busy, or a bad answer: no penalty, just the next one
            self._stats.peer_failures += 1
            log.log(logging.DEBUG if cache_only else logging.INFO, "chunk %s from peer: %s",
                    c.hexdigest[:16], exc)
            raise
        payload = bytes(received)  # what is kept; a raw chunk's plain bytes are the same object
        try:
            plain = await self._verifier.chunk(c, payload, plain=sends_plain(c))
        except ChunkDecodeError as exc:
            self._stats.peer_integrity_failures += 1
            tier.peers.mark_bad(peer, f"chunk {c.hexdigest}", exc)
            raise IntegrityError(f"peer {peer} sent wrong bytes for chunk {c.hexdigest[:16]}").about(
                chunk=c.hexdigest, blob=c.blob.digest, source=f"peer {peer}") from exc
        tier.peers.mark_ok(peer, len(payload), None if background else time.monotonic() - started)
        self._on_answer("peer", len(payload), time.monotonic() - started)
        self._stats.peer_chunks += 1
        return plain, payload
