"""Many chunks in one request to a peer: the chunks a node asks one peer for at about the
same time go as one batch (``POST /v1/chunks``, ``peerwire``), not one request each.

    batcher = PeerBatcher(client, nursery, deadline=10.0)
    payload = await batcher.fetch(peer, chunk, repository, background=False, pulse=pulse)

Each ``fetch`` is one chunk's attempt (``peerroute``), and stays one: it joins the batch
being gathered for that peer (same repository, demand or background), which is sent once
the tasks started along with it have had their turn to join (a few trips through the
scheduler, no sleep), or at once when it is full (``MAX_BATCH_CHUNKS``,
``MAX_BATCH_BYTES``). A batch of one chunk goes as a plain ``GET``. The chunks of an
answer are handed to their callers as they arrive, unverified: each caller checks its
own, so a peer that lies about one chunk fails that chunk alone. A frame announcing more
bytes than its chunk has, a chunk not asked for, or an answer cut short fails the chunks
not yet answered (their callers go on to the next source); the bytes of the chunks
already answered stay good.

Each frame that arrives beats the ``race.Pulse`` of every caller still waiting in its
batch: an owner that streams a large batch slowly but steadily is alive, and its late
chunks are not hedged to the origin (``race``); one that falls silent is. A batch may
take ``deadline`` for a single chunk and up to twice that for a full one
(``bound``), so that one trickling a byte at a time still ends.

Background batches go at most ``background_requests`` at once (the prefetcher's share of
the peers), and only while no read waits for a fetch (the fetcher's ``DemandGate``);
demand batches never wait for them, and a reader that waits for a chunk a background
batch has (``hurry``) has it asked for in a demand batch too. A caller that gives up
(its chunk came from elsewhere) leaves its batch; a batch that nobody waits for any more
is not sent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from blockindex.format import Chunk, ChunkDigest

from .errors import DeadlineError, FetchError, ServerError
from .http1 import StreamReader
from .peers import PeerClient
from .peerwire import END, FRAME, MAX_BATCH_BYTES, MAX_BATCH_CHUNKS, OK, sent_size
from .race import Pulse

log = logging.getLogger(__name__)

_JOIN_TURNS = 3
"""Trips through the scheduler a new batch waits for its siblings: the fetcher starts a
chunk's attempt two turns after the request that wanted it."""
BACKGROUND_GATHER = 0.01
"""Seconds a background batch that is not full waits for more chunks: the prefetcher's
workers ask for their next chunks as each finishes a batch, a few milliseconds apart."""


class _Slot:
    __slots__ = ("chunk", "event", "payload", "error", "waiting", "pulses")

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.event = trio.Event()
        self.payload: bytearray | None = None
        self.error: FetchError | None = None
        self.waiting = 0
        self.pulses: list[Pulse] = []
        """Those of the callers waiting for it (beaten at each frame of its batch)."""

    def settle(self, answer: bytearray | FetchError) -> None:
        if self.event.is_set():
            return
        if isinstance(answer, FetchError):
            self.error = answer
        else:
            self.payload = answer
        self.event.set()


class _Batch:
    __slots__ = ("slots", "stored", "closed", "full")

    def __init__(self) -> None:
        self.slots: dict[ChunkDigest, _Slot] = {}
        self.stored = 0
        self.closed = False
        self.full = trio.Event()

    def put(self, slot: _Slot) -> None:
        self.slots[slot.chunk.digest] = slot
        self.stored += sent_size(slot.chunk)

    def takes(self, c: Chunk) -> bool:
        return not self.closed and (c.digest in self.slots or len(self.slots) < MAX_BATCH_CHUNKS
                                    and self.stored + sent_size(c) <= MAX_BATCH_BYTES)

    def add(self, c: Chunk) -> _Slot:
        slot = self.slots.get(c.digest)
        if slot is None:
            slot = self.slots[c.digest] = _Slot(c)
            self.stored += sent_size(c)
        return slot


