"""Serve the node's cached chunks to the other nodes of a cluster (``lazyfs peer``, and
``lazyfs mount --listen``).

    GET /v1/chunks/<blake3 hex>[?blob=&offset=&stored=&size=&codec=&repo=]
        Authorization: Bearer <cluster token>      401 without it (compared in constant time)
        200/206  the payload as stored in the blob; X-Lazyfs-Codec, X-Lazyfs-Size headers
        400      a head that cannot be parsed (the connection is then closed)
        404      not cached, and the query does not say where it comes from
        502      the owner could not get it from the origin
        503      more than ``max_concurrent`` requests in progress
        508      the request came from this very process (its ``X-Lazyfs-Node`` id): the
                 caller's peers file names this node by another address

    GET /v1/traces/sha256:<manifest hex>        the same token, limit and 508
        200      the learned prefetch trace this node's cache keeps for that image
                 (``cache.trace``, checked as it is read, without run sources), JSON
                 of at most ``MAX_TRACE_BYTES``
        404      no usable trace of that image here

A chunk that is not cached but whose request says where it lies (blob, offset, sizes,
codec, ``registry/repository``) is fetched from the origin with this node's own
credentials, once however many peers ask at the same time (the ``ChunkFetcher``'s
in-flight map), verified, cached and sent. The server never asks another peer, so
requests cannot loop. It runs on the trio loop of its process (with FUSE in a mount):
reading an entry larger than ``thread_above`` from disk goes to a worker thread. The
node cache keeps plain bytes: a cached chunk is sent in its stored form, encoded again as
convert encodes it (``fetcher.verify.stored_payload``), so a peer's answer is what the
blob holds and the asker checks it as it would the origin's.

Nothing a caller sends can end that process: each connection is handled on its own, a
head ``httphead.parse_head`` refuses is answered 400 and the connection closed, and an
unexpected error while answering one is logged and closes that connection only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

import trio

from blockindex.format import CODEC_LZ4, CODEC_RAW, Blob, Chunk, ChunkDigest
from cache.errors import CacheError
from cache.evict import CacheKeeper
from cache.images import ImageStore
from cache.store import ChunkStore
from cache.trace import MAX_TRACE_BYTES, TraceStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.errors import FetchError
from fetcher.imageref import ImageRef, is_digest
from fetcher.peers import CHUNK_PATH, NODE_HEADER, TRACE_PATH, peer_url
from fetcher.registry import RegistryClient
from fetcher.verify import stored_payload

from .errors import ExitCode, UserError
from .httphead import MalformedRequest, RequestHead, parse_head

log = logging.getLogger(__name__)

_MAX_HEAD = 16 << 10
_MANIFEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 405: "Method Not Allowed", 502: "Bad Gateway", 503: "Service Unavailable",
            508: "Loop Detected"}


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


_SEND_PIECE = 1 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerServerConfig:
    """How the chunk server treats its callers."""

    max_concurrent: int = 32
    """Requests in progress at once; more are answered 503 (the caller goes to the origin)."""
    idle_timeout: float = 30.0
    """Seconds a keep-alive connection may sit idle, or take to send a request head."""
    max_connections: int = 256
    """Connections open at once; more are closed as they come (a caller, token or not,
    cannot take the process's file descriptors)."""
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
    unauthorized: int = 0
    busy: int = 0
    refused_connections: int = 0
    """Connections closed at once: ``max_connections`` were open."""
    send_timeouts: int = 0
    """Connections closed because the caller did not take an answer in time."""
    not_found: int = 0
    errors: int = 0
    from_self: int = 0
    """Requests from this very process (answered 508)."""
    traces_served: int = 0
    malformed: int = 0
    """Heads that could not be parsed (answered 400, connection closed)."""
    failed_connections: int = 0
    """Connections closed by an unexpected error in the server (each logged)."""


class OriginPool:
    """Origin-only chunk fetchers, one per repository, made on first use (a mount passes
    its own, so that its readers and its peers share one in-flight map)."""

    def __init__(self, nursery: trio.Nursery, store: ChunkStore, *, timeout: float = 30.0,
                 insecure: bool | None = None, fetchers: dict[str, ChunkFetcher] | None = None) -> None:
        self._nursery = nursery
        self._store = store
        self._timeout = timeout
        self._insecure = insecure
        self._fetchers = dict(fetchers or {})
        self._clients: list[RegistryClient] = []

    def get(self, repository: str) -> ChunkFetcher:
        f = self._fetchers.get(repository)
        if f is None:
            ref = ImageRef.parse(repository)  # ValueError for a malformed one
            client = RegistryClient(ref, timeout=self._timeout, insecure=self._insecure)
            self._clients.append(client)
            f = self._fetchers[repository] = ChunkFetcher(
                self._nursery, client, self._store, FetchConfig(deadline=self._timeout))
        return f

    async def aclose(self) -> None:
        for c in self._clients:
            with trio.CancelScope(shield=True):
                await c.aclose()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChunkServer:
    """Answers chunk requests from peers on keep-alive HTTP/1.1 connections."""

    def __init__(self, store: ChunkStore, token: str, origins: OriginPool | None = None,
                 config: PeerServerConfig = PeerServerConfig(), *, node_id: str | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.config = config
        self.stats = PeerServerStats()
        self._expected = f"Bearer {token}".encode()
        self._node = node_id.encode() if node_id else None
        self._origins = origins
        self._active = 0
        self._connections = 0
        self._io = trio.CapacityLimiter(4)
        self._traces: TraceStore | None = None  # made on first use (it creates CACHE/traces)

    @staticmethod
    async def listen_on(host: str, port: int) -> list[trio.SocketListener]:
        """Bind (before anything else starts, so a port in use is a one-line error)."""
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                            ExitCode.USAGE) from exc

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.config.max_connections:
            self.stats.refused_connections += 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        try:
            await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        except trio.TooSlowError:  # the caller stopped taking an answer
            self.stats.send_timeouts += 1
            await trio.aclose_forcefully(stream)
        except Exception:  # a bug met by one caller must not end the mount or `lazyfs peer`
            self.stats.failed_connections += 1
            log.exception("peer server: unexpected error answering a caller; closing its connection")
        finally:
            self._connections -= 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()

    async def _exchange(self, stream: trio.SocketStream) -> None:
        """Answer the requests of one keep-alive connection until either side ends it."""
        buf = b""
        while True:
            with trio.move_on_after(self.config.idle_timeout):
                while b"\r\n\r\n" not in buf and len(buf) <= _MAX_HEAD:
                    part = await stream.receive_some(65536)
                    if not part:
                        return
                    buf += part
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep and len(buf) <= _MAX_HEAD:
                return  # idle too long
            if len(head) > _MAX_HEAD:
                await self._refuse(stream, f"request head over {_MAX_HEAD} bytes")
                return
            buf = rest
            try:
                request = parse_head(head)
            except MalformedRequest as exc:
                await self._refuse(stream, str(exc))
                return
            if not await self._request(stream, request):
                return

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        self.stats.requests += 1
        self.stats.malformed += 1
        await self._send(stream, 400, f"{reason}\n".encode(), keep=False)

    async def _request(self, stream: trio.SocketStream, request: RequestHead) -> bool:
        self.stats.requests += 1
        keep = request.keep_alive
        if request.method != "GET":
            await self._send(stream, 405, b"only GET\n", keep=keep)
            return keep
        if not hmac.compare_digest(request.headers.get("authorization", b""), self._expected):
            self.stats.unauthorized += 1
            await self._send(stream, 401, b"cluster token required\n", keep=keep,
                             extra={"WWW-Authenticate": 'Bearer realm="lazyfs-peers"'})
            return keep
        if self._node and hmac.compare_digest(request.headers.get(NODE_HEADER.lower(), b""), self._node):
            self.stats.from_self += 1
            await self._send(stream, 508, b"this request came from this node\n", keep=keep)
            return keep
        if self._active >= self.config.max_concurrent:
            self.stats.busy += 1
            await self._send(stream, 503, b"busy\n", keep=keep, extra={"Retry-After": "1"})
            return keep
        if request.path.startswith(TRACE_PATH):
            return await self._trace_request(stream, request.path, keep)
        self._active += 1
        try:
            codec, size, payload = await self._chunk(request.path, request.query)
        except _BadRequest as exc:
            if exc.status == 404:
                self.stats.not_found += 1
            else:
                self.stats.errors += 1
            await self._send(stream, exc.status, f"{exc}\n".encode(), keep=keep)
            return keep
        finally:
            self._active -= 1
        status, extra = 200, {"X-Lazyfs-Codec": str(codec), "X-Lazyfs-Size": str(size)}
        rng = request.header("range")
        if rng:
            try:
                start, end = _parse_range(rng, len(payload))
            except ValueError:
                await self._send(stream, 400, b"bad Range\n", keep=keep)
                return keep
            status = 206
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{len(payload)}"
            payload = payload[start:end]
        self.stats.chunks_served += 1
        self.stats.bytes_served += len(payload)
        await self._send(stream, status, payload, keep=keep, extra=extra)
        return keep

    async def _trace_request(self, stream: trio.SocketStream, path: str, keep: bool) -> bool:
        manifest = path[len(TRACE_PATH):]
        if not _MANIFEST.match(manifest):
            self.stats.errors += 1
            await self._send(stream, 400, b"expected /v1/traces/sha256:<64 hex digits>\n", keep=keep)
            return keep
        self._active += 1
        try:
            body = await trio.to_thread.run_sync(self._trace_document, manifest, limiter=self._io)
        finally:
            self._active -= 1
        if body is None:
            self.stats.not_found += 1
            await self._send(stream, 404, f"no trace of {manifest} here\n".encode(), keep=keep)
            return keep
        self.stats.traces_served += 1
        self.stats.bytes_served += len(body)
        await self._send(stream, 200, body, keep=keep, content_type="application/json")
        return keep

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
            raise _BadRequest(404, f"no such path {path[:100]}")
        try:
            digest = ChunkDigest(bytes.fromhex(path[len(CHUNK_PATH):]))
            if len(digest) != 32:
                raise ValueError
        except ValueError:
            raise _BadRequest(400, "expected /v1/chunks/<64 hex digits>") from None
        chunk, repo = _chunk_from_query(digest, query)
        entry = await self._load(digest, chunk)
        if entry is not None and (chunk is None or entry[1] == chunk.size):
            return entry
        if chunk is None or repo is None or self._origins is None:
            raise _BadRequest(404, f"chunk {digest.hex()} is not cached here")
        try:
            fetcher = self._origins.get(repo)
        except ValueError as exc:
            raise _BadRequest(400, f"bad repository: {exc}") from None
        self.stats.fetched_for_peers += 1
        with trio.move_on_after(self.config.fetch_deadline):
            try:
                payload = await fetcher.get_payload(chunk)
            except FetchError as exc:
                raise _BadRequest(502, f"cannot fetch chunk {digest.hex()[:16]}: {exc}") from None
            return chunk.codec, chunk.size, payload
        raise _BadRequest(502, f"chunk {digest.hex()[:16]} not fetched in {self.config.fetch_deadline:g}s")

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
        encoded = stored_payload(plain, chunk)
        return None if encoded is None else (encoded[0], len(plain), encoded[1])

    async def _send(self, stream: trio.SocketStream, status: int, body: bytes | memoryview, *, keep: bool,
                    extra: dict[str, str] | None = None, content_type: str | None = None) -> None:
        if content_type is None:
            content_type = "application/octet-stream" if status < 300 else "text/plain"
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Content-Length: {len(body)}",
                 f"Content-Type: {content_type}"]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if not keep:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # each piece must be taken within send_timeout (TooSlowError: _connection closes it)
        if len(body) <= 64 << 10:
            with trio.fail_after(self.config.send_timeout):
                await stream.send_all(head + body)
            return
        with trio.fail_after(self.config.send_timeout):
            await stream.send_all(head)
        view = memoryview(body)
        for at in range(0, len(view), _SEND_PIECE):
            with trio.fail_after(self.config.send_timeout):
                await stream.send_all(view[at : at + _SEND_PIECE])


