"""Chunks from the other nodes of a cluster: who owns a chunk, how to ask, when to give up.

    rendezvous(digest, peers)   peers in order of preference for one chunk (highest
                                random weight first): the first is its owner, and the
                                whole cluster agrees without a coordinator; when a peer
                                leaves, only the chunks it owned move
    PeerSet                     the peer list (re-read from the peers file when it
                                changes), which peers to avoid for now, bytes per peer
    PeerClient                  GET /v1/chunks/<blake3 hex> with the cluster token, or
                                POST /v1/chunks for many (``peerbatch``); also
                                GET /v1/traces/sha256:<hex>, an image's prefetch trace,
                                and GET /v1/blobs/sha256:<hex>, a whole blob (an index)
                                streamed to disk and checked against its digest

A chunk's attempts (``fetcher.race``) are its owner, the next owner in rendezvous order,
then the origin.
The next owner is what the whole cluster falls back to when the owner is down or slow,
so it too fetches from the origin once for everyone; the origin comes last because it
must always work.

Requests that may wait only go up a chunk's rendezvous order (a node asks the peers that
come before it; the prefetcher's cache-only questions to the next peer never wait), and a
peer asked for a chunk fetches it from the origin, never from another peer;
a node's server never waits behind that node's own queued prefetch (see
``ChunkFetcher``). So nodes cannot wait on each other in a cycle.

A peer is never trusted: the fetcher checks every payload against the chunk's digest and
reports a peer that sends wrong bytes with ``PeerSet.mark_bad``. A peer that is down is
skipped with exponential backoff. The request carries what the owner needs to fetch the
chunk from the origin itself (blob, offset, sizes, codec, repository); credentials are
the owner's own.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypedDict, TypeVar

import trio
import xxhash

from blockindex.format import Chunk
from cache.atomic import temp_path

from .address import parse_url
from .errors import AuthError, FetchError, IntegrityError, NotFoundError, RefusedError, ServerError
from .http1 import RangeClient, StreamReader, UnexpectedResponse
from .peerwire import (
    BATCH_PATH,
    NODE_HEADER,
    TRACE_PATH,
    authorization,
    batch_body,
    blob_target,
    chunk_target,
    normalize_url,
    sent_size,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

def _weight(peer: str, digest: bytes) -> int:
    return xxhash.xxh3_64_intdigest(peer.encode() + b"\0" + digest)


def rendezvous(digest: bytes, peers: Sequence[str]) -> list[str]:
    """``peers`` ordered by their weight for ``digest``, highest first (HRW hashing)."""
    return sorted(peers, key=lambda p: (_weight(p, digest), p), reverse=True)


def read_peers_file(path: Path) -> list[str]:
    """Peer URLs, one a line; blank lines and ``#`` comments are skipped. ValueError for
    a line that is not a peer URL."""
    out: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            url = normalize_url(line)
        except ValueError:  # the line is not repeated: a file named by mistake may hold a secret
            raise ValueError(f"{path}:{n}: not a peer URL (expected http://HOST:PORT, "
                             "port 1-65535)") from None
        if url not in out:
            out.append(url)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """How this node uses its peers."""

    hedge_delay: float = 0.08
    """Seconds to wait for a peer before asking the origin as well (a hedged request);
    raised adaptively to 3x the peers' observed latency, up to ``max_hedge_delay``."""
    max_hedge_delay: float = 1.0
    hedge_rate: float = 4 << 20
    """Bytes a second: a chunk's stored size over this is added to its hedge delay. The
    owner of a chunk it lacks fetches it whole from the origin, which the whole cluster
    shares, before it sends a byte: a large chunk (0.5-1 MiB) was hedged where small ones
    were not, and fetched by the next owner too (8 nodes on two cores: 29 hedges a run,
    4.2 of 29 MiB at the origin sent twice or more)."""
    hedge_budget: float = 0.02
    """At most this fraction of peer requests (plus a small burst) is hedged: past it a
    request waits for its peer alone (until ``request_deadline``, then the origin), so a
    busy cluster cannot turn hedges into a second full load on the origin ("The Tail at
    Scale" limits hedged requests the same way)."""
    request_deadline: float = 10.0
    """Seconds one peer request may take in all (the owner may be fetching from the origin)."""
    down_backoff: float = 1.0
    """First pause after a peer is found down; doubles on each failure, up to ``max_backoff``."""
    refused_backoff: float = 0.05
    """The same when it refused the connection (``RefusedError``): nothing listens there,
    which is a node still starting as often as one that has stopped, and asking again
    costs one round trip. While a peer is skipped, the next owner fetches its chunks from
    the origin, and the owner fetches them again when it is back: nodes of a cluster
    started together saw 1.1-1.3x the image's bytes at the origin with 1 s here."""
    max_backoff: float = 60.0
    bad_peer_penalty: float = 300.0
    """Seconds a peer that sent wrong bytes is avoided."""
    background_concurrency: int = 8
    """Peer requests of the prefetcher in flight at once."""
    owners_asked: int = 2
    """Peers asked for one chunk before the origin: its owner, then the next owner."""
    reload_interval: float = 2.0
    """Seconds between checks of the peers file's mtime."""
    trace_peers: int = 8
    """Peers asked for an image's trace, in the rendezvous order of its manifest digest:
    every node asks the same few, so traces gather there and a big cluster is not asked
    one request per node."""
    trace_hedge_delay: float = 1.0
    """Seconds to wait for a peer's trace before asking the next peer as well."""


