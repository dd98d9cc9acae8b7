"""Learned prefetch, the mount's side: record this run's first reads, and tell the
prefetcher what to fetch first.

The order to fetch first (the *lead*) is, in this order of preference:

1. the trace this node's cache keeps for the image (``CACHE/traces/``, see ``cache.trace``);
2. else a trace attached to the image in the registry as an OCI referrer (``lazyfs trace
   push``), checked against its digests; it then seeds the local trace;
3. then, after either, the chunks of the files named at conversion (``lazyfs convert
   --prefetch-files``, kept in the index's ``prefetch_files`` meta entry).

A trace is a hint: one that is missing, malformed, for another image or unreachable is
logged and ignored, and the prefetch goes on in blob order.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import trio

from blockindex.format import ChunkDigest, InodeT
from blockindex.reader import IndexReader
from cache.errors import CacheError
from cache.trace import MAX_TRACE_BYTES, TRACE_MEDIA_TYPE, Trace, TraceError, TraceRecorder, TraceStore
from fetcher.errors import FetchError
from fetcher.mirrors import MirroredClient
from fetcher.referrers import find_referrers, read_referrer
from fetcher.registry import RegistryClient

from .readlog import ReadLog

log = logging.getLogger(__name__)

PREFETCH_FILES_META = "prefetch_files"
"""Index meta key: JSON list of ``[inode, path]`` to prefetch first (``convert --prefetch-files``)."""


async def remote_trace(client: RegistryClient | MirroredClient, manifest: str) -> Trace | None:
    """The newest trace attached to image ``manifest`` in its registry, or None (absent,
    bad, or the registry failed: logged, never raised)."""
    origin = client.origin if isinstance(client, MirroredClient) else client
    try:
        found = await find_referrers(origin, manifest, TRACE_MEDIA_TYPE)
        for desc in reversed(found):  # newest first; an older good one beats a newer bad one
            try:
                data = await read_referrer(origin, manifest, desc, TRACE_MEDIA_TYPE, MAX_TRACE_BYTES)
                return Trace.parse(data, manifest)
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
                 record_window: float | None) -> None:
        self.traces = TraceStore(cache_dir)
        self.manifest = manifest
        self.index_path = index_path
        self.readlog = readlog
        self.client = client
        self.timeout = timeout
        self.recorder = TraceRecorder(record_window, started=readlog.started)
        readlog.recorder = self.recorder
        self.saved: Path | None = None
        self._saving = threading.Lock()
        self._save_started = False

    async def lead(self, index: IndexReader) -> tuple[list[ChunkDigest], str | None]:
        """What the prefetcher fetches first (``Prefetcher``'s ``lead``), and its source."""
        trace = await trio.to_thread.run_sync(self.traces.load, self.manifest)
        source = "local" if trace is not None else None
        if trace is None and self.client is not None:
            with trio.move_on_after(self.timeout):
                trace = await remote_trace(self.client, self.manifest)
            if trace is not None:
                source = "registry"
                log.info("using the trace of %s from the registry (%d runs)", self.manifest, len(trace.runs))
                try:
                    await trio.to_thread.run_sync(self.traces.save, trace)
                except CacheError as exc:
                    log.warning("%s", exc)
        digests = [ChunkDigest(bytes.fromhex(e.chunk)) for e in trace.merged()] if trace else []
        files = await trio.to_thread.run_sync(prefetch_file_chunks, index)
        if files:
            digests += files
            source = f"{source}+index" if source else "index"
        self.readlog.lead = set(digests)
        return digests, source

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
        }