def _chunk_from_query(digest: ChunkDigest, query: str) -> tuple[Chunk | None, str | None]:
    q = {k: v[0] for k, v in parse_qs(query).items()}
    if "blob" not in q:
        return None, None
    try:
        blob = q["blob"]
        offset, stored, size, codec = (int(q[k]) for k in ("offset", "stored", "size", "codec"))
        if not blob.startswith("sha256:") or not is_digest(blob) or offset < 0 or not 0 < stored <= 1 << 27 \
                or not 0 < size <= 1 << 27 or codec not in (CODEC_RAW, CODEC_LZ4):
            raise ValueError
    except (KeyError, ValueError):
        raise _BadRequest(400, "bad chunk location in the query") from None
    return Chunk(digest, Blob(0, blob, 0), offset, stored, size, codec), q.get("repo")


def _parse_range(header: str, n: int) -> tuple[int, int]:
    unit, _, spec = header.partition("=")
    first, _, last = spec.partition("-")
    if unit.strip() != "bytes" or not first.isdigit():
        raise ValueError(header)
    start = int(first)
    end = int(last) + 1 if last.strip() else n
    if start >= n or end <= start:
        raise ValueError(header)
    return start, min(end, n)


async def run_peer(cache_dir: Path, host: str, port: int, token: str, *, fetch_timeout: float = 30.0,
                   insecure: bool | None = None, ready: Callable[[str], object] | None = None,
                   cache_size: int | None = None, metrics: tuple[str, int] | None = None,
                   advertise: str | None = None) -> None:
    """``lazyfs peer``: serve ``cache_dir`` until SIGTERM or SIGINT (keeping it under
    ``cache_size`` bytes when given). ``advertise`` is the URL the peers file lists for
    this node (default ``http://HOST:PORT`` as bound)."""
    store = ChunkStore(cache_dir)
    keeper = CacheKeeper(store, ImageStore(cache_dir), cache_size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        origins = OriginPool(nursery, store, timeout=fetch_timeout, insecure=insecure)
        server = ChunkServer(store, token, origins, PeerServerConfig(fetch_deadline=fetch_timeout))
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
