"""Serve the node's cached chunks to the other nodes of a cluster (``lazyfs peer``, and
``lazyfs mount --listen``).

    GET /v1/chunks/<blake3 hex>[?blob=&offset=&stored=&size=&codec=&repo=&index=]
        Authorization: Bearer <cluster token>      401 without it (compared in constant time)
        200/206  the payload as stored in the blob (a gzip span's or member's: its plain
                 bytes, codec raw); X-Lazyfs-Codec, X-Lazyfs-Size headers
        400      a head that cannot be parsed (the connection is then closed)
        404      not cached, and the query does not say where it comes from
        502      the owner could not get it from the origin
        503      ``max_concurrent`` requests in progress, and ``max_waiting`` waiting for one
                 of them to end already, or no room within ``max_wait`` seconds
        508      the request came from this very process (its ``X-Lazyfs-Node`` id): the
                 caller's peers file names this node by another address

    GET /v1/blobs/sha256:<hex>?size=&repo=     an image's index (``peerblobs``): the same
                                               token, limit and 508

    GET /v1/traces/sha256:<manifest hex>        the same token, limit and 508
        200      the learned prefetch trace this node's cache keeps for that image
                 (``cache.trace``, checked as it is read, without run sources), JSON
                 of at most ``MAX_TRACE_BYTES``
        404      no usable trace of that image here

A chunk that is not cached but whose request says where it lies (blob, offset, sizes,
codec, ``registry/repository``) is fetched from the origin with this node's own
credentials, once however many peers ask at the same time (the ``ChunkFetcher``'s
in-flight map), verified, cached and sent (a gzip span: if the side index the request
names is in this node's cache, which has its checkpoint, ``peerspans``; else 404). The
server never asks another peer, so
requests cannot loop. It runs on the trio loop of its process (with FUSE in a mount):
reading an entry larger than ``thread_above`` from disk goes to a worker thread. The
node cache keeps plain bytes: a cached chunk is sent in its stored form, encoded again as
convert encodes it (``fetcher.verify.stored_payload``), so a peer's answer is what the
blob holds and the asker checks it as it would the origin's; a gzip span or member, whose
stored form is a piece of a layer no node keeps, is sent as it is cached, plain
(``fetcher.peerwire.sends_plain``), and the asker checks it by its digest alone.

Nothing a caller sends can end that process (see ``peerhttp``, which holds the
connections). The wire format, shared with ``fetcher.peers``, is ``fetcher.peerwire``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import os
import re
import resource
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from blockindex.format import CODEC_GZIP_SPAN, CODEC_RAW, Chunk, ChunkDigest
from cache.errors import CacheError
from cache.evict import CacheKeeper
from cache.images import ImageStore
from cache.store import ChunkStore
from cache.trace import MAX_TRACE_BYTES, TraceStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.errors import FetchError
from fetcher.imageref import ImageRef
from fetcher.mirrors import MirroredClient
from fetcher.peerwire import (
    BATCH_PATH,
    BLOB_PATH,
    CHUNK_PATH,
    CODEC_HEADER,
    NODE_HEADER,
    SIZE_HEADER,
    TRACE_PATH,
    authorization,
    parse_chunk_query,
    peer_url,
    sends_plain,
)
from fetcher.registry import RegistryClient
from fetcher.transport import prepare as prepare_clients
from fetcher.verify import stored_payload

from .errors import ExitCode, UserError
from .httphead import RequestHead
from .peerbatch import BatchServer, Refused
from .peerblobs import BlobServer
from .peerhttp import Answer, Connections, listen, parse_range
from .peerspans import SideIndexes

log = logging.getLogger(__name__)

_MANIFEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def read_token(path: Path) -> str:
    """The cluster token: the file's first line. UserError (exit 2) if unusable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise UserError(f"cannot read token file {path}: {reason}", ExitCode.USAGE) from exc
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16 or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise UserError(f"token file {path}: expected one line of at least 16 printable characters",
                        ExitCode.USAGE)
    return token


FDS_BESIDE_CONNECTIONS = 256
"""Open files a mount or ``lazyfs peer`` needs beside its peers' connections (its FUSE
device, cache entries, the origin's connections, logs)."""


