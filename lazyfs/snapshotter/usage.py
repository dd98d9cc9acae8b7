"""What a lazy image takes on this node's disk, layer by layer: the snapshotter's ``Usage``
for remote snapshots, so that kubelet's disk accounting (CRI sums the usage of every
snapshot) sees the node cache filling up.

A lazy image's layers are its index and its chunk blobs, and its remote snapshots are one
per layer; the usage of a layer is the bytes on disk (allocated blocks, as ``du``) and the
number of the node-cache entries it accounts for: the cached index file for the index
layer, the cached chunks that blob holds for a chunk blob. Summed over an image's snapshots
that is what the image takes in the cache, growing as reads and the prefetch fetch chunks.
A chunk shared by two images is counted in each (the cache stores it once).

One pass over the index answers every layer of an image; the answer is kept for ``ttl``
seconds, because CRI asks for every snapshot of an image in one sweep.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from blockindex import format as fmt
from blockindex.errors import IndexFormatError
from blockindex.reader import IndexReader
from cache.errors import CacheError
from cache.images import ImageStore
from cache.store import ChunkStore

log = logging.getLogger(__name__)

Usage = tuple[int, int]  # (bytes on disk, entries)


class CacheUsage:
    """Per-layer usage of lazy images in the node cache at ``root``."""

    def __init__(self, root: Path, *, ttl: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._memo: dict[str, tuple[float, dict[str, Usage]]] = {}
        self._chunks: ChunkStore | None = None

    def layer(self, manifest_digest: str, layer_digest: str) -> Usage:
        """Usage of one layer of the image with this manifest; (0, 0) when the cache
        holds nothing of it (or not even the image's manifest)."""
        return self.image(manifest_digest).get(layer_digest, (0, 0))

    def image(self, manifest_digest: str) -> dict[str, Usage]:
        """Layer digest to usage, for every layer of the image."""
        with self._lock:
            now = self.clock()
            memo = self._memo.get(manifest_digest)
            if memo is not None and now - memo[0] < self.ttl:
                return memo[1]
            layers = self._measure(manifest_digest)
            self._memo[manifest_digest] = (now, layers)
            return layers

    def _measure(self, manifest_digest: str) -> dict[str, Usage]:
        try:
            images = ImageStore(self.root)
            raw = images.manifest(manifest_digest)
            if self._chunks is None:
                self._chunks = ChunkStore(self.root)
        except (ValueError, CacheError):
            return {}
        if raw is None:
            return {}
        layers = [d for d in json.loads(raw).get("layers") or [] if isinstance(d, dict)]
        index = next((d for d in layers if d.get("mediaType") in fmt.BLOCK_INDEX_MEDIA_TYPES), None)
        if index is None:
            return {}
        chunks = self._chunks
        out: dict[str, Usage] = {}
        index_path = images.index_path(index["digest"])
        try:
            out[index["digest"]] = (_allocated(index_path.stat()), 1)
        except FileNotFoundError:
            return {}
        try:
            reader = IndexReader(index_path)
        except IndexFormatError as exc:
            log.warning("usage: cannot read the cached index of %s: %s", manifest_digest, exc)
            return out
        try:
            for chunk in reader.all_chunks():
                try:
                    st = os.stat(chunks.path(chunk.digest))
                except FileNotFoundError:
                    continue
                size, count = out.get(chunk.blob.digest, (0, 0))
                out[chunk.blob.digest] = (size + _allocated(st), count + 1)
        finally:
            reader.close()
        return out


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512