@dataclasses.dataclass
class PeerHealth:
    avoid_until: float = 0.0
    failures: int = 0
    bad_chunks: int = 0
    bytes: int = 0
    chunks: int = 0
    errors: int = 0


class PeerStats(TypedDict):
    """What ``lazyfs status`` shows of one peer."""

    bytes: int
    chunks: int
    errors: int
    bad_chunks: int
    avoided_for: float


class PeerSet:
    """The peers this node may ask, and what it has learnt about each.

    ``self_url`` is this node's own URL (its ``--listen``): a chunk this node owns goes
    straight to the origin."""

    def __init__(self, peers: Sequence[str] = (), *, self_url: str | None = None,
                 config: PeerConfig = PeerConfig(), clock: Callable[[], float] = time.monotonic,
                 served_elsewhere: bool = False) -> None:
        self.config = config
        self.self_url = normalize_url(self_url) if self_url else None
        self.served_elsewhere = served_elsewhere
        """``self_url`` is served by another process of this node (its ``lazyfs peer``):
        what this node would fetch from the origin as a chunk's owner or next owner, it
        asks there, so that the node fetches it once (that process's in-flight map)
        however many of its mounts and other nodes want it at once."""
        self._clock = clock
        self.peers: list[str] = []
        self.health: dict[str, PeerHealth] = {}
        self.latency = 0.0  # EWMA of successful peer requests, seconds
        self._recent: collections.deque[float] = collections.deque(maxlen=64)
        self._also_self: set[str] = set()  # other URLs this node turned out to have
        self.set_peers(peers)

    def set_peers(self, peers: Sequence[str]) -> None:
        self.peers = [normalize_url(p) for p in peers]
        for p in self.peers:
            self.health.setdefault(p, PeerHealth())

    def owners(self, digest: bytes, limit: int = 2) -> list[str]:
        """The peers to ask for ``digest`` before the origin, in order: its owner and the
        next owners in rendezvous order (at most ``limit``), skipping peers being avoided
        and stopping at this node, which fetches what it owns from the origin itself (or,
        ``served_elsewhere``, through its node's ``lazyfs peer``, the last one asked).
        Every node computes the same list, so a failed owner's chunks all go to one next
        owner, which asks the origin once for the whole cluster."""
        now = self._clock()
        out: list[str] = []
        for p in rendezvous(digest, self.peers):
            if len(out) == limit:
                break
            if self._is_self(p):
                if self.served_elsewhere and self.health[p].avoid_until <= now:
                    out.append(p)
                break
            if self.health[p].avoid_until <= now:
                out.append(p)
        return out

    def trace_holders(self, manifest_digest: bytes) -> list[str]:
        """The peers to ask for an image's trace, in order: the owner of its manifest
        digest and the next ones in rendezvous order, at most ``config.trace_peers``,
        without this node and peers being avoided."""
        now = self._clock()
        usable = [p for p in rendezvous(manifest_digest, self.peers)
                  if not self._is_self(p) and self.health[p].avoid_until <= now]
        return usable[:self.config.trace_peers]

    def runner_up(self, digest: bytes) -> str | None:
        """For a chunk ``owners`` sends to the origin (this node is first among the usable
        peers): the next usable peer in its order, asked cache-only, since a node that
        prefetched before may hold it. Skipping avoided peers matters with three nodes or
        more: when the owner is down and this node comes next, another peer may have it."""
        now = self._clock()
        return next((p for p in rendezvous(digest, self.peers)
                     if not self._is_self(p) and self.health[p].avoid_until <= now), None)

    def mark_self(self, peer: str) -> None:
        """``peer`` turned out to be this node: from now on it is treated as this node (and
        is ``self_url`` if that was unknown)."""
        if not self._is_self(peer):
            log.warning("peer %s is this node (its --advertise URL is %s); treating it as this node",
                        peer, self.self_url or "not set")
            self._also_self.add(peer)
            self.self_url = self.self_url or peer

    def is_self(self, peer: str) -> bool:
        """Whether ``peer`` is this node."""
        return self._is_self(peer)

    def _is_self(self, peer: str) -> bool:
        return peer == self.self_url or peer in self._also_self

    def hedge_delay(self, nbytes: int = 0) -> float:
        """Seconds to wait for a peer before the next source, for a chunk of ``nbytes``
        stored bytes (``hedge_rate``)."""
        c = self.config
        base = min(c.max_hedge_delay, max(c.hedge_delay, 3 * self.latency, 1.5 * self.p95()))
        return base + nbytes / c.hedge_rate

    def p95(self) -> float:
        """The 95th percentile of recent peer latencies (0 before 20 observations): hedging
        past it ("The Tail at Scale") costs the origin about 5% extra, not a burst."""
        if len(self._recent) < 20:
            return 0.0
        ordered = sorted(self._recent)
        return ordered[int(0.95 * (len(ordered) - 1))]

    def may_hedge(self, hedged: int, requests: int) -> bool:
        """Whether one more hedge stays within the budget, given the hedges and peer
        requests so far."""
        return hedged < self.config.hedge_budget * requests + 3

    def mark_ok(self, peer: str, nbytes: int, seconds: float | None) -> None:
        """``peer`` sent a chunk that passed its check, in ``seconds`` (None: a prefetch's,
        whose wait in a batch says nothing of the latency a read sees)."""
        h = self.health[peer]
        h.failures = 0
        h.bytes += nbytes
        h.chunks += 1
        if seconds is None:
            return
        self.latency = seconds if not self.latency else 0.8 * self.latency + 0.2 * seconds
        self._recent.append(seconds)

    def mark_down(self, peer: str, reason: object) -> None:
        h = self.health[peer]
        h.errors += 1
        first = self.config.refused_backoff if isinstance(reason, RefusedError) else self.config.down_backoff
        pause = min(self.config.max_backoff, first * 2 ** min(h.failures, 16))
        h.failures += 1
        h.avoid_until = max(h.avoid_until, self._clock() + pause)
        level = logging.WARNING if h.failures == 1 else logging.DEBUG
        log.log(level, "peer %s: %s; skipping it for %.1fs", peer, reason, pause)

    def mark_sent(self, peer: str, nbytes: int) -> None:
        """``peer`` sent a whole blob that passed its check (its time says nothing of a
        chunk's latency, so the hedge delay does not learn from it)."""
        h = self.health[peer]
        h.failures = 0
        h.bytes += nbytes

    def mark_bad(self, peer: str, what: str, reason: object) -> None:
        """``peer`` sent wrong bytes for ``what`` (``chunk <hex>``, ``blob <digest>``)."""
        h = self.health[peer]
        h.bad_chunks += 1
        h.avoid_until = self._clock() + self.config.bad_peer_penalty
        log.error("peer %s sent wrong bytes for %s (%s); avoiding it for %gs",
                  peer, what, reason, self.config.bad_peer_penalty)

    def stats(self) -> dict[str, PeerStats]:
        now = self._clock()
        return {p: {"bytes": h.bytes, "chunks": h.chunks, "errors": h.errors, "bad_chunks": h.bad_chunks,
                    "avoided_for": round(max(0.0, h.avoid_until - now), 1)}
                for p, h in self.health.items()}

    def bad_peers(self) -> list[str]:
        return [p for p, h in self.health.items() if h.bad_chunks]