class PeerBatcher:
    """Gathers each peer's chunks into batches sent from ``nursery``."""

    def __init__(self, client: PeerClient, nursery: trio.Nursery, *, deadline: float,
                 background_requests: int = 8,
                 wait_idle: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint) -> None:
        """``deadline``: seconds a batch may take in all (a peer request's deadline);
        ``wait_idle`` returns when no read waits for a fetch (``DemandGate``): a background
        batch is sent only then."""
        self._wait_idle = wait_idle
        self._client = client
        self._nursery = nursery
        self._deadline = deadline
        self._background = trio.CapacityLimiter(background_requests)
        self._open: dict[tuple[str, str | None, bool], _Batch] = {}
        self._prefetching: dict[ChunkDigest, tuple[tuple[str, str | None, bool], _Batch, _Slot]] = {}
        """The background slots being waited for, by digest: a reader may hurry them."""
        self.requests = 0
        """Requests sent to peers (a batch of one is a plain GET)."""

    def bound(self, stored: int) -> float:
        """Seconds a batch of ``stored`` bytes may take in all: ``deadline``, plus as much
        again for a full batch (``MAX_BATCH_BYTES``) in proportion to its bytes."""
        return self._deadline * (1 + min(stored, MAX_BATCH_BYTES) / MAX_BATCH_BYTES)

    async def fetch(self, peer: str, chunk: Chunk, repository: str | None, *,
                    background: bool = False, pulse: Pulse | None = None) -> bytearray:
        """The stored payload of ``chunk`` from ``peer`` (unverified), as ``PeerClient.fetch``
        gives it; ``repository`` None asks the peer's cache alone. ``pulse`` is beaten
        at each frame of the batch it goes in while it waits."""
        if sent_size(chunk) > MAX_BATCH_BYTES:
            self.requests += 1  # a huge chunk: alone
            return await self._client.fetch(peer, chunk, repository)
        key = (peer, repository, background)
        batch = self._batch_for(key, chunk)
        slot = batch.add(chunk)
        self._close_if_full(key, batch)
        slot.waiting += 1
        if pulse is not None:
            slot.pulses.append(pulse)
        if background:
            self._prefetching[chunk.digest] = (key, batch, slot)
        try:
            await slot.event.wait()
        finally:
            slot.waiting -= 1
            if pulse is not None:
                slot.pulses.remove(pulse)
            if background and self._prefetching.get(chunk.digest, (None, None, None))[2] is slot:
                del self._prefetching[chunk.digest]
        if slot.error is not None:
            raise slot.error
        assert slot.payload is not None
        return slot.payload

    def hurry(self, digest: ChunkDigest) -> None:
        """A reader waits for ``digest``: if a background batch is asking for it, ask for it
        in a batch of reads too (out of the background one if that is not sent yet); the
        first answer counts."""
        entry = self._prefetching.pop(digest, None)
        if entry is None or entry[2].event.is_set():
            return
        (peer, repository, _), batch, slot = entry
        if not batch.closed and batch.slots.get(digest) is slot:
            del batch.slots[digest]
            batch.stored -= sent_size(slot.chunk)
        key = (peer, repository, False)
        now = self._batch_for(key, slot.chunk)
        if digest not in now.slots:
            now.put(slot)
            self._close_if_full(key, now)

    def _batch_for(self, key: tuple[str, str | None, bool], chunk: Chunk) -> _Batch:
        """The open batch of ``key`` that can take ``chunk`` (a new one if need be)."""
        batch = self._open.get(key)
        if batch is None or not batch.takes(chunk):
            if batch is not None:
                self._close(key, batch)  # it goes as it is
            batch = self._open[key] = _Batch()
            self._nursery.start_soon(self._send, key, batch)
        return batch

    def _close_if_full(self, key: tuple[str, str | None, bool], batch: _Batch) -> None:
        if len(batch.slots) == MAX_BATCH_CHUNKS or batch.stored == MAX_BATCH_BYTES:
            self._close(key, batch)  # it goes as soon as its sender runs

    def _close(self, key: tuple[str, str | None, bool], batch: _Batch) -> None:
        batch.closed = True
        batch.full.set()
        if self._open.get(key) is batch:
            del self._open[key]

    async def _send(self, key: tuple[str, str | None, bool], batch: _Batch) -> None:
        peer, repository, background = key
        for _ in range(_JOIN_TURNS):
            if batch.closed:
                break
            await trio.lowlevel.checkpoint()
        if background and not batch.closed:
            with trio.move_on_after(BACKGROUND_GATHER):
                await batch.full.wait()
        async with self._background if background else contextlib.nullcontext():
            if background:
                await self._wait_idle()
            self._close(key, batch)
            slots = [s for s in batch.slots.values() if s.waiting]
            for s in batch.slots.values():
                if not s.waiting:
                    s.settle(ServerError("nobody waits for it"))
            if not slots:
                return
            log.debug("asking peer %s for %d chunks (%s)", peer, len(slots),
                      "prefetch" if background else "reads")
            self.requests += 1
            bound = self.bound(sum(s.chunk.stored_size for s in slots))
            try:
                with trio.fail_after(bound):
                    if len(slots) == 1:
                        slots[0].settle(await self._client.fetch(peer, slots[0].chunk, repository))
                    else:
                        await self._batch(peer, slots, repository, background, bound)
            except FetchError as exc:
                error: FetchError = exc
            except trio.TooSlowError:
                error = DeadlineError(f"peer {peer} did not answer {len(slots)} chunks within {bound:g}s")
            except Exception as exc:  # a bug must fail these chunks, never the mount
                log.exception("unexpected error asking peer %s for %d chunks", peer, len(slots))
                error = FetchError(f"unexpected error asking peer {peer}: {exc!r}")
            else:
                error = ServerError(f"peer {peer} did not answer for the chunk")
            for s in slots:
                s.settle(error)

    async def _batch(self, peer: str, slots: list[_Slot], repository: str | None, background: bool,
                     bound: float) -> None:
        by_digest = {s.chunk.digest: s for s in slots}

        def heard() -> None:  # a frame came: every caller still waiting in it is alive
            for s in slots:
                if not s.event.is_set():
                    for p in s.pulses:
                        p.beat()

        async def read(reader: StreamReader) -> None:
            await read_frames(peer, [s.chunk for s in slots], reader,
                              lambda c, answer: by_digest[c.digest].settle(answer), heard)

        await self._client.fetch_batch(peer, [s.chunk for s in slots], repository, read,
                                       deadline=trio.current_time() + bound, prefetch=background)


