"""Verified chunks from a blob source, each fetched once however many readers want it.

Missing chunks of one blob that lie close together are merged into one range request,
and a demand miss brings the chunks that follow it in its blob along (``amplify``);
every chunk is decoded and checked against its BLAKE3 digest before anyone sees it or
it is cached; a chunk that fails the check is never cached and its readers get an
``IntegrityError``. Demand reads always go first: background (prefetch) requests wait
while any demand fetch is in flight, are limited in number and in size (what a read may
find ahead of it on the link), and the checking and caching of what they brought pauses
between chunks while a demand fetch runs, so that the reader gets the CPU.

With a peer tier, a chunk owned by another node is asked of that node first (in one
request with the others asked of it at once), the next owner, then the origin.

The parts, one job each: ``plan``, ``amplify``, ``gate``, ``verify``, ``spans`` (a gzip
layer's range, inflated once), ``origin``, ``keeper``, ``rereads``, ``peerroute`` and
``peerbatch``, ``cachereads``, ``diskahead`` (the README's "How it is built" says what each
does). This module holds them together: one in-flight entry per chunk.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence, Set

import trio

from blockindex.codec import ChunkDecodeError
from blockindex.format import Chunk, ChunkDigest
from cache.store import ChunkStore

from .amplify import Amplifier, FetchedAlong
from .cachereads import CacheReads
from .config import FetchConfig, FetchStats
from .diskahead import DiskAhead
from .errors import DeadlineError, FetchError, UnreachableError
from .gate import DemandGate
from .inflight import InFlight, Pending, Underway
from .keeper import CacheWriter
from .lowprio import BACKGROUND
from .origin import Origin
from .peerroute import Asks, PeerRoute
from .peers import PeerTier
from .plan import Range, asked_first, claim, plan_fetch, plan_ranges
from .rereads import RereadDeadlines
from .source import BlobSource
from .spans import InflatedRange, is_gzip
from .together import Together
from .verify import Verified, Verifier, integrity_error, stored_payload

log = logging.getLogger(__name__)


class ChunkFetcher(CacheReads):
    """Fetches, verifies and caches chunks. Fetch tasks run in ``nursery`` so that a
    reader giving up (its deadline) does not cancel a fetch other readers wait for."""

    def __init__(
        self,
        nursery: trio.Nursery,
        source: BlobSource | None,
        store: ChunkStore | None,
        config: FetchConfig = FetchConfig(),
        *,
        source_name: str = "origin",
        peers: PeerTier | None = None,
        neighbours: Callable[[Chunk, int], Sequence[Chunk]] | None = None,
        followers: Callable[[Chunk, int], Sequence[bytes]] | None = None,
        within: Callable[[Chunk, int, int], Sequence[Chunk]] | None = None,
    ) -> None:
        self._nursery = nursery
        self._store = store
        self.config = config
        self.source_name = source_name
        self.stats = FetchStats()
        self.on_request: Callable[[str, int, float], object] | None = None
        """Called with (source, bytes, seconds) after each network request that answered."""
        self._origin = (Origin(source, source_name, self.stats, self._answered)
                        if source is not None else None)
        self._inflight = InFlight()
        self._writer = CacheWriter(nursery, store, self._inflight)
        self._verifier = Verifier(thread_above=config.thread_above)
        self._background = trio.CapacityLimiter(config.background_concurrency)
        self.peers = peers
        self.gate = DemandGate(pause=config.background_pause)
        """Demand fetches in flight, which background work waits for (``wait_idle``)."""
        self._route = PeerRoute(peers, self.stats, self._verifier, self.gate, self._from_origin,
                                deadline=config.deadline, on_answer=self._answered,
                                batches=nursery) if peers else None
        self._peer_background = self._route.background_slots if self._route else trio.CapacityLimiter(1)
        self._rereads = RereadDeadlines(window=config.reread_window, short_try=config.reread_try)
        self._along = FetchedAlong(self._inflight, store, within=within, amplifier=(
            Amplifier(neighbours, largest=min(config.amplify, config.max_request))
            if neighbours is not None and config.amplify > 0 and peers is None else None))
        """What a range fetches along: the chunks after a demand miss, a gzip span's others."""
        self._disk_ahead = DiskAhead.of(store, followers, neighbours)
        """What a read from the node cache that waits for the disk asks the disk for along."""
        if store is not None and store.later is None:
            store.later = BACKGROUND.submit  # the rest of an entry a read found on disk
        self._for_peers = Together(nursery, lambda new: self._to_origin(new, False, True, owner=True))
        """The chunks peers' requests want from the origin at once (``get_payload``)."""
        self._for_peers_later = Together(nursery, lambda new: self._to_origin(new, True, True, owner=True))
        """The same for peers' prefetch: background ranges, which wait while reads (this
        node's, or any peer's) are fetched, and which such a read takes a chunk over from."""

    async def get(self, chunks: Sequence[Chunk], *, background: bool = False,
                  use_peers: bool = True, speculative: bool = False) -> dict[ChunkDigest, bytes | memoryview]:
        """The uncompressed, verified bytes of ``chunks``, fetched and cached.

        Raises a ``FetchError`` (``UnreachableError`` past the deadline, ``IntegrityError``
        for bad bytes) if any of them cannot be had. ``use_peers=False`` goes to the
        origin alone (an owner serving a peer never asks another peer: no loops).
        ``speculative`` (readahead: nobody waits for it yet) hedges to the origin only
        after five hedge delays, so that guesses do not add to the origin's load."""
        waits = await self._wait(chunks, background, use_peers, speculative)
        return {c.digest: p.data for c, p in waits if p.data is not None}

    async def read(self, chunks: Sequence[Chunk], *, speculative: bool = False
                   ) -> tuple[dict[ChunkDigest, bytes | memoryview], Set[ChunkDigest]]:
        """For a reader of the mount: the bytes of ``chunks``, each from the node cache if
        it holds it, else as ``get`` fetches them; and the digests of those the cache had.
        One in-flight entry covers a chunk from its read of the cache to the end of its
        fetch (``inflight.py``): a reader joins whatever is loading it."""
        if self._store is None:
            hits: dict[ChunkDigest, bytes | memoryview] = {}
            rest = list(chunks)
        else:
            hits, rest = await self._inflight.from_cache(
                chunks, functools.partial(self._verifier.cached, self._store))
        if not rest:
            return hits, hits.keys()
        fetched = await self.get(rest, speculative=speculative)
        return {**hits, **fetched}, hits.keys()

    async def get_payload(self, chunk: Chunk, *, background: bool = False) -> bytes:
        """The verified stored payload of one chunk (what a peer is sent), fetched from the
        origin (never from peers) and cached, once however many peers ask. The chunks that
        the tasks running at once ask for are planned together (``together``): neighbours
        in one range request. ``background`` (a peer's prefetch) fetches as this node's
        own prefetch does: after the reads in flight, a read taking a chunk over."""
        [(_, p)] = await self._wait([chunk], background, False)
        if p.payload is None:  # it joined a load from the node cache, which keeps plain bytes
            assert p.data is not None
            payload = await trio.to_thread.run_sync(stored_payload, p.data, chunk)
            if payload is None:
                raise FetchError(f"chunk {chunk.hexdigest[:16]} does not encode to its stored form")
            return bytes(payload[1])
        return bytes(p.payload)

    async def _wait(self, chunks: Sequence[Chunk], background: bool,
                    use_peers: bool, speculative: bool = False) -> list[tuple[Chunk, Pending]]:
        started = trio.current_time()
        deadline = self.config.background_deadline if background else self.config.deadline
        began = None
        if not background and self._rereads:
            began = self._rereads.continues(c.digest for c in chunks)
        budget = self._rereads.budget(began, started, deadline)
        if began is not None:  # a re-read of what just failed: the same deadline
            started = began
        waits, mine = self._start(chunks, background, use_peers, speculative)
        waited = time.monotonic()
        try:
            with trio.move_on_after(budget) as scope:
                for i in range(len(waits)):
                    c, p = waits[i]
                    if not p.event.is_set():  # a set event's wait is still a trip through the
                        await p.event.wait()  # scheduler: one per chunk adds up over an image
                    if p.error is not None and not background and c.digest not in mine:
                        # It joined a fetch begun before this read, which failed (perhaps
                        # in an outage since over): one fresh try in the time left, for
                        # every chunk of it so far in that case (merged as usual).
                        again = [j for j, (cj, pj) in enumerate(waits) if cj.digest not in mine
                                 and pj.event.is_set() and pj.error is not None]
                        fresh, _ = self._start([waits[j][0] for j in again], background, use_peers,
                                               speculative)
                        for j, pair in zip(again, fresh, strict=True):
                            waits[j] = pair
                            mine.add(pair[0].digest)
                        c, p = waits[i]
                        await p.event.wait()
                    if p.error is not None:
                        raise p.error
                    assert p.data is not None
                await trio.lowlevel.checkpoint()
            if not background:
                self.stats.demand_wait_seconds += time.monotonic() - waited
            if scope.cancelled_caught:
                for _, p in waits:
                    if p.error is not None:
                        raise p.error
                late = next((c for c, p in waits if not p.event.is_set()), None)
                if late is not None:
                    self.stats.timeouts += 1
                    raise DeadlineError(
                        f"chunk {late.hexdigest[:16]} of blob {late.blob.digest[:19]} "
                        f"not fetched within {deadline:g}s"
                    ).about(chunk=late.hexdigest, blob=late.blob.digest)
                # everything arrived just as the deadline passed
        except FetchError:
            if not background and not speculative:
                self._rereads.failed((c.digest for c, p in waits if p.data is None), started)
            raise
        self._rereads.served((c.digest for c, _ in waits), began)
        return waits

    def _start(self, chunks: Sequence[Chunk], background: bool, use_peers: bool,
               speculative: bool) -> tuple[list[tuple[Chunk, Pending]], set[ChunkDigest]]:
        """The pending fetch of each chunk, joined if one is in flight, else started;
        and the digests of those this call started (or took over from the prefetch)."""
        waits: list[tuple[Chunk, Pending]] = []
        new: list[Chunk] = []
        own: dict[ChunkDigest, Pending] = {}
        taken: list[tuple[Chunk, Pending, Underway]] = []
        seen: set[bytes] = set()
        for c in chunks:
            if c.digest in seen:
                continue
            seen.add(c.digest)
            p = self._inflight.get(c.digest)
            if p is None:
                p = self._inflight.start(c.digest, queued=background)
                new.append(c)
            elif p.queued and not background:
                # A prefetch of it waits for demand reads to end: fetch it now instead. Never
                # wait behind our own prefetch: a peer asking for this chunk may be what
                # our demand reads wait on, while its prefetch waits for its own reads
                # to end (a deadlock across nodes).
                p.queued = False
                new.append(c)
            elif not background and (under := p.range) is not None:
                # A background range has it under way, and checks and writes its chunks
                # at a low priority: a reader does not wait for that.
                if under.data is not None:  # its bytes are here: check this chunk now
                    p = Pending()
                    taken.append((c, p, under))
                elif speculative or self.peers is not None or not use_peers:
                    # readahead, or a node in a cluster (its reads, or a peer's for a chunk
                    # it owns): join the range, which stops giving way. Fetching the chunk
                    # alone would make the origin send it twice, and a cluster's point is
                    # that the origin sends each chunk about once.
                    under.wanted = True
                else:  # still on the network, up to background_max_request bytes of it:
                    # fetch this one chunk alone (its bytes come twice)
                    p = own[c.digest] = Pending()
            elif not background and self._route is not None:  # a prefetch's peer batch has it
                self._route.hurry(c.digest)
            waits.append((c, p))
        started = {c.digest for c in new} | own.keys() | {c.digest for c, _, _ in taken}
        self._fetch_new(new, background, use_peers, speculative)
        for c, p, under in taken:
            self._nursery.start_soon(self._verifier.take_checked, c, p, under, self.source_name)
        if own:
            alone = [c for c, _ in waits if c.digest in own]
            gaps = self._route is None or not use_peers
            for rng in plan_fetch(alone, self.config, background=False, gaps=gaps):
                self._nursery.start_soon(self._fetch_range, rng, False, own)
        return waits, started

    def _fetch_new(self, new: list[Chunk], background: bool, use_peers: bool, speculative: bool) -> None:
        """Start fetching chunks whose in-flight entries this call made (or took over):
        each from its owner among the peers, the rest in range requests to the origin."""
        if self._origin is None:  # the node cache alone: what it lacks cannot be had
            for c in new:
                p = self._inflight[c.digest]
                p.error = UnreachableError(f"chunk {c.hexdigest[:16]} is not cached and the mount is offline")
                p.event.set()
                self._inflight.done(c.digest, p)
            return
        if self._route is not None and use_peers and new:
            to_origin = []
            for c in new:
                if (asks := self._route.asks(c, background)) is None:
                    to_origin.append(c)
                else:
                    self._nursery.start_soon(self._fetch_via_peers, c, asks, background, speculative)
            new = to_origin
        elif not use_peers:  # for peers: with those of the others asking
            (self._for_peers_later if background else self._for_peers).add(new)
            return
        self._to_origin(new, background, self._route is None or not use_peers)

    def _to_origin(self, new: list[Chunk], background: bool, gaps: bool, owner: bool = False) -> None:
        for rng in plan_fetch(new, self.config, background=background, gaps=gaps, owner=owner):
            self._nursery.start_soon(self._fetch_range, self._along.grow(rng, background), background)

    def note_failed_read(self, chunks: Sequence[Chunk], began: float) -> None:
        """A demand read over ``chunks`` (begun at ``began``, trio time) failed: a re-read of
        any of them continues its deadline (see ``RereadDeadlines.failed_read``)."""
        self._rereads.failed_read((c.digest for c in chunks), began)

    async def _fetch_range(self, rng: Range, background: bool,
                           pendings: dict[ChunkDigest, Pending] | None = None) -> None:
        """Fetch, check and hand over one range; ``pendings`` (a demand fetch of chunks
        that a background range is fetching too) instead of the in-flight map's."""
        assert self._origin is not None  # a fetcher without a source fetches nothing (_fetch_new)
        entries = pendings or self._inflight
        queued = {c.digest: entries[c.digest] for c in rng.chunks}
        fetching: Range | None = None if background else rng
        work = Underway(rng.start)
        try:
            if background:
                async with self._background:
                    await self.gate.wait_idle()
                    fetching = claim(rng, queued)
                    if fetching is None:
                        return  # every chunk was taken over by a demand fetch
                    rng = fetching
                    work.start = rng.start
                    for c in rng.chunks:
                        queued[c.digest].range = work
                    data = work.data = await self._origin.request(rng, self.config.background_deadline)
            else:
                self.stats.demand_requests += 1
                with self.gate.demand():
                    data = await self._origin.request(rng, self.config.deadline)
            whole = memoryview(data)
            spans = InflatedRange(rng, whole) if is_gzip(rng) else None  # one inflate for all parts
            for part in asked_first(rng):
                at = part.start - rng.start
                await self._hand_over(part, whole[at : at + part.end - part.start], rng,
                                      background, queued, work, spans)
        except FetchError as exc:
            self.stats.failed_requests += 1
            log.warning("fetching %d chunk(s) of blob %s [%d, %d) from %s failed: %s",
                        len(rng.chunks), rng.blob, rng.start, rng.end, self.source_name, exc)
            exc.about(blob=rng.blob, source=self.source_name,
                      chunk=rng.chunks[0].hexdigest if len(rng.chunks) == 1 else None)
            for c in fetching.chunks if fetching else ():
                queued[c.digest].error = exc
        except Exception as exc:  # a bug must fail the read, never the whole mount
            self.stats.failed_requests += 1
            log.exception("unexpected error fetching blob %s [%d, %d)", rng.blob, rng.start, rng.end)
            for c in fetching.chunks if fetching else ():
                queued[c.digest].error = FetchError(f"unexpected error fetching blob {rng.blob}: {exc!r}")
        finally:
            for c in fetching.chunks if fetching else ():  # the chunks this task fetched
                self._settle(c, queued[c.digest])

    async def _hand_over(self, rng: Range, data: bytes | bytearray | memoryview, sent: Range,
                         background: bool, queued: dict[ChunkDigest, Pending], work: Underway,
                         spans: InflatedRange | None) -> None:
        """Check the chunks of ``rng`` (``data`` is its bytes; ``sent`` the request they came
        in), wake their readers, cache the good ones. A neighbour (``rng.neighbours``) that
        fails its check is dropped: nobody asked for it, and a later read fetches it again."""
        in_order = [queued[c.digest] for c in rng.chunks]
        # the prefetcher's chunks are cached with their check
        if not background:
            results = await self._verifier.range(rng, data, spans=spans)
        elif self.peers is not None:
            # in a cluster, peers wait for these chunks (see ``background_pause``)
            results = await self._verifier.range(rng, data, self._store, spans=spans)
        else:
            results = await self._verifier.range(
                rng, data, self._store, functools.partial(self.gate.give_way, work), spans)
        view = memoryview(data)
        # bytes from a mirror that fail their check are asked for again from the next
        # source (the registry last), once: the mirror is skipped from now on (neighbours
        # are not asked again: nobody waits for them)
        again = (any(isinstance(r, ChunkDecodeError) for r in results)
                 and self._origin is not None and self._origin.blame(sent)
                 and not rng.neighbours)
        retry: list[Chunk] = []
        for c, p, result in zip(rng.chunks, in_order, results, strict=True):
            if isinstance(result, ChunkDecodeError):
                self.stats.integrity_failures += 1
                log.error(
                    "chunk %s at %d in blob %s from %s failed verification (%s); not cached",
                    c.hexdigest, c.offset, c.blob.digest, self.source_name, result,
                )
                if again:
                    retry.append(c)
                    continue
                p.error = integrity_error(c, self.source_name)
                continue
            p.data = result
            at = c.offset - rng.start
            p.payload = view[at : at + c.stored_size]
            self.stats.chunks_fetched += 1
            if not background:  # the prefetcher's chunks were cached with their check
                await self._writer.keep(c, p, background)
        self.stats.neighbours += sum(p.data is not None for p in in_order) if rng.neighbours else 0
        for sub in plan_ranges(retry, max_request=self.config.max_request, max_gap=0):
            await self._fetch_range(sub, False, {c.digest: queued[c.digest] for c in sub.chunks})
        for c, p in zip(rng.chunks, in_order, strict=True):
            self._settle(c, p)

    def _settle(self, c: Chunk, p: Pending) -> None:
        """Wake the readers of a chunk this task fetched (with an error if it has neither
        bytes nor one) and end its in-flight entry, unless the cache write still holds it."""
        if p.data is None and p.error is None:
            p.error = FetchError(f"chunk {c.hexdigest[:16]} was not fetched")
        p.event.set()
        if not p.caching:
            self._inflight.done(c.digest, p)

    async def _fetch_via_peers(self, c: Chunk, asks: Asks, background: bool,
                               speculative: bool = False) -> None:
        """One chunk by the peer route (``peerroute.py``): its owner, the next owner, then
        the origin; a background one waits its turn and may be taken over meanwhile."""
        assert self._route is not None
        p = self._inflight[c.digest]
        mine = not background  # a queued background fetch may be taken over (see _wait)
        try:
            if background:
                async with self._peer_background:
                    await self.gate.wait_idle()
                    if not p.queued:
                        return  # a demand fetch took it over
                    p.queued, mine = False, True
                    plain, payload = await self._route.background(c, asks)
            else:
                plain, payload = await self._route.demand(c, asks, speculative=speculative)
            p.data, p.payload = plain, payload
            self.stats.chunks_fetched += 1
            await self._writer.keep(c, p, background)
        except FetchError as exc:
            self.stats.failed_requests += 1
            log.warning("fetching chunk %s of blob %s failed: %s", c.hexdigest[:16], c.blob.digest, exc)
            p.error = exc.about(chunk=c.hexdigest, blob=c.blob.digest)
        except Exception as exc:  # a bug must fail the read, never the whole mount
            self.stats.failed_requests += 1
            log.exception("unexpected error fetching chunk %s", c.hexdigest)
            p.error = FetchError(f"unexpected error fetching chunk {c.hexdigest[:16]}: {exc!r}")
        finally:
            if mine:
                self._settle(c, p)

    async def _from_origin(self, c: Chunk, background: bool) -> Verified:
        """One chunk from the origin alone, checked: the peer route's last attempt."""
        assert self._origin is not None
        if background:
            async with self._background:
                return await self._origin.chunk(c, self.config.background_deadline, self._verifier)
        return await self._origin.chunk(c, self.config.deadline, self._verifier)

    def _answered(self, source: str, nbytes: int, seconds: float) -> None:
        _ = self.on_request is not None and self.on_request(source, nbytes, seconds)