class PeersFileWatcher:
    """Keeps a ``PeerSet`` equal to a peers file, checking its mtime every few seconds."""

    def __init__(self, path: Path, peers: PeerSet) -> None:
        self.path = path
        self.peers = peers
        self._mtime: int | None = None

    def load(self) -> bool:
        """Re-read the file if it changed; True if it did. A missing or bad file keeps
        the last good list (and says so in the log)."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime:
                return False
            urls = read_peers_file(self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if self._mtime != -1:
                log.warning("peers file %s unusable (%s); keeping %d peers", self.path, exc,
                            len(self.peers.peers))
            self._mtime = -1
            return False
        self._mtime = mtime
        self.peers.set_peers(urls)
        log.info("peers: %s", " ".join(urls) or "(none)")
        return True

    async def run(self) -> None:
        while True:
            await trio.sleep(self.peers.config.reload_interval)
            await trio.to_thread.run_sync(self.load)


class PeerIsSelf(ServerError):
    """The peer asked is this very process (its chunk server said so): the peers file
    names this node by an address other than its ``--advertise`` URL."""


class PeerClient:
    """Asks peers for chunks: one keep-alive connection pool per peer. ``node_id``
    (shared with this process's chunk server) lets a server recognise a request from
    its own process and say so, rather than wait on the very fetch that asked it."""

    def __init__(self, token: str, *, connect_timeout: float = 2.0, node_id: str | None = None) -> None:
        self._auth = {"Authorization": authorization(token)}
        if node_id:
            self._auth[NODE_HEADER] = node_id
        self._clients: dict[str, RangeClient] = {}
        self._connect_timeout = connect_timeout
        self.side_index: str | None = None
        """The digest of the side index the image is read by, if it is (one mount's client,
        one image): sent with its gzip spans, so that an owner that lacks one finds its
        checkpoint there."""

    def _client(self, peer: str) -> RangeClient:
        c = self._clients.get(peer)
        if c is None:
            url = parse_url(peer, schemes=("http",), port_required=True)
            assert url.port is not None
            c = self._clients[peer] = RangeClient(url.host, url.port,
                                                  connect_timeout=self._connect_timeout)
        return c

    async def fetch(self, peer: str, chunk: Chunk, repository: str | None) -> bytearray:
        """The stored payload of ``chunk`` (unverified; a gzip span's or member's plain
        bytes: ``peerwire.sends_plain``). ``repository`` (``registry/repo``) lets an owner
        that lacks the chunk fetch it from the origin (a gzip span's checkpoint from
        ``side_index``); without it the peer answers from its cache alone (404 if it lacks
        it)."""
        try:
            # a peer's answer is the chunk, no more: anything longer is a failed source
            target = chunk_target(chunk, repository, self.side_index)
            return await self._client(peer).get_range(target, 0,
                                                      sent_size(chunk), self._auth, whole_ok=False)
        except UnexpectedResponse as exc:
            if exc.status == 404:
                raise ServerError(f"peer {peer} has no chunk {chunk.hexdigest[:16]} (404)") from None
            raise _refusal(peer, exc.status, "") from None

    async def fetch_batch(self, peer: str, chunks: Sequence[Chunk], repository: str | None,
                          read: Callable[[StreamReader], Awaitable[T]], *, deadline: float,
                          prefetch: bool = False) -> T:
        """Ask ``peer`` for ``chunks`` in one request (``peerwire``'s batch; ``prefetch``:
        nobody reads them yet) and hand its answer to ``read`` as it arrives
        (``peerbatch.read_frames``); the errors of ``fetch``."""
        try:
            body = batch_body(chunks, repository, prefetch, self.side_index)
            return await self._client(peer).post(BATCH_PATH, body, self._auth, read, deadline=deadline)
        except UnexpectedResponse as exc:
            raise _refusal(peer, exc.status, " for a batch") from None

    async def fetch_trace(self, peer: str, manifest: str, max_size: int) -> bytearray:
        """The trace document ``peer`` keeps for image ``manifest`` (unchecked: see
        ``lazyfs.learned``). ``NotFoundError`` when it has none; ``ServerError`` for one
        over ``max_size`` bytes (not read)."""
        try:
            return await self._client(peer).get(f"{TRACE_PATH}{manifest}", max_size, self._auth)
        except UnexpectedResponse as exc:
            if exc.status == 404:
                raise NotFoundError(f"peer {peer} has no trace of {manifest} (404)") from None
            raise _refusal(peer, exc.status, " for a trace") from None

    async def download_blob(self, peer: str, digest: str, size: int, path: Path,
                            repository: str | None, *, deadline: float) -> None:
        """Stream blob ``digest`` (``size`` bytes, as its descriptor declares) from ``peer``
        into ``path``, written whole or not at all once it matches its digest
        (``IntegrityError`` if it does not: a peer that lies). ``repository`` lets a peer
        that lacks it fetch it from the origin; ``deadline`` (trio's clock) ends it all."""
        tmp = trio.Path(temp_path(path))
        hasher = hashlib.sha256()
        try:
            async with await trio.open_file(tmp, "wb") as f:
                async def write(piece: memoryview) -> None:
                    hasher.update(piece)
                    await f.write(piece)
                try:
                    await self._client(peer).download(blob_target(digest, size, repository), size,
                                                      write, self._auth, deadline=deadline)
                except UnexpectedResponse as exc:
                    if exc.status == 404:
                        raise ServerError(f"peer {peer} has no blob {digest} (404)") from None
                    raise _refusal(peer, exc.status, f" for blob {digest}") from None
            if f"sha256:{hasher.hexdigest()}" != digest:
                raise IntegrityError(f"peer {peer} sent a blob that does not match its digest {digest}")
            await tmp.rename(path)
        finally:
            if await tmp.exists():
                await tmp.unlink()

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()


@dataclasses.dataclass
class PeerTier:
    """What a ``ChunkFetcher`` needs to ask peers before the origin."""

    peers: PeerSet
    client: PeerClient
    repository: str | None = None
    """``registry/repository`` of the image, sent so that an owner can fetch from the origin."""


def _refusal(peer: str, status: int, what: str) -> FetchError:
    """The error for a peer's answer other than the bytes or a 404."""
    if status == 401:
        return AuthError(f"peer {peer} refused the cluster token (401)")
    if status == 503:
        return ServerError(f"peer {peer} is busy (503)")
    if status == 508:
        return PeerIsSelf(f"peer {peer} is this node")
    return ServerError(f"peer {peer}: unexpected status {status}{what}")