async def read_frames(peer: str, chunks: Sequence[Chunk], reader: StreamReader,
                      on_chunk: Callable[[Chunk, bytearray | FetchError], object],
                      heard: Callable[[], object] = lambda: None) -> None:
    """Hand each chunk of a batch answer to ``on_chunk`` as its frame arrives: its payload,
    or the error the peer gave for it; ``heard()`` at each frame's head and end.
    ``ServerError`` for a frame that cannot be right (more bytes than the chunk has, a
    chunk not asked for or sent twice): the rest of the answer cannot be trusted to be
    framed."""
    wanted = {c.digest: c for c in chunks}
    while True:
        digest, status, _codec, _size, length = FRAME.unpack(await reader.exactly(FRAME.size))
        heard()
        if status == END:
            return
        c = wanted.pop(ChunkDigest(digest), None)
        if c is None:
            raise ServerError(f"peer {peer} answered chunk {digest.hex()[:16]}, not asked for (or twice)")
        if status != OK:
            if length:
                raise ServerError(f"peer {peer} sent bytes with a failure of chunk {c.hexdigest[:16]}")
            why = "does not have it" if status == 1 else "could not fetch it"
            on_chunk(c, ServerError(f"peer {peer} {why}: chunk {c.hexdigest[:16]}"))
            continue
        if length > sent_size(c):  # never read more than the chunk: a failed source
            raise ServerError(f"peer {peer} announced {length} bytes for chunk {c.hexdigest[:16]} "
                              f"of {sent_size(c)}")
        payload = await reader.exactly(length)  # a short one fails its check, alone
        heard()
        on_chunk(c, payload)
