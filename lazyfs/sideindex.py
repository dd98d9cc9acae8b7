"""Index an ordinary image in its registry, and find that index again at mount.

    index_image(ref, options, chunk_size=, spacing=)  -> Indexed
    find_side_index(client, manifest_digest)          -> (index digest, bytes) or None
    open_side_index(client, ref, digest, images)      -> (index digest, cached path)

``index_image`` pulls the image into a temp OCI layout (``fetcher.pull``), builds its side
index there (``blockindex.sideindex``) and attaches it to the image's manifest as an OCI
referrer of type ``MEDIA_TYPE_SIDE_INDEX`` (``fetcher.referrers``: the referrers API, else
the tag fallback), as ``lazyfs trace push`` attaches a trace. The image itself is neither
changed nor pushed again. ``mount`` of an image that is not a lazyfs image asks for that
referrer (``find_side_index``) and reads the layers through it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from blockindex.format import ARTIFACT_ANNOTATION, MEDIA_TYPE_SIDE_INDEX
from blockindex.oci import sha256_digest
from blockindex.sideindex import (
    SQLITE_MAGIC,
    SideIndexResult,
    build_side_index,
    unpack_side_index,
)
from fetcher.errors import FetchError, ServerError
from fetcher.imageref import ImageRef
from fetcher.manifests import resolve_image_manifest
from fetcher.mirrors import MirroredClient
from fetcher.options import RegistryOptions
from fetcher.pull import pull_image
from fetcher.referrers import find_referrers, push_referrer, read_referrer
from fetcher.registry import RegistryClient

from .errors import NoSideIndexError

if TYPE_CHECKING:
    from cache.images import ImageStore

log = logging.getLogger(__name__)

MAX_SIDE_INDEX = 1 << 30
"""The largest side index a mount reads (as the largest block index)."""
CHUNK_SIZE_ANNOTATION = "io.lazyfs.chunk-size"
SPACING_ANNOTATION = "io.lazyfs.spacing"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Indexed(SideIndexResult):
    """What a side index holds, and where it went."""

    manifest_digest: str  # the image's, the artifact's subject
    index_digest: str
    artifact_digest: str  # the referrer manifest that carries it


def index_image(ref: ImageRef, options: RegistryOptions, *, chunk_size: int, spacing: int,
                platform: str | None = None) -> Indexed:
    """Build the side index of ``ref`` and attach it to the image in its registry."""
    tmp = Path(tempfile.mkdtemp(prefix="lazyfs-index-"))
    try:
        digest = pull_image(ref, tmp / "layout", options, platform)
        packed = tmp / "side.sqlite.zst"
        built = build_side_index(tmp / "layout", digest, tmp / "side.sqlite", chunk_size=chunk_size,
                                 spacing=spacing, packed_path=packed)
        data = packed.read_bytes()
        artifact = trio.run(_attach, ref, options, platform, digest, data,
                            {CHUNK_SIZE_ANNOTATION: str(chunk_size), SPACING_ANNOTATION: str(spacing)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fields = {f.name: getattr(built, f.name) for f in dataclasses.fields(built)}
    return Indexed(**fields, manifest_digest=digest, index_digest=sha256_digest(data),
                   artifact_digest=artifact)


async def _attach(ref: ImageRef, options: RegistryOptions, platform: str | None, digest: str,
                  data: bytes, annotations: dict[str, str]) -> str:
    async with options.client(ref, push=True) as client:
        manifest = await resolve_image_manifest(client, ref, platform)
        if manifest.digest != digest:
            raise ServerError(f"{ref} changed while it was indexed ({digest} became {manifest.digest}); "
                              "index it again")
        return await push_referrer(client, manifest, MEDIA_TYPE_SIDE_INDEX, data, annotations)


async def find_side_index(client: RegistryClient | MirroredClient, manifest_digest: str,
                          refused: Callable[[str], str | None] = lambda _: None) -> tuple[str, bytes] | None:
    """The newest side index attached to the image ``manifest_digest``: its digest and
    bytes (checked against the digest its artifact names); None when it has none.
    ``refused(digest)`` says why one must not be used (it failed its layer check on this
    node), and it is passed over for the next newest."""
    origin = client.origin if isinstance(client, MirroredClient) else client  # referrers: the registry's
    found = await find_referrers(origin, manifest_digest, MEDIA_TYPE_SIDE_INDEX)
    for desc in reversed(found):
        try:
            data = await read_referrer(origin, manifest_digest, desc, MEDIA_TYPE_SIDE_INDEX, MAX_SIDE_INDEX)
        except FetchError as exc:
            log.warning("side index %s of %s unusable: %s", desc.get("digest"), manifest_digest, exc)
            continue
        digest = sha256_digest(data)
        if (why := refused(digest)) is not None:
            log.warning("side index %s of %s passed over: %s", digest, manifest_digest, why)
            continue
        return digest, data
    return None


async def open_side_index(client: RegistryClient | MirroredClient, ref: ImageRef, manifest_digest: str,
                          images: ImageStore) -> tuple[str, Path]:
    """The side index of the ordinary image ``manifest_digest``, kept in the node cache: its
    digest and path. NoSideIndexError (exit 3) when it has none: the hook for whoever can
    fall back to pulling the image whole."""
    bad: list[str] = []

    def refused(digest: str) -> str | None:
        verdict = images.layer_check(manifest_digest, digest)
        if verdict is None or not verdict.startswith("failed"):
            return None
        bad.append(digest)
        return f"it failed its layer check on this node ({verdict.removeprefix('failed: ')})"

    found = await find_side_index(client, manifest_digest, refused)
    if found is None and bad:
        raise NoSideIndexError(f"{ref} is not a lazyfs image, and its side index {bad[0]} failed its "
                               f"layer check on this node (it does not match the image's layers): "
                               f"attach an honest one (lazyfs index docker://{ref}) or convert the image")
    if found is None:
        raise NoSideIndexError(f"{ref} is not a lazyfs image and has no side index (attach one: "
                               f"lazyfs index docker://{ref}; or convert it)")
    index_digest, data = found

    def keep() -> Path:  # hashed, or written, off the loop: an index may be megabytes
        if data.startswith(SQLITE_MAGIC):  # as pushed before side indexes were compressed
            return images.verified_index(index_digest) or images.save_index(index_digest, data)
        # kept decompressed, as an index this node built from the pushed blob
        built = images.built_index(index_digest)
        if built is not None:
            return built
        plain = unpack_side_index(data, MAX_SIDE_INDEX)
        return images.save_built_index(index_digest, sha256_digest(plain), plain)

    return index_digest, await trio.to_thread.run_sync(keep)


def is_lazy_image(manifest: dict[str, Any]) -> bool:
    """Whether a manifest is a converted lazyfs image's (else: an ordinary image)."""
    annotations = manifest.get("annotations") or {}
    return isinstance(annotations, dict) and annotations.get(ARTIFACT_ANNOTATION) is not None
