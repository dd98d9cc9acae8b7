"""Prometheus metrics (``--metrics HOST:PORT``) of a long-running lazyfs process.

The endpoint is prometheus-client's HTTP server in a daemon thread: scrapes never wait
on, or hold up, the trio loop that serves FUSE. Counters are not kept twice: at each
scrape the values are read from the stats objects the process keeps anyway (what
``lazyfs status`` shows), and in a trio process that read runs on the trio thread
(``trio.from_thread``), so it never sees half-updated state. Only latencies are
observed as they happen, into histograms.

Metric names (all prefixed ``lazyfs_``)::

    bytes_total{source}                 memory, cache: chunk bytes handed to reads from there;
                                        origin, peer: bytes received over the network
    reads_total, read_bytes_total       FUSE reads and the bytes they returned
    read_seconds{source}                latency of a FUSE read, by the slowest place its
                                        chunks came from: memory, cache, network
    fetch_seconds{source}               latency of one network request: origin, peer
    cache_hits_total{tier}              chunk lookups answered by memory or the cache disk
    cache_misses_total                  chunk lookups that went to the network
    prefetch_cached_bytes, prefetch_total_bytes, prefetch_complete
    errors_total{kind}                  eio (reads failed), integrity (bytes failed their
                                        digest), timeout (no answer within the deadline),
                                        network (failed origin requests, timeouts included),
                                        peer (failed peer requests), cache_write, cache_full
                                        (times the disk filled), cache_corrupt (entries dropped)
    cache_size_bytes, cache_entries, cache_limit_bytes, cache_pinned_bytes, cache_full,
    cache_over_limit, cache_evicted_entries_total, cache_evicted_bytes_total
    peer_server_requests_total{result}, peer_server_bytes_total    (mount --listen, peer)
    serve_requests_total{status}, serve_bytes_total                (lazyfs serve)
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server

if TYPE_CHECKING:  # types only: the processes that report import this module, not the reverse
    from trio.lowlevel import TrioToken

    from cache.evict import CacheKeeper
    from cache.store import ChunkStore
    from fetcher.chunks import ChunkFetcher

    from .content import ImageContent
    from .peer import ChunkServer
    from .prefetch import Prefetcher
    from .readlog import ReadSource
    from .servehttp import OriginServer
    from .snapshotter.service import SnapshotService
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .errors import ExitCode, UserError

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)

Sample = tuple[str, str, str, dict[str, str], float]
"""(kind 'counter' or 'gauge', name without prefix, help, labels, value)"""


class Metrics:
    """One process's metrics: histograms fed as things happen, and sources read at scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.read_seconds = Histogram("lazyfs_read_seconds", "FUSE read latency by the slowest source used",
                                      ["source"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.fetch_seconds = Histogram("lazyfs_fetch_seconds", "latency of one network request by source",
                                       ["source"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._sources: list[Callable[[], Iterable[Sample]]] = []
        self._trio_token: TrioToken | None = None
        self.url: str | None = None
        self.registry.register(_Collector(self))

    def add_source(self, fn: Callable[[], Iterable[Sample]]) -> None:
        self._sources.append(fn)

    def observe_read(self, source: ReadSource, seconds: float) -> None:
        self.read_seconds.labels(source).observe(seconds)

    def observe_fetch(self, source: str, nbytes: int, seconds: float) -> None:
        self.fetch_seconds.labels("peer" if source.startswith("peer") else source).observe(seconds)

    def serve(self, host: str, port: int, *, trio_token: TrioToken | None = None) -> str:
        """Start the endpoint (a daemon thread); returns its URL. ``trio_token``: read the
        sources on that trio loop. A port in use is a one-line error (exit 2)."""
        self._trio_token = trio_token
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                            ExitCode.USAGE) from exc
        bound_host, bound_port = server.server_address[:2]
        # server_bind() stored the socket's getsockname(): an AF_INET(6) host is a str
        assert isinstance(bound_host, str)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/metrics"
        log.info("metrics at %s", self.url)
        if not ipaddress.ip_address(bound_host.split("%", 1)[0]).is_loopback:
            log.warning("metrics at %s answer anyone who can reach that address, without "
                        "authentication or TLS (counters only: no image, path or secret)", self.url)
        return self.url

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        for fn in self._sources:
            out.extend(fn())
        return out


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []  # sources are read at scrape time only

    def collect(self) -> Iterable[Metric]:
        m = self._m
        if m._trio_token is not None and threading.current_thread() is not threading.main_thread():
            import trio

            try:
                samples = trio.from_thread.run_sync(m.samples, trio_token=m._trio_token)
            except trio.RunFinishedError:
                return []
        else:
            samples = m.samples()
        families: dict[str, Any] = {}
        for kind, name, text, labels, value in samples:
            full = f"lazyfs_{name}"
            fam = families.get(full)
            if fam is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = families[full] = cls(full.removesuffix("_total") if kind == "counter" else full,
                                           text, labels=list(labels))
            fam.add_metric(list(labels.values()), value)
        return list(families.values())


# -- what each kind of process reports ---------------------------------------------------

def mount_samples(content: ImageContent, fetcher: ChunkFetcher | None, prefetcher: Prefetcher,
                  store: ChunkStore, keeper: CacheKeeper,
                  server: ChunkServer | None = None) -> Callable[[], list[Sample]]:
    """The sources of a mount process (all read on its trio thread)."""

    def samples() -> list[Sample]:
        r, p = content.stats, prefetcher.progress
        f = fetcher.stats if fetcher is not None else None
        peer_bytes = 0
        if fetcher is not None and fetcher.peers is not None:
            peer_bytes = sum(h["bytes"] for h in fetcher.peers.peers.stats().values())
        by_source = {"memory": getattr(r, "bytes_from_memory", 0), "cache": r.bytes_from_cache,
                     "origin": f.bytes_received if f else 0, "peer": peer_bytes}
        out: list[Sample] = [("counter", "bytes_total", "bytes by source", {"source": k}, v)
                             for k, v in by_source.items()]
        out += [
            ("counter", "reads_total", "FUSE reads", {}, r.reads),
            ("counter", "read_bytes_total", "bytes returned to FUSE reads", {}, r.bytes_read),
            ("counter", "cache_hits_total", "chunk lookups answered locally", {"tier": "memory"},
             r.chunk_hits_memory),
            ("counter", "cache_hits_total", "chunk lookups answered locally", {"tier": "cache"},
             r.chunk_hits_cache),
            ("counter", "cache_misses_total", "chunk lookups that went to the network", {}, r.chunk_misses),
            ("gauge", "prefetch_cached_bytes", "bytes of the image cached", {}, p.cached_bytes),
            ("gauge", "prefetch_total_bytes", "bytes of the image", {}, p.total_bytes),
            ("gauge", "prefetch_complete", "1 once every chunk is cached", {}, float(p.complete)),
        ]
        errors = {"eio": r.failed_reads}
        if f is not None:
            errors.update(integrity=f.integrity_failures + f.peer_integrity_failures,
                          timeout=getattr(f, "timeouts", 0), network=f.failed_requests, peer=f.peer_failures)
        out += _error_samples(errors, store)
        out += cache_samples(store, keeper)()
        if server is not None:
            out += peer_server_samples(server)()
        return out

    return samples


def _error_samples(errors: dict[str, int], store: ChunkStore) -> list[Sample]:
    errors = {**errors, "cache_write": store.write_errors, "cache_full": store.full_events,
              "cache_corrupt": store.dropped}
    return [("counter", "errors_total", "errors by kind", {"kind": k}, v) for k, v in errors.items()]


def cache_samples(store: ChunkStore, keeper: CacheKeeper) -> Callable[[], list[Sample]]:
    def samples() -> list[Sample]:
        k = keeper
        out: list[Sample] = [
            ("gauge", "cache_size_bytes", "bytes of chunk entries (last scan)", {}, k.size),
            ("gauge", "cache_entries", "chunk entries (last scan)", {}, k.entries),
            ("gauge", "cache_pinned_bytes", "bytes mounted images need kept", {}, k.pinned_bytes),
            ("gauge", "cache_full", "1 while the cache disk refuses writes", {}, float(store.full)),
            ("gauge", "cache_over_limit", "1 while mounted images alone exceed the limit", {},
             float(k.over_limit)),
            ("counter", "cache_evicted_entries_total", "entries evicted", {}, k.evicted_entries),
            ("counter", "cache_evicted_bytes_total", "bytes evicted", {}, k.evicted_bytes),
        ]
        if k.limit is not None:
            out.append(("gauge", "cache_limit_bytes", "--cache-size", {}, k.limit))
        return out

    return samples


def peer_server_samples(server: ChunkServer) -> Callable[[], list[Sample]]:
    def samples() -> list[Sample]:
        s = server.stats
        results = {"ok": s.chunks_served, "unauthorized": s.unauthorized, "busy": s.busy,
                   "not_found": s.not_found, "error": s.errors, "from_self": s.from_self,
                   "trace": s.traces_served, "malformed": s.malformed,
                   "failed_connection": s.failed_connections}
        out: list[Sample] = [("counter", "peer_server_requests_total", "peer requests by result",
                              {"result": k}, v) for k, v in results.items()]
        out.append(("counter", "peer_server_bytes_total", "bytes sent to peers", {}, s.bytes_served))
        out.append(("counter", "peer_server_origin_fetches_total", "chunks fetched for peers", {},
                    s.fetched_for_peers))
        return out

    return samples


def peer_process_samples(server: ChunkServer, store: ChunkStore, keeper: CacheKeeper
                         ) -> Callable[[], list[Sample]]:
    def samples() -> list[Sample]:
        return [*peer_server_samples(server)(), *cache_samples(store, keeper)(),
                *_error_samples({}, store)]

    return samples


def snapshotter_samples(service: SnapshotService) -> Callable[[], list[Sample]]:
    """The snapshotter's own (its image mounts are processes with their own endpoints)."""

    def samples() -> list[Sample]:
        snaps = service.list()
        return [("gauge", "snapshots", "snapshots in the metadata store", {}, len(snaps)),
                ("gauge", "snapshotter_lazy_images", "lazy images with snapshots", {},
                 len(service.store.images()))]

    return samples


def serve_samples(server: OriginServer) -> Callable[[], list[Sample]]:
    """``lazyfs serve``'s (read in the scrape thread: the counts are kept under a lock)."""

    def samples() -> list[Sample]:
        with server.lock:
            by_status = dict(server.status_counts)
            sent = server.bytes_sent
        out: list[Sample] = [("counter", "serve_requests_total", "requests by HTTP status",
                              {"status": str(k)}, v) for k, v in sorted(by_status.items())]
        out.append(("counter", "serve_bytes_total", "body bytes sent", {}, sent))
        return out

    return samples
