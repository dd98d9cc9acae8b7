"""What a mount opens first: an image's manifest and its verified index.

    opened = await open_image(ref, client, images, wait=30.0, peers=tier)

The manifest comes from the registry (or, when it cannot be reached or the mount is
offline, from what this node cached before). An ordinary image is read through the index
this node builds from its eStargz TOCs (``estargz.py``) when every layer names one, else
through its side index (``sideindex.py``). The index comes from the node's cache if it
is there; otherwise it is fetched once for the node (``cache.onefetch``), from its owner
among the peers first, then the next owner, then the origin (``fetcher.blobroute``),
streamed to disk, never more than its declared size, and checked against its digest
before anything uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from blockindex import format as fmt
from blockindex.errors import ImageError
from blockindex.estargz import is_estargz_image
from blockindex.oci import check_digest
from cache.errors import CacheError
from cache.images import ImageStore
from cache.onefetch import from_origin, index_once
from fetcher.blobroute import MAX_INDEX_SIZE, blob_seconds, fetch_blob
from fetcher.errors import DeadlineError, FetchError, UnreachableError
from fetcher.imageref import ImageRef
from fetcher.manifests import resolve_image_manifest
from fetcher.mirrors import MirroredClient
from fetcher.peers import PeerTier
from fetcher.registry import RegistryClient

from .errors import MountError, NotLazyImageError
from .estargz import open_estargz
from .sideindex import is_lazy_image, open_side_index

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OpenedImage:
    manifest_digest: str
    index_digest: str
    index_path: Path
    from_cache_only: bool
    index_source: str = "cache"
    """Where the index came from: ``cache``, ``origin`` or a peer's URL."""
    layers: tuple[tuple[str, int], ...] | None = None
    """For an ordinary image read by its side index: the manifest's layers (digest, size),
    which the image digest covers and the side index does not."""


def _index_descriptor(manifest: dict[str, Any], ref: str) -> dict[str, Any]:
    layers = manifest.get("layers") or []
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") in fmt.BLOCK_INDEX_MEDIA_TYPES:
            try:
                check_digest(layer.get("digest", ""))
            except ImageError as exc:
                raise NotLazyImageError(f"{ref}: index layer: {exc}") from None
            return layer
    raise NotLazyImageError(f"{ref}: lazyfs image manifest has no index layer")


def _layers(manifest: dict[str, Any], ref: str) -> tuple[tuple[str, int], ...]:
    """The manifest's layers as (digest, size): what a side index is checked against."""
    layers = manifest.get("layers")
    out = []
    for layer in layers if isinstance(layers, list) else []:
        size = layer.get("size") if isinstance(layer, dict) else None
        if type(size) is not int or size < 0:
            raise NotLazyImageError(f"{ref}: a layer without a size")
        try:
            out.append((check_digest(str(layer.get("digest", ""))), size))
        except ImageError as exc:
            raise NotLazyImageError(f"{ref}: a layer: {exc}") from None
    return tuple(out)


@contextlib.contextmanager
def _within(seconds: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError as exc:
        raise DeadlineError(f"{what} did not arrive within {seconds:.0f} s") from exc


async def open_image(ref: ImageRef, client: RegistryClient | MirroredClient | None, images: ImageStore,
                     *, wait: float, peers: PeerTier | None = None) -> OpenedImage:
    """Resolve ``ref`` to a manifest and a verified index file, from the registry (the
    index from ``peers`` first) or, when it cannot be reached (or ``client`` is None:
    offline), from what this node cached before."""
    from_cache = client is None
    manifest_bytes: bytes | None = None
    digest: str | None = None
    if client is not None:
        try:
            # each wait has its own timeout; this bounds a server that answers byte by byte
            with _within(3 * wait, f"the manifest of {ref}"):
                m = await resolve_image_manifest(client, ref)
            manifest_bytes, digest = m.data, m.digest
        except UnreachableError as exc:
            log.warning("registry unreachable (%s); trying the cache", exc)
            from_cache = True
            fallback_error: FetchError = exc
    if from_cache:
        digest = ref.digest or images.resolve(str(ref))
        manifest_bytes = images.manifest(digest) if digest else None
        if manifest_bytes is None:
            if client is None:
                raise MountError(f"{ref} is not in the cache at {images.root}; mount it online once")
            raise fallback_error
    assert digest is not None and manifest_bytes is not None
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, RecursionError) as exc:  # nested too deep: RecursionError
        raise NotLazyImageError(f"{ref}: manifest is not JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise NotLazyImageError(f"{ref}: manifest is not a JSON object")
    if not is_lazy_image(manifest):  # an ordinary image: by its TOCs (eStargz) or side index
        if client is None or from_cache:
            raise MountError(f"{ref} is an ordinary image, read by its side index or eStargz TOCs: "
                             "mount it online")
        if is_estargz_image(manifest):
            with _within(3 * wait + 60, f"the eStargz TOCs of {ref}"):
                built_digest, built_path, fetched = await open_estargz(client, ref, manifest, images)
            return OpenedImage(digest, built_digest, built_path, False,
                               index_source="origin" if fetched else "cache")
        with _within(3 * wait + 60, f"the side index of {ref}"):
            side_digest, side_path = await open_side_index(client, ref, digest, images)
        return OpenedImage(digest, side_digest, side_path, False, index_source="origin",
                           layers=_layers(manifest, str(ref)))
    desc = _index_descriptor(manifest, str(ref))
    index_digest = str(desc.get("digest"))
    if not from_cache:
        try:
            images.save_manifest(str(ref), digest, manifest_bytes)
        except CacheError as exc:  # a full cache disk: only an offline remount is lost
            log.warning("%s; the image will not mount offline", exc)
    path = images.verified_index(index_digest)
    source = "cache"
    if path is None:
        if client is None or from_cache:
            raise MountError(f"the index of {ref} is not in the cache; mount it online once")
        size = desc.get("size", 0)
        if type(size) is not int or not 0 < size <= MAX_INDEX_SIZE:
            raise NotLazyImageError(f"{ref}: index size {size} is out of range")
        registry = client

        async def origin(target: Path) -> None:
            async with from_origin(images, index_digest, deadline=trio.current_time() + seconds):
                await registry.download_blob(index_digest, str(target), size=size)

        async def fetch(target: Path) -> None:
            nonlocal source
            source = await fetch_blob(peers, index_digest, size, target, origin, wait=wait)

        # each source has its own deadline (fetch_blob); this bounds them all, and the
        # wait for another process of this node that fetches it
        sources = 1 + (peers.peers.config.owners_asked if peers else 0)
        seconds = sources * blob_seconds(size, wait)
        with _within(seconds, f"the index of {ref} ({size} bytes)"):
            path, _ = await index_once(images, index_digest, fetch, deadline=trio.current_time() + seconds)
    return OpenedImage(digest, index_digest, path, from_cache, source)
