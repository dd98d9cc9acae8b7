"""Learned prefetch, the mount's side: record this run's first reads, and tell the
prefetcher what to fetch first.

The order to fetch first (the *lead*) is, in this order of preference:

1. the trace this node's cache keeps for the image (``CACHE/traces/``, see ``cache.trace``):
   what this node recorded, and what it got before from the registry or a peer;
2. else, asked at the same time and merged (``Trace.merge``: the newest runs of both):
   a trace attached to the image in the registry as an OCI referrer (``lazyfs trace
   push``), checked against its digests; and the trace a peer keeps (``peer_trace``),
   from the owner of the image's manifest digest first. What arrives within the mount's
   timeout seeds the local trace, so this node serves it to its peers in turn;
3. then, after either, the chunks of the files named at conversion (``lazyfs convert
   --prefetch-files``, kept in the index's ``prefetch_files`` meta entry).

A mount that starts from its node's own trace asks the registry and the peers all the
same, ``refresh_after`` seconds after it starts and once no read waits on the network,
and merges the runs they have that this node has not into the node's trace: runs
recorded elsewhere after this node got its trace reach it for its next mount.

A trace is a hint: one that is missing, malformed, for another image or unreachable is
logged and ignored, and the prefetch goes on in blob order. A trace is not
content-addressed, so one from elsewhere is parsed strictly, bounded in size, and cut
down to the chunks this image's index has (one that names none of them is refused).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from blockindex.format import ChunkDigest, InodeT
from blockindex.reader import IndexReader
from cache.errors import CacheError
from cache.trace import MAX_TRACE_BYTES, TRACE_MEDIA_TYPE, Trace, TraceError, TraceRecorder, TraceStore
from fetcher.errors import FetchError, NotFoundError, ServerError, UnreachableError
from fetcher.mirrors import MirroredClient
from fetcher.peers import PeerIsSelf, PeerTier
from fetcher.race import race
from fetcher.referrers import find_referrers, read_referrer
from fetcher.registry import RegistryClient

from .readlog import ReadLog

log = logging.getLogger(__name__)

PREFETCH_FILES_META = "prefetch_files"
"""Index meta key: JSON list of ``[inode, path]`` to prefetch first (``convert --prefetch-files``)."""


def checked_trace(data: bytes, manifest: str, index_path: Path, where: str) -> Trace:
    """A trace from elsewhere (``where``: ``registry``, ``peer URL``), parsed strictly and
    cut down to the chunks of the image whose index is at ``index_path``, its runs
    labelled ``where``, runs left empty dropped. TraceError if it is malformed, too large,
    for another image, or names none of its chunks. (Its own index connection: this runs
    in a worker thread.)"""
    trace = Trace.parse(data, manifest)
    index = IndexReader(index_path)
    try:
        trace, dropped = trace.restrict(lambda hexd: index.chunk(bytes.fromhex(hexd)) is not None)
    finally:
        index.close()
    if dropped:
        log.warning("trace of %s from %s names %d chunks the image does not have; dropped them",
                    manifest, where, dropped)
    trace.runs = [r for r in trace.runs if r.entries]  # an empty run would only push out others
    if not trace.runs:
        raise TraceError("it names no chunks")
    return trace.labelled(where)


async def peer_trace(tier: PeerTier, manifest: str, index_path: Path, *,
                     before_ask: Callable[[], Awaitable[None]] | None = None) -> Trace | None:
    """The trace of image ``manifest`` from the first peer that has a usable one, or None
    (logged, never raised). Peers are asked in ``PeerSet.trace_holders`` order, the next
    one when the one before fails or has not answered within ``trace_hedge_delay``; each
    request has the peers' ``request_deadline``, and ``before_ask`` (the fetcher's
    ``gate.wait_idle``) runs before each, so that demand reads go first. A peer that
    sends garbage is logged and ignored (its chunks are still welcome: they are checked)."""
    peers = tier.peers
    order = peers.trace_holders(bytes.fromhex(manifest.removeprefix("sha256:")))
    if not order:
        return None

    def ask(peer: str) -> Callable[[], Awaitable[Trace]]:
        async def attempt() -> Trace:
            if before_ask is not None:
                await before_ask()
            try:
                with trio.fail_after(peers.config.request_deadline):
                    data = await tier.client.fetch_trace(peer, manifest, MAX_TRACE_BYTES)
            except trio.TooSlowError:
                peers.mark_down(peer, "no trace within the deadline")
                raise UnreachableError(f"peer {peer}: no answer in time") from None
            except PeerIsSelf:
                peers.mark_self(peer)
                raise
            except UnreachableError as exc:
                peers.mark_down(peer, exc)
                raise
            except NotFoundError as exc:
                log.debug("%s", exc)
                raise
            except FetchError as exc:
                log.warning("could not get the trace of %s from peer %s: %s", manifest, peer, exc)
                raise
            try:
                return await trio.to_thread.run_sync(checked_trace, bytes(data), manifest, index_path,
                                                     f"peer {peer}")
            except TraceError as exc:
                log.warning("peer %s sent a trace of %s that is not usable (%s); ignored",
                            peer, manifest, exc)
                raise ServerError(f"peer {peer} sent a bad trace") from None
        return attempt

    try:
        found = await race([ask(p) for p in order], peers.config.trace_hedge_delay)
    except FetchError:
        log.info("no peer has a usable trace of %s (asked %d)", manifest, len(order))
        return None
    return found.value


async def remote_trace(client: RegistryClient | MirroredClient, manifest: str,
                       index_path: Path | None = None) -> Trace | None:
    """The newest trace attached to image ``manifest`` in its registry, or None (absent,
    bad, or the registry failed: logged, never raised)."""
    origin = client.origin if isinstance(client, MirroredClient) else client
    try:
        found = await find_referrers(origin, manifest, TRACE_MEDIA_TYPE)
        for desc in reversed(found):  # newest first; an older good one beats a newer bad one
            try:
                data = await read_referrer(origin, manifest, desc, TRACE_MEDIA_TYPE, MAX_TRACE_BYTES)
                if index_path is None:
                    return Trace.parse(data, manifest).labelled("registry")
                return await trio.to_thread.run_sync(checked_trace, data, manifest, index_path, "registry")
            except (FetchError, TraceError, ValueError) as exc:
                log.warning("trace referrer %s of %s ignored: %s", desc.get("digest"), manifest, exc)
    except (FetchError, ValueError) as exc:
        log.warning("could not look for a trace of %s in the registry: %s", manifest, exc)
    return None


def prefetch_file_chunks(index: IndexReader) -> list[ChunkDigest]:
    """The chunks of the files the image asks to prefetch first, in list order."""
    raw = index.meta.get(PREFETCH_FILES_META)
    if not raw:
        return []
    try:
        entries = json.loads(raw)
        inos = [int(e[0]) for e in entries]
    except (ValueError, TypeError, IndexError, KeyError):
        log.warning("index entry %s is malformed; ignored", PREFETCH_FILES_META)
        return []
    out: list[ChunkDigest] = []
    for ino in inos:
        try:
            out.extend(c.digest for c in index.chunks_of(InodeT(ino)))
        except Exception as exc:  # a malformed hint must not stop the mount
            log.warning("prefetch file inode %d: %s; ignored", ino, exc)
    return out


class LearnedPrefetch:
    """One mount's recording and lead. ``record_window``: seconds to record after the
    mount (None: until it ends; 0: never)."""

    def __init__(self, cache_dir: Path, manifest: str, index_path: Path, readlog: ReadLog, *,
                 client: RegistryClient | MirroredClient | None, timeout: float,
                 record_window: float | None, peers: PeerTier | None = None,
                 before_ask: Callable[[], Awaitable[None]] | None = None,
                 refresh_after: float = 10.0) -> None:
        """``peers``: ask them for a trace too; ``before_ask`` runs before each such
        request (the fetcher's ``gate.wait_idle``); ``refresh_after``: seconds after the
        start to look elsewhere for runs the node's own trace lacks (0: never)."""
        self.traces = TraceStore(cache_dir)
        self.manifest = manifest
        self.index_path = index_path
        self.readlog = readlog
        self.client = client
        self.peers = peers
        self.before_ask = before_ask
        self.timeout = timeout
        self.runs: list[dict[str, Any]] = []
        """The runs of the trace this mount replays: when recorded, from where, chunks."""
        self.recorder = TraceRecorder(record_window, started=readlog.started)
        readlog.recorder = self.recorder
        self.saved: Path | None = None
        self._saving = threading.Lock()
        self._save_started = False
        self._store_lock = threading.Lock()  # the recording and the refresh both rewrite the trace
        self.refresh_after = refresh_after
        self.refreshed: str | None = None
        """What the refresh did (for status): None until it has run."""
        self._asked_elsewhere = False  # the lead did: the refresh would only ask again

    async def lead(self, index: IndexReader) -> tuple[list[ChunkDigest], str | None]:
        """What the prefetcher fetches first (``Prefetcher``'s ``lead``), and its source."""
        trace = await trio.to_thread.run_sync(self.traces.load, self.manifest)
        source = "local" if trace is not None else None
        if trace is None:
            trace, source = await self._elsewhere()
        if trace is not None:
            self.runs = [{"recorded": r.recorded, "source": r.source, "chunks": len(r.entries)}
                         for r in trace.runs]
        digests = [ChunkDigest(bytes.fromhex(e.chunk)) for e in trace.merged()] if trace else []
        files = await trio.to_thread.run_sync(prefetch_file_chunks, index)
        if files:
            digests += files
            source = f"{source}+index" if source else "index"
        self.readlog.lead = set(digests)
        return digests, source

    async def _elsewhere(self) -> tuple[Trace | None, str | None]:
        """The registry's trace and a peer's, asked at the same time within the mount's
        timeout, merged; saved as this node's trace. The source names where it came
        from (``registry``, ``peer URL``, or both joined by ``+``)."""
        self._asked_elsewhere = True
        trace, source = await self._gather()
        if trace is None:
            return None, None
        log.info("using the trace of %s from %s (%d runs)", self.manifest, source, len(trace.runs))
        try:
            await trio.to_thread.run_sync(self._merge_into_store, trace)
        except CacheError as exc:
            log.warning("%s", exc)
        return trace, source

    def _merge_into_store(self, trace: Trace) -> int:
        """Merge ``trace``'s runs into the node's trace of the image; how many were new."""
        with self._store_lock:
            local = self.traces.load(self.manifest)
            merged = Trace.merge(self.manifest, [local, trace] if local else [trace])
            before = {r.same_run() for r in local.runs} if local else set()
            new = sum(r.same_run() not in before for r in merged.runs)
            if new:
                self.traces.save(merged)
            return new

    async def refresh(self) -> None:
        """Merge the runs the registry and the peers have into the node's own trace, if the
        mount started with one (a task of the mount's nursery; see the module docstring)."""
        if self.refresh_after <= 0 or (self.client is None and self.peers is None):
            return
        await trio.sleep(self.refresh_after)
        if self._asked_elsewhere or await trio.to_thread.run_sync(self.traces.load, self.manifest) is None:
            return  # the lead asked elsewhere already, or there is no trace of its own
        if self.before_ask is not None:
            await self.before_ask()
        trace, source = await self._gather()
        if trace is None:
            self.refreshed = "nothing elsewhere"
            return
        try:
            new = await trio.to_thread.run_sync(self._merge_into_store, trace)
        except CacheError as exc:
            log.warning("%s", exc)
            return
        self.refreshed = f"{new} new runs from {source}"
        if new:
            log.info("merged %d runs of the trace of %s from %s into this node's, for its next mount",
                     new, self.manifest, source)

    async def _gather(self) -> tuple[Trace | None, str | None]:
        """The registry's trace and a peer's, asked at the same time within the mount's
        timeout, merged, and where they came from."""
        found: dict[str, Trace] = {}

        async def from_registry() -> None:
            assert self.client is not None
            trace = await remote_trace(self.client, self.manifest, self.index_path)
            if trace is not None:
                found["registry"] = trace

        async def from_peers() -> None:
            assert self.peers is not None
            trace = await peer_trace(self.peers, self.manifest, self.index_path, before_ask=self.before_ask)
            if trace is not None and trace.runs:
                found[str(trace.runs[0].source)] = trace

        with trio.move_on_after(self.timeout) as scope:
            async with trio.open_nursery() as nursery:
                if self.client is not None:
                    nursery.start_soon(from_registry)
                if self.peers is not None:
                    nursery.start_soon(from_peers)
        if scope.cancelled_caught:
            log.info("looking for a trace of %s took over %gs; using what arrived",
                     self.manifest, self.timeout)
        if not found:
            return None, None
        order = sorted(found, key=lambda k: k != "registry")  # the registry's first: it names shared runs
        return Trace.merge(self.manifest, [found[k] for k in order]), "+".join(order)

    async def record(self) -> None:
        """Save the recording when the window closes (a task of the mount's nursery)."""
        window = self.recorder.window
        if window is None or window <= 0:
            return
        await trio.sleep(window)
        self.recorder.stop()
        await trio.to_thread.run_sync(self.save)

    def save(self) -> None:
        """Merge what was recorded into the image's trace (once; nothing if nothing was read)."""
        self.recorder.stop()
        with self._saving:  # the window's task (a thread) and the unmount may both get here
            if self._save_started or not self.recorder.recorded:
                return
            self._save_started = True
        try:
            index = IndexReader(self.index_path)  # its own connection: this may run in a thread
            try:
                paths = index.paths(self.recorder.inodes())
            finally:
                index.close()
            run = self.recorder.run(paths)
            with self._store_lock:
                self.traces.add_run(self.manifest, run)
            self.saved = self.traces.path(self.manifest)
            log.info("recorded the first reads of %d chunks into %s", len(run.entries), self.saved)
        except (CacheError, OSError) as exc:
            log.warning("could not save the trace: %s", exc)

    def status(self, progress: Any) -> dict[str, Any]:
        return {
            "recording": self.recorder.active,
            "record_window": self.recorder.window,
            "recorded_chunks": self.recorder.recorded,
            "saved": str(self.saved) if self.saved else None,
            "lead_state": progress.lead_state,
            "lead_source": progress.lead_source,
            "lead_chunks": progress.lead_chunks,
            "lead_bytes": progress.lead_bytes,
            "lead_missing": progress.lead_missing,
            "lead_fetched_bytes": progress.lead_fetched_bytes,
            "lead_seconds": progress.lead_seconds,
            "lead_misses": self.readlog.lead_misses,
            "lead_runs": self.runs,
            "refreshed": self.refreshed,
        }
