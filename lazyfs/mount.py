"""``lazyfs mount``: resolve an image, open its index, serve it with FUSE.

One process serves one image (pyfuse3 serves one filesystem per process). One nursery
and one ``AsyncExitStack`` own every lifetime; callbacks are registered in the order
that makes LIFO teardown correct: the FUSE session closes first, then the fetcher's
client, then the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from blockindex.checks import CHECK_RULES
from blockindex.reader import IndexReader
from cache import pins
from cache.errors import CacheError
from cache.evict import CacheKeeper, eviction_lock
from cache.images import ImageStore
from cache.store import ChunkStore
from cache.trace import DEFAULT_WINDOW
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.imageref import ImageRef
from fetcher.options import RegistryOptions
from fetcher.peers import PeerClient, PeerConfig, PeerSet, PeersFileWatcher, PeerTier
from fetcher.peerwire import WILDCARD_HOSTS, peer_url

from . import fuseloop, mountinfo
from .content import ImageContent
from .errors import ExitCode, MountError, UserError
from .failures import tag_warnings
from .fs import LazyOperations
from .layercheck import LayerVerifier
from .learned import LearnedPrefetch
from .malloc import give_back, give_back_after_reads
from .opening import OpenedImage, open_image
from .peer import ChunkServer, OriginPool, PeerServerConfig, read_token
from .prefetch import Prefetcher
from .readlog import ReadLog, file_state

if TYPE_CHECKING:  # imported when asked for: prometheus_client is a fiftieth of every mount's start
    from .metrics import Metrics

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True, kw_only=True)
class MountOptions:
    """Everything a mount process needs to know."""

    ref: str
    """The image: ``HOST[:PORT]/REPO[:TAG|@DIGEST]``."""
    mountpoint: Path
    cache_dir: Path
    """The node-wide cache, shared by every mount."""
    prefetch: bool = True
    """Fill the cache with the whole image in the background."""
    offline: bool = False
    """Use the cache alone; never contact the registry."""
    allow_other: bool = False
    """Let users other than the mounting one read the mount."""
    insecure: bool | None = None
    """Plain HTTP to the registry (the default allows it for loopback hosts only)."""
    timeout: float = 30.0
    """Seconds a registry request, and a read waiting on the network, may take."""
    readahead_kib: int = 1024
    registry: RegistryOptions | None = None
    """How to reach the registry (credentials, TLS, mirrors, proxy); None: the defaults
    with ``insecure`` and ``timeout`` above."""

    def registry_options(self) -> RegistryOptions:
        base = self.registry or RegistryOptions()
        insecure = set(base.insecure_hosts)
        if self.insecure:
            insecure.add(ImageRef.parse(self.ref).registry)
        return dataclasses.replace(base, timeout=self.timeout, insecure_hosts=frozenset(insecure))
    peers_file: Path | None = None
    """Peers to ask for chunks before the origin: one ``http://HOST:PORT`` a line, re-read
    when it changes. The peer whose URL equals ``listen`` is this node."""
    listen: tuple[str, int] | None = None
    """Serve this node's cache to peers at ``(host, port)`` (in this process's trio loop)."""
    token_file: Path | None = None
    """The cluster token, sent to peers and required of them."""
    hedge_delay: float = 0.08
    """Seconds to wait for a peer before asking the origin as well (see ``PeerConfig``)."""
    advertise: str | None = None
    """This node's URL in the peers file (default ``http://`` + ``listen``): what lets it
    know itself when it listens on 0.0.0.0, or when a ``lazyfs peer`` serves its cache."""
    metrics: tuple[str, int] | None = None
    """Serve Prometheus metrics at ``(host, port)`` (port 0: any free port; see status)."""
    cache_size: int | None = None
    """Node-wide limit of the chunk cache in bytes (least recently used entries of images
    no mount needs are evicted past it); None: no limit."""
    record_window: float | None = DEFAULT_WINDOW
    """Seconds after mounting during which first reads are recorded into the image's
    trace (``cache.trace``); None records until unmounted (``--record``), 0 never."""
    lead_only: bool = False
    """Prefetch only the learned order (the trace), not the whole image."""
    refresh_trace_after: float = 10.0
    """Seconds after the start at which a mount that has its node's trace asks the registry
    and the peers for newer runs (``LearnedPrefetch.refresh``); 0: never."""
    verify_layers: bool = False
    """For an ordinary image read by its side index: serve no file bytes before every
    layer is checked against the image manifest (``layercheck``); reads wait for it."""
    amplify: int | None = None
    """Bytes a demand miss fetches in one request with the chunks after it in its blob
    (``FetchConfig.amplify``); None: its default, 0: off."""


def _status(opts: MountOptions, opened: OpenedImage, index: IndexReader, content: ImageContent,
            store: ChunkStore, fetcher: ChunkFetcher | None, prefetcher: Prefetcher, started: float,
            server: ChunkServer | None = None, keeper: CacheKeeper | None = None,
            metrics: Metrics | None = None, learned: LearnedPrefetch | None = None,
            slow: list[dict[str, Any]] | None = None, layers: LayerVerifier | None = None) -> dict[str, Any]:
    p = prefetcher.progress
    totals = index.totals()
    f = fetcher.stats if fetcher else None
    peers = fetcher.peers.peers if fetcher and fetcher.peers else None
    by_source = {"origin": f.bytes_received if f else 0, "cache": content.stats.bytes_from_cache}
    if peers is not None:
        by_source.update({f"peer {url}": h["bytes"] for url, h in peers.stats().items()})
    return {
        "pid": os.getpid(),
        "ref": opts.ref,
        "mountpoint": str(opts.mountpoint),
        "cache": str(opts.cache_dir),
        "manifest": opened.manifest_digest,
        "index": opened.index_digest,
        "offline": fetcher is None,
        "uptime": round(time.monotonic() - started, 3),
        "image": {"files": totals["files"], "file_bytes": totals["file_bytes"],
                  "chunks": totals["chunks"], "stored_bytes": totals["stored_bytes"]},
        "prefetch": {"state": p.state, "complete": p.complete,
                     "cached_chunks": p.cached_chunks, "total_chunks": p.total_chunks,
                     "cached_bytes": p.cached_bytes, "total_bytes": p.total_bytes},
        "reads": dataclasses.asdict(content.stats),
        "fetch": dataclasses.asdict(content.fetcher.stats),  # offline: the node cache's reads
        "bytes_by_source": by_source,
        "peers": None if peers is None else {
            "self": peers.self_url, "peers": peers.stats(), "bad_peers": peers.bad_peers(),
            "hedge_delay": round(peers.hedge_delay(), 4)},
        "peer_server": dataclasses.asdict(server.stats) if server else None,
        "metrics": metrics.url if metrics else None,
        "cache_state": {**store.cache_state(), **(keeper.state() if keeper else {})},
        "trace": learned.status(p) if learned else None,
        "layers": layers.status() if layers else None,
        "slow": slow or [],
    }


def _pin(images: ImageStore, opened: OpenedImage, opts: MountOptions) -> Path | None:
    """Pin the image before anything counts what is cached (see ``cache.pins``). A cache
    disk too full for the pin file costs only protection from eviction: go on."""
    try:
        with eviction_lock(images.root):
            return pins.pin(images, opened.manifest_digest, opened.index_digest, opts.ref,
                            str(opts.mountpoint))
    except OSError as exc:
        log.warning("cannot pin the image in %s (%s): other processes may evict its chunks",
                    images.root, exc.strerror)
        return None


def _slow_reads(index: IndexReader, readlog: ReadLog) -> list[dict[str, Any]]:
    """The slowest network waits, with the paths of their files (looked up once each)."""
    slow = readlog.slowest()
    known = readlog.paths
    unknown = {r["ino"] for r in slow} - known.keys()
    if unknown:
        known.update((ino, p.decode(errors="replace")) for ino, p in index.paths(unknown).items())
    return [{"file": known.get(r["ino"], "?"), **r} for r in slow]


async def _raise_readahead(entry: mountinfo.MountEntry, kib: int) -> None:
    """Set the readahead once the main loop has answered the kernel's INIT request,
    which resets it (see ``mountinfo.set_readahead``)."""
    for _ in range(100):
        await trio.sleep(0.02)
        if await trio.to_thread.run_sync(mountinfo.set_readahead, entry, kib):
            await trio.sleep(0.2)  # make sure a late INIT reply did not undo it
            if await trio.to_thread.run_sync(mountinfo.set_readahead, entry, kib):
                break
    else:
        log.warning("could not raise the readahead of %s to %d KiB", entry.mountpoint, kib)


async def _watch_signals(on_signal: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            on_signal()
            return


def _peer_tier(opts: MountOptions, ref: ImageRef, token: str,
               node_id: str) -> tuple[PeerTier, PeersFileWatcher]:
    """The peers this mount asks, and the watcher of its peers file (loaded once here)."""
    assert opts.peers_file is not None
    self_url = opts.advertise
    if self_url is None and opts.listen is not None:
        if opts.listen[0] in WILDCARD_HOSTS:
            log.warning("listening on %s without --advertise: this node learns its own "
                        "address in the peers file only when it first asks itself", opts.listen[0])
        else:
            self_url = peer_url(*opts.listen)
    # --advertise without --listen: the node's `lazyfs peer` serves this node's cache
    peer_set = PeerSet(self_url=self_url, config=PeerConfig(hedge_delay=opts.hedge_delay),
                       served_elsewhere=opts.listen is None and opts.advertise is not None)
    watcher = PeersFileWatcher(opts.peers_file, peer_set)
    watcher.load()
    return PeerTier(peer_set, PeerClient(token, node_id=node_id), f"{ref.registry}/{ref.repository}"), watcher


async def serve(opts: MountOptions, ready: Callable[[], None]) -> None:
    """Mount the image and serve it until unmounted or signalled."""
    started = time.monotonic()
    mountinfo.check_mountpoint(opts.mountpoint)
    try:
        ref = ImageRef.parse(opts.ref)
    except ValueError as exc:
        raise UserError(str(exc), exit_code=ExitCode.USAGE) from exc
    images = ImageStore(opts.cache_dir)
    store = ChunkStore(opts.cache_dir)
    async with contextlib.AsyncExitStack() as stack:
        client = None
        if not opts.offline:
            client = opts.registry_options().reader(ref)
            stack.push_async_callback(client.aclose)
        token = read_token(opts.token_file) if opts.token_file else None
        listeners = None
        if opts.listen is not None and token is not None:
            listeners = await ChunkServer.listen_on(*opts.listen)
            for listener in listeners:
                stack.callback(listener.socket.close)
        node_id = os.urandom(8).hex()  # lets this process's server recognise its own requests
        tier = watcher = None
        if opts.peers_file is not None and token is not None and client is not None:
            tier, watcher = _peer_tier(opts, ref, token, node_id)
            stack.push_async_callback(tier.client.aclose)
        repository = f"{ref.registry}/{ref.repository}"
        async with trio.open_nursery() as nursery:
            server = origins = None
            if listeners is not None and token is not None:
                # serving before the index is open: peers may ask this node for it meanwhile
                origins = OriginPool(nursery, store, timeout=opts.timeout, insecure=opts.insecure,
                                     clients={repository: client} if client is not None else None)
                stack.push_async_callback(origins.aclose)
                server = ChunkServer(store, token, origins, PeerServerConfig(fetch_deadline=opts.timeout),
                                     node_id=node_id, images=images)
                nursery.start_soon(server.serve, listeners)
                assert opts.listen is not None  # what the listeners listen on
                log.info("serving this node's cache to peers at %s:%d", *opts.listen)
            opened = await open_image(ref, client, images, wait=opts.timeout, peers=tier)
            if tier is not None and opened.layers is not None:  # an owner finds its spans there
                tier.client.side_index = opened.index_digest
            tag_warnings(opened.manifest_digest)
            index = IndexReader(opened.index_path)
            stack.callback(index.close)
            # The digest pins the index to its author, who may be hostile: one scan of every
            # row before the kernel sees any of it (IndexFormatError: exit 3, one line), once
            # per index and node (about 0.7 s per 100,000 entries).
            if not images.index_checked(opened.index_digest, CHECK_RULES):
                await trio.to_thread.run_sync(index.check)
                try:
                    images.mark_index_checked(opened.index_digest, CHECK_RULES)
                except CacheError as exc:  # a full disk: the next mount checks again
                    log.warning("%s", exc)
            pin = await trio.to_thread.run_sync(_pin, images, opened, opts)
            if pin is not None:
                stack.callback(pins.unpin, pin)
            keeper = CacheKeeper(store, images, opts.cache_size)
            fetcher = None
            if client is not None:
                config = FetchConfig(deadline=opts.timeout) if opts.amplify is None else FetchConfig(
                    deadline=opts.timeout, amplify=opts.amplify)
                fetcher = ChunkFetcher(nursery, client, store, config, source_name="origin", peers=tier,
                                       neighbours=index.chunks_after, within=index.chunks_within,
                                       followers=index.digests_after)
                if origins is not None:
                    origins.adopt(repository, fetcher)
            if watcher is not None:
                nursery.start_soon(watcher.run)
            nursery.start_soon(keeper.run)
            readlog = ReadLog(None, started=started)
            learned = LearnedPrefetch(opts.cache_dir, opened.manifest_digest, opened.index_path, readlog,
                                      client=client if not opened.from_cache_only else None,
                                      timeout=opts.timeout, record_window=opts.record_window,
                                      peers=tier if not opened.from_cache_only else None,
                                      before_ask=fetcher.gate.wait_idle if fetcher else None,
                                      refresh_after=opts.refresh_trace_after)
            layers = None
            if opened.layers is not None and client is not None:  # trust in a side index: checked
                layers = LayerVerifier(opened, client, store, images, timeout=opts.timeout,
                                       strict=opts.verify_layers, gate=fetcher.gate if fetcher else None)
            prefetcher = Prefetcher(opened.index_path, store, images, opened.manifest_digest, fetcher,
                                    lead=learned.lead, lead_only=opts.lead_only,
                                    layers=layers.run if layers else None)
            # offline, a fetcher without a source: the node cache alone answers reads
            content = ImageContent(index, fetcher or ChunkFetcher(nursery, None, store,
                                                                  followers=index.digests_after),
                                   on_cached=prefetcher.progress.cached, nursery=nursery, readlog=readlog)
            if layers is not None:
                layers.on_cached = prefetcher.progress.cached
                content.admit = layers.admit
            metrics = None
            if opts.metrics is not None:
                from .metrics import Metrics, mount_samples

                metrics = Metrics()
                content.observe_read = metrics.observe_read
                if fetcher is not None:
                    fetcher.on_request = metrics.observe_fetch
                keeper.measure = True
                metrics.add_source(mount_samples(content, fetcher, prefetcher, store, keeper, server))
                metrics.serve(*opts.metrics, trio_token=trio.lowlevel.current_trio_token())
            ops = LazyOperations(
                index, content,
                lambda: _status(opts, opened, index, content, store, fetcher, prefetcher, started, server,
                                keeper, metrics, learned, _slow_reads(index, readlog), layers),
                image=opened.manifest_digest,
                file_state=lambda ino: file_state(index, store, readlog, ino),
            )
            # before mounting (see mountinfo.find); nothing else runs on the loop yet
            target = os.path.realpath(opts.mountpoint)  # noqa: ASYNC240
            fuse_options = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
            if opts.allow_other:
                fuse_options.add("allow_other")
            try:
                pyfuse3.init(ops, str(opts.mountpoint), fuse_options)
            except RuntimeError as exc:
                raise MountError(f"cannot mount at {opts.mountpoint}: {exc}") from exc
            try:
                entry = mountinfo.find(target, resolved=True)
                if entry is not None:
                    nursery.start_soon(_raise_readahead, entry, opts.readahead_kib)
                    # before the first read can reach the mount: no read waits in the kernel
                    if not mountinfo.set_max_background(entry):
                        log.warning("could not raise the FUSE requests in flight of %s to %d (is "
                                    "fusectl mounted at %s?): with more reads waiting on the "
                                    "network than the kernel's 12, a read may take up to twice "
                                    "--timeout", opts.mountpoint, mountinfo.MAX_BACKGROUND,
                                    mountinfo.FUSECTL)
                log.info("mounted %s (%s) at %s%s", opts.ref, opened.manifest_digest,
                         opts.mountpoint, " from the cache alone" if opened.from_cache_only else "")
                ready()
                nursery.start_soon(_watch_signals, pyfuse3.terminate)
                nursery.start_soon(give_back_after_reads, lambda: content.stats.bytes_read)
                nursery.start_soon(learned.record)
                nursery.start_soon(learned.refresh)
                if layers is not None and layers.strict:  # whatever the prefetch does
                    nursery.start_soon(layers.run)
                if opts.prefetch or fetcher is None:
                    nursery.start_soon(_prefetch, prefetcher)
                else:
                    prefetcher.count_totals(index)
                fuseloop.install()
                await pyfuse3.main(max_tasks=mountinfo.WORKERS)
            finally:
                pyfuse3.close(unmount=True)
                nursery.cancel_scope.cancel()
                learned.save()  # a mount shorter than its window (or --record) saves here
    log.info("unmounted %s", opts.mountpoint)


async def _prefetch(prefetcher: Prefetcher) -> None:
    """Prefetch, then give back the heap its buffers and chunk lists left free (12 MB
    in a mount that fetched the bench's Debian image)."""
    await prefetcher.run()
    give_back()


__all__ = ["MountOptions", "serve"]