def raise_fd_limit(need: int) -> int:
    """Raise this process's soft limit on open files to ``need``, within the hard limit (as
    Go's runtime does for every server: the soft limit is 1,024 by default); the soft limit
    now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the limit on open files to %d: %s", want, exc)
    return need if soft == resource.RLIM_INFINITY else soft


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerServerConfig:
    """How the chunk server treats its callers."""

    max_concurrent: int = 32
    """Requests in progress at once; more wait for one of them to end (``max_waiting``)."""
    max_waiting: int = 1024
    max_wait: float = 5.0
    """Requests waiting for room at once, and seconds each may wait; past either, 503 (the
    caller goes on to the next owner, then the origin). A 503 at once past
    ``max_concurrent`` sent most callers to the origin when many nodes started one image:
    in bench/cluster_model.py's 1,000 nodes the origin sent 939 copies of a start, 1.18
    with owners that queue."""
    idle_timeout: float = 30.0
    """Seconds a keep-alive connection may sit idle, or take to send a request head."""
    max_connections: int = 1280
    """Connections open at once; more are closed as they come (a caller, token or not,
    cannot take the process's file descriptors). Room for ``max_waiting`` callers waiting
    beside those in progress: each waits on a connection of its own. The server raises its
    process's soft limit on open files to fit them (``raise_fd_limit``)."""
    send_timeout: float = 30.0
    """Seconds the caller may take to take each MiB of an answer; then the connection is
    closed (one that stops reading holds a chunk's bytes no longer than this)."""
    fetch_deadline: float = 30.0
    """Seconds fetching a missing chunk from the origin may take before answering 502."""
    thread_above: int = 128 << 10
    """Cache entries larger than this are read in a worker thread."""


@dataclasses.dataclass
class PeerServerStats:
    requests: int = 0
    chunks_served: int = 0
    bytes_served: int = 0
    fetched_for_peers: int = 0
    batches: int = 0
    """Batch requests (``POST /v1/chunks``) taken; their chunks count in ``chunks_served``."""
    unauthorized: int = 0
    busy: int = 0
    """Requests answered 503: ``max_waiting`` were waiting, or room came not within ``max_wait``."""
    waited: int = 0
    """Requests that waited for room (``max_concurrent`` were in progress)."""
    refused_connections: int = 0
    """Connections closed at once: ``max_connections`` were open."""
    send_timeouts: int = 0
    """Connections closed because the caller did not take an answer in time."""
    not_found: int = 0
    errors: int = 0
    from_self: int = 0
    """Requests from this very process (answered 508)."""
    traces_served: int = 0
    blobs_served: int = 0
    """Whole blobs (indexes) sent."""
    blobs_fetched_for_peers: int = 0
    """Indexes fetched from the origin to answer a peer."""
    malformed: int = 0
    """Heads that could not be parsed (answered 400, connection closed)."""
    failed_connections: int = 0
    """Connections closed by an unexpected error in the server (each logged)."""


class OriginPool:
    """Origin-only chunk fetchers and registry clients, one per repository, made on first
    use (a mount passes its own client, and its fetcher once it has one, so that its
    readers and its peers share one in-flight map)."""

    def __init__(self, nursery: trio.Nursery, store: ChunkStore, *, timeout: float = 30.0,
                 insecure: bool | None = None, fetchers: dict[str, ChunkFetcher] | None = None,
                 clients: dict[str, RegistryClient | MirroredClient] | None = None) -> None:
        self._nursery = nursery
        self._store = store
        self._timeout = timeout
        self._insecure = insecure
        self._fetchers = dict(fetchers or {})
        self._clients = dict(clients or {})
        self._made: list[RegistryClient] = []

    def adopt(self, repository: str, fetcher: ChunkFetcher) -> None:
        """Use ``fetcher`` for ``repository`` from now on (a mount's, once it has its index)."""
        self._fetchers[repository] = fetcher

    def client(self, repository: str) -> RegistryClient | MirroredClient:
        c = self._clients.get(repository)
        if c is None:
            ref = ImageRef.parse(repository)  # ValueError for a malformed one
            made = RegistryClient(ref, timeout=self._timeout, insecure=self._insecure)
            self._made.append(made)
            c = self._clients[repository] = made
        return c

    def get(self, repository: str) -> ChunkFetcher:
        f = self._fetchers.get(repository)
        if f is None:
            f = self._fetchers[repository] = ChunkFetcher(
                self._nursery, self.client(repository), self._store, FetchConfig(deadline=self._timeout))
        return f

    async def aclose(self) -> None:
        for c in self._made:
            with trio.CancelScope(shield=True):
                await c.aclose()


class ChunkServer:
    """Answers chunk and trace requests from peers (the connections: ``peerhttp``)."""

    def __init__(self, store: ChunkStore, token: str, origins: OriginPool | None = None,
                 config: PeerServerConfig = PeerServerConfig(), *, node_id: str | None = None,
                 images: ImageStore | None = None) -> None:
        """``images`` (the same cache's) lets it serve indexes (``peerblobs``)."""
        self.store = store
        self.node_id = node_id
        self.config = config
        self.stats = PeerServerStats()
        self._expected = authorization(token).encode()
        self._node = node_id.encode() if node_id else None
        self._origins = origins
        self._active = 0
        self._room = trio.lowlevel.ParkingLot()
        """Requests waiting for one in progress to end."""
        self._io = trio.CapacityLimiter(4)
        self._traces: TraceStore | None = None  # made on first use (it creates CACHE/traces)
        self._blobs = BlobServer(images, origins, fetch_timeout=config.fetch_deadline,
                                 io=self._io) if images is not None else None
        self._spans = SideIndexes(images) if images is not None else None
        self._batches = BatchServer(lambda c, repo, index, prefetch: self._serve(c.digest, c, repo, index,
                                                                                 background=prefetch),
                                    self.stats, deadline=config.fetch_deadline, cached=self._had,
                                    on_done=self._room.unpark)
        self._connections = Connections(self._answer, config, self.stats)

    listen_on = staticmethod(listen)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        need = self.config.max_connections + FDS_BESIDE_CONNECTIONS
        if (have := raise_fd_limit(need)) < need:
            log.warning("open files are limited to %d (ulimit -n): fewer than the %d connections "
                        "a peer server keeps open, which then fail past that", have, need)
        await self._connections.serve(listeners)

    async def _answer(self, request: RequestHead) -> Answer:
        batch = request.method == "POST" and request.path == BATCH_PATH
        if request.method != "GET" and not batch:
            return Answer(405, b"only GET, and POST of a batch\n")
        if not hmac.compare_digest(request.headers.get("authorization", b""), self._expected):
            self.stats.unauthorized += 1
            return Answer(401, b"cluster token required\n",
                          {"WWW-Authenticate": 'Bearer realm="lazyfs-peers"'})
        if self._node and hmac.compare_digest(request.headers.get(NODE_HEADER.lower(), b""), self._node):
            self.stats.from_self += 1
            return Answer(508, b"this request came from this node\n")
        if self._full() and not await self._wait_for_room():
            self.stats.busy += 1
            return Answer(503, b"busy\n", {"Retry-After": "1"})
        if batch:
            return self._batches.answer(request.body)
        if request.path.startswith(TRACE_PATH):
            return await self._trace_request(request.path)
        if request.path.startswith(BLOB_PATH):
            return await self._blob_request(request.path, request.query)
        try:
            with self._in_progress():
                codec, size, payload = await self._chunk(request.path, request.query)
        except Refused as exc:
            if exc.status == 404:
                self.stats.not_found += 1
            else:
                self.stats.errors += 1
            return Answer(exc.status, f"{exc}\n".encode())
        status, extra = 200, {CODEC_HEADER: str(codec), SIZE_HEADER: str(size)}
        rng = request.header("range")
        if rng:
            try:
                start, end = parse_range(rng, len(payload))
            except ValueError:
                return Answer(400, b"bad Range\n")
            status = 206
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{len(payload)}"
            payload = payload[start:end]
        self.stats.chunks_served += 1
        self.stats.bytes_served += len(payload)
        return Answer(status, payload, extra)

    @contextlib.contextmanager
    def _in_progress(self) -> Iterator[None]:
        """One of the ``max_concurrent`` request slots, for a request other than a batch
        (a batch holds its own: ``BatchServer.active``); its end makes room for a waiter."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._room.unpark()

    def _full(self) -> bool:
        return self._active + self._batches.active >= self.config.max_concurrent

    async def _wait_for_room(self) -> bool:
        """Wait, first come first served, until fewer than ``max_concurrent`` requests are
        in progress; False if ``max_waiting`` are waiting already, or after ``max_wait``."""
        if len(self._room) >= self.config.max_waiting:
            return False
        self.stats.waited += 1
        with trio.move_on_after(self.config.max_wait):
            while self._full():
                await self._room.park()
            return True
        return False

    async def _blob_request(self, path: str, query: str) -> Answer:
        if self._blobs is None:
            self.stats.not_found += 1
            return Answer(404, b"no blobs here\n")
        with self._in_progress():
            answer = await self._blobs.answer(path, query)
        self.stats.blobs_served = self._blobs.served
        self.stats.blobs_fetched_for_peers = self._blobs.fetched
        if answer.status == 404:
            self.stats.not_found += 1
        elif answer.status != 200:
            self.stats.errors += 1
        elif answer.file is not None:
            self.stats.bytes_served += answer.file[1]
        return answer

    async def _trace_request(self, path: str) -> Answer:
        manifest = path[len(TRACE_PATH):]
        if not _MANIFEST.match(manifest):
            self.stats.errors += 1
            return Answer(400, b"expected /v1/traces/sha256:<64 hex digits>\n")
        with self._in_progress():
            body = await trio.to_thread.run_sync(self._trace_document, manifest, limiter=self._io)
        if body is None:
            self.stats.not_found += 1
            return Answer(404, f"no trace of {manifest} here\n".encode())
        self.stats.traces_served += 1
        self.stats.bytes_served += len(body)
        return Answer(200, body, content_type="application/json")

    def _trace_document(self, manifest: str) -> bytes | None:
        """The trace kept for ``manifest``, as it leaves the node; None if there is no
        usable one (read and checked in a worker thread: it may be megabytes)."""
        try:
            if self._traces is None:
                self._traces = TraceStore(self.store.root)
            trace = self._traces.load(manifest)
        except CacheError as exc:
            log.warning("cannot serve traces: %s", exc)
            return None
        if trace is None or not trace.runs:
            return None
        body = trace.to_json(sources=False)
        if len(body) > MAX_TRACE_BYTES:
            log.warning("trace of %s is %d bytes, over the %d-byte limit: not served",
                        manifest, len(body), MAX_TRACE_BYTES)
            return None
        return body

    async def _chunk(self, path: str, query: str) -> tuple[int, int, bytes | memoryview]:
        if not path.startswith(CHUNK_PATH):
            raise Refused(404, f"no such path {path[:100]}")
        try:
            digest = ChunkDigest(bytes.fromhex(path[len(CHUNK_PATH):]))
            if len(digest) != 32:
                raise ValueError
        except ValueError:
            raise Refused(400, "expected /v1/chunks/<64 hex digits>") from None
        try:
            chunk, repo, index = parse_chunk_query(digest, query)
        except ValueError:
            raise Refused(400, "bad chunk location in the query") from None
        return await self._serve(digest, chunk, repo, index)

    async def _serve(self, digest: ChunkDigest, chunk: Chunk | None, repo: str | None,
                     index: str | None = None, *, background: bool = False
                     ) -> tuple[int, int, bytes | memoryview]:
        """``(codec, size, stored payload)`` of a chunk for a peer: from the node cache, else
        (``chunk`` and ``repo`` say where it lies; a gzip span's checkpoint, the side index
        ``index``) fetched from the origin; for a peer's prefetch (``background``) at the
        priority of a prefetch, after the reads this node fetches for anyone."""
        entry = await self._load(digest, chunk)
        if entry is not None and (chunk is None or entry[1] == chunk.size):
            return entry
        if chunk is None or repo is None or self._origins is None:
            raise Refused(404, f"chunk {digest.hex()} is not cached here")
        if chunk.codec == CODEC_GZIP_SPAN:
            located = await self._spans.locate(index, chunk) if index and self._spans else None
            if located is None:
                raise Refused(404, f"chunk {digest.hex()} is a gzip span of a side index not kept here")
            chunk = located
        try:
            fetcher = self._origins.get(repo)
        except ValueError as exc:
            raise Refused(400, f"bad repository: {exc}") from None
        self.stats.fetched_for_peers += 1
        with trio.move_on_after(self.config.fetch_deadline):
            try:
                if sends_plain(chunk):
                    got = await fetcher.get([chunk], use_peers=False, background=background)
                    return CODEC_RAW, chunk.size, got[chunk.digest]
                payload = await fetcher.get_payload(chunk, background=background)
            except FetchError as exc:
                raise Refused(502, f"cannot fetch chunk {digest.hex()[:16]}: {exc}") from None
            return chunk.codec, chunk.size, payload
        raise Refused(502, f"chunk {digest.hex()[:16]} not fetched in {self.config.fetch_deadline:g}s")

    async def _had(self, chunk: Chunk) -> tuple[int, int, bytes] | None:
        """``chunk`` as ``_serve`` gives it, if the node cache holds it; else None."""
        entry = await self._load(chunk.digest, chunk)
        return entry if entry is not None and entry[1] == chunk.size else None

    async def _load(self, digest: bytes, chunk: Chunk | None) -> tuple[int, int, bytes] | None:
        path = self.store.path(digest)
        try:
            size = os.stat(path).st_size  # noqa: ASYNC240 - one stat of a cached inode, like open()
        except OSError:
            return None
        if size > self.config.thread_above:
            return await trio.to_thread.run_sync(self._stored, digest, chunk, limiter=self._io)
        return self._stored(digest, chunk)

    def _stored(self, digest: bytes, chunk: Chunk | None) -> tuple[int, int, bytes] | None:
        """``(codec, size, payload)`` of a cached chunk in its stored form (the cache keeps
        plain bytes: ``stored_payload``), or None."""
        plain = self.store.get(digest)
        if plain is None:
            return None
        if chunk is not None and sends_plain(chunk):
            return CODEC_RAW, len(plain), bytes(plain)
        encoded = stored_payload(plain, chunk)
        return None if encoded is None else (encoded[0], len(plain), encoded[1])


async def run_peer(cache_dir: Path, host: str, port: int, token: str, *, fetch_timeout: float = 30.0,
                   insecure: bool | None = None, ready: Callable[[str], object] | None = None,
                   cache_size: int | None = None, metrics: tuple[str, int] | None = None,
                   advertise: str | None = None) -> None:
    """``lazyfs peer``: serve ``cache_dir`` until SIGTERM or SIGINT (keeping it under
    ``cache_size`` bytes when given). ``advertise`` is the URL the peers file lists for
    this node (default ``http://HOST:PORT`` as bound)."""
    store = ChunkStore(cache_dir)
    images = ImageStore(cache_dir)
    keeper = CacheKeeper(store, images, cache_size)
    await trio.to_thread.run_sync(prepare_clients)  # not on the loop at the first request
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        origins = OriginPool(nursery, store, timeout=fetch_timeout, insecure=insecure)
        server = ChunkServer(store, token, origins, PeerServerConfig(fetch_deadline=fetch_timeout),
                             images=images)
        listeners = await server.listen_on(host, port)
        if metrics is not None:
            from .metrics import Metrics, peer_process_samples

            m = Metrics()
            keeper.measure = True
            m.add_source(peer_process_samples(server, store, keeper))
            m.serve(*metrics, trio_token=trio.lowlevel.current_trio_token())
        try:
            bound = listeners[0].socket.getsockname()
            url = advertise or peer_url(bound[0], bound[1])
            log.info("serving the chunks of %s to peers at %s:%d as %s", cache_dir, bound[0], bound[1], url)
            if ready is not None:
                ready(url)
            nursery.start_soon(server.serve, listeners)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    break
        finally:
            nursery.cancel_scope.cancel()
            await origins.aclose()
