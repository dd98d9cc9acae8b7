"""Mount an eStargz image lazily: its index is built on this node from the layers' TOCs.

    if is_estargz_image(manifest):
        index_digest, path = await open_estargz(client, ref, manifest, images)

Per layer, two range requests: its footer (the last ``FOOTER_SIZE`` bytes), then its TOC
member (from the offset the footer names to the footer). The TOC's JSON is checked against
the layer's ``containerd.io/snapshot/stargz/toc.digest`` annotation (``IntegrityError``,
exit 6, when it does not match: the manifest is what a mount trusts), then the index is
built in a worker thread (``blockindex.estargzindex``) and kept in the node cache under
the layers' digests and TOC digests (``ImageStore.built_index``): a second mount of the
image, or of another image of the same layers, reads no TOC again. The chunks are then
read as any index's, each a range of its layer, inflated and checked against its
``chunkDigest`` (``blockindex.codec``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import trio

from blockindex.errors import ImageError, UnsupportedImageError
from blockindex.estargz import (
    FOOTER_SIZE,
    MAX_TOC,
    TOC_DIGEST_ANNOTATION,
    parse_toc,
    toc_json,
    toc_offset,
)
from blockindex.estargzindex import EstargzIndexResult, EstargzLayer, build_estargz_index
from blockindex.oci import check_digest, sha256_digest
from cache.images import ImageStore
from fetcher.errors import IntegrityError
from fetcher.imageref import ImageRef
from fetcher.mirrors import MirroredClient
from fetcher.registry import RegistryClient

log = logging.getLogger(__name__)

BUILD_RULES = "1"
"""Part of the key an index built here is kept under: an index built by other rules is
built again."""


def estargz_key(descs: list[dict[str, Any]]) -> str:
    """What an index built from these layer descriptors is kept under (a sha256 digest)."""
    parts = [[d.get("digest"), d.get("size"), d["annotations"][TOC_DIGEST_ANNOTATION]] for d in descs]
    return sha256_digest(json.dumps([BUILD_RULES, parts]).encode())


async def open_estargz(client: RegistryClient | MirroredClient, ref: ImageRef, manifest: dict[str, Any],
                       images: ImageStore) -> tuple[str, Path, bool]:
    """The index of the eStargz image ``manifest`` (every layer annotated: the caller asked
    ``is_estargz_image``): its digest, its path in the node cache, and whether it was built
    now (False: this node had built it before)."""
    descs: list[dict[str, Any]] = manifest["layers"]
    key = estargz_key(descs)
    path = await trio.to_thread.run_sync(images.built_index, key)  # hashed: off the loop
    if path is not None:
        return f"sha256:{path.name}", path, False
    layers = [await _read_layer(client, ref, desc) for desc in descs]
    built, digest, kept = await trio.to_thread.run_sync(_build, layers, images, key)
    log.info("built the index of %s from its eStargz TOCs: %d files, %d chunks of %d bytes (%s)",
             ref, built.files, built.chunks, built.chunk_size, digest)
    return digest, kept, True


def _build(layers: list[EstargzLayer], images: ImageStore, key: str) -> tuple[EstargzIndexResult, str, Path]:
    """Build the index and keep it in the node cache under ``key`` (in a worker thread)."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-estargz-") as tmp:
        out = Path(tmp) / "index.sqlite"
        built = build_estargz_index(layers, out)
        data = out.read_bytes()
    digest = sha256_digest(data)
    return built, digest, images.save_built_index(key, digest, data)


async def _read_layer(client: RegistryClient | MirroredClient, ref: ImageRef,
                      desc: dict[str, Any]) -> EstargzLayer:
    """One layer's TOC, fetched, checked against its annotation and parsed."""
    digest = check_digest(str(desc.get("digest", "")))
    size = desc.get("size")
    if type(size) is not int or size <= FOOTER_SIZE:
        raise ImageError(f"{ref}: layer {digest} of size {size!r} cannot be eStargz")
    want = str(desc["annotations"][TOC_DIGEST_ANNOTATION])
    footer = bytes(await client.read_range(digest, size - FOOTER_SIZE, FOOTER_SIZE))
    try:
        offset = toc_offset(footer, size)
    except ImageError as exc:
        raise type(exc)(f"{ref}: layer {digest}: {exc}") from None
    length = size - FOOTER_SIZE - offset
    if length > MAX_TOC:
        raise UnsupportedImageError(f"{ref}: layer {digest}: an eStargz TOC of {length} compressed bytes "
                                    f"(at most {MAX_TOC})")
    member = bytes(await client.read_range(digest, offset, length))

    def check_and_parse() -> EstargzLayer:
        try:
            data = toc_json(member)
            if "sha256:" + hashlib.sha256(data).hexdigest() != want:
                raise IntegrityError(f"{ref}: the eStargz TOC of layer {digest} does not match the "
                                     f"digest its manifest names ({want[:19]}...)")
            return EstargzLayer(digest, size, parse_toc(data, toc_offset=offset))
        except ImageError as exc:
            raise type(exc)(f"{ref}: layer {digest}: {exc}") from None

    return await trio.to_thread.run_sync(check_and_parse)
