"""Convert an image into a lazyfs image: the public entry point of building.

    convert("docker-archive:app.tar", "oci:out:app")

reads the source's layers once each, in order, merges them in memory (``tree``), chunks
and compresses file data as it streams past (``build.ChunkSpool``), then packs the chunks
the final tree uses into blobs, writes the index, and tags an OCI manifest in the output
layout. Nothing is written outside the output directory; the same input gives
byte-identical blobs and manifest.

How containerd sees the result: its unpacker and ``image.RootFS`` pair the manifest's
layers with the config's ``rootfs.diff_ids`` one to one (a mismatch fails the unpack), and
snapshots are named by the chain ids of those diff ids. The original diff ids describe tar
layers this image no longer has, so the config is the original one except that
``rootfs.diff_ids`` lists the digests of the lazy layers (the index, then the chunk blobs:
they are stored uncompressed, and a diff id is the digest of a layer's uncompressed bytes).
The original diff ids are kept in the manifest annotation ``io.lazyfs.source-diff-ids``
(comma-separated) so the image can be traced back to its source.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from .build import BLOB_LIMIT, ChunkSpool, write_image
from .errors import ImageError
from .format import (
    ARTIFACT_ANNOTATION,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
)
from .ingest import apply_tar, scan_dir
from .oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json
from .sources import Source, open_source, split_tag
from .tree import MAX_ENTRIES, Tree

CHUNK_SIZE_ANNOTATION = "io.lazyfs.chunk-size"
SOURCE_DIFF_IDS_ANNOTATION = "io.lazyfs.source-diff-ids"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConvertResult:
    """What a conversion produced."""

    manifest_digest: str  # the tagged OCI manifest
    index_digest: str  # the block index blob
    image_bytes: int  # sum of the sizes of the regular files (each inode once)
    stored_bytes: int  # sum of the sizes of the chunk blobs
    files: int  # regular-file inodes
    chunks: int  # unique stored chunks
    blobs: int  # chunk blobs


def convert(
    src: str,
    dst: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    blob_limit: int = BLOB_LIMIT,
    prefetch_files: list[bytes] | None = None,
    max_entries: int = MAX_ENTRIES,
) -> ConvertResult:
    """Convert local image ``src`` (see ``sources``) into lazyfs image ``dst``
    (``oci:DIR[:TAG]``, tag ``latest``). Images in registries are pulled and pushed
    above the format, by ``lazyfs.convert``.

    ``prefetch_files`` are paths in the image that mounts fetch first (kept in the index:
    see ``build.write_image``). ``max_entries`` bounds the merged tree (``tree.MAX_ENTRIES``):
    past it the image is refused as unsafe.

    Raises ImageError (or its UnsafeImageError / UnsupportedImageError) for a bad input,
    ValueError for a chunk size outside [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE] or not a power
    of two. ``blob_limit`` caps the size of a chunk blob (64 MiB; smaller in tests).
    """
    check_chunk_size(chunk_size)
    out_dir, tag = _parse_dst(dst)
    source = open_source(src)
    layout = Layout(out_dir)
    try:
        layout.init()
        tmpdir = Path(tempfile.mkdtemp(prefix=".convert-", dir=layout.root))
    except OSError as exc:
        raise ImageError(f"{out_dir}: cannot create the output layout ({exc.strerror})") from exc
    try:
        spool = ChunkSpool(tmpdir / "spool", chunk_size)
        try:
            tree = _merge(source, spool, max_entries)
            stats = write_image(
                tree, spool, layout, tmpdir, chunk_size=chunk_size, blob_limit=blob_limit,
                prefetch_files=prefetch_files or (),
            )
        finally:
            spool.close()
        layers = [stats.index_desc, *stats.blob_descs]
        config, source_diff_ids = lazy_config(source.config, layers)
        config_desc = layout.write_blob(config, MEDIA_TYPE_OCI_CONFIG)
        annotations = {ARTIFACT_ANNOTATION: FORMAT_VERSION, CHUNK_SIZE_ANNOTATION: str(chunk_size)}
        if source_diff_ids:
            annotations[SOURCE_DIFF_IDS_ANNOTATION] = ",".join(source_diff_ids)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": config_desc,
            "layers": layers,
            "annotations": annotations,
        }
        manifest_desc = layout.write_blob(canonical_json(manifest), MEDIA_TYPE_OCI_MANIFEST)
        layout.tag(manifest_desc, tag)
    finally:
        source.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ConvertResult(
        manifest_digest=manifest_desc["digest"],
        index_digest=stats.index_desc["digest"],
        image_bytes=stats.image_bytes,
        stored_bytes=sum(d["size"] for d in stats.blob_descs),
        files=stats.files,
        chunks=stats.chunks,
        blobs=len(stats.blob_descs),
    )


def check_chunk_size(chunk_size: int) -> None:
    """ValueError unless ``chunk_size`` is a power of two in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk size {chunk_size}: expected a power of two from {MIN_CHUNK_SIZE} "
            f"to {MAX_CHUNK_SIZE}"
        )


def lazy_config(original: bytes, layers: list[dict]) -> tuple[bytes, list[str]]:
    """The config for the lazy image: ``original`` with ``rootfs.diff_ids`` naming the
    lazy ``layers`` (see the module docstring); also the original diff ids."""
    try:
        config = json.loads(original)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"the image config is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ImageError("the image config is not a JSON object")
    rootfs = config.get("rootfs")
    source = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    source_ids = [str(d) for d in source] if isinstance(source, list) else []
    config["rootfs"] = {"type": "layers", "diff_ids": [d["digest"] for d in layers]}
    return canonical_json(config), source_ids


def _parse_dst(dst: str) -> tuple[str, str]:
    scheme, sep, rest = dst.partition(":")
    if scheme != "oci" or not sep or not rest:
        raise ImageError(f"unknown destination {dst!r}: expected oci:DIR[:TAG]")
    path, tag = split_tag(rest)
    return path, tag or "latest"


def _merge(source: Source, spool: ChunkSpool, max_entries: int) -> Tree:
    tree = Tree(max_entries)
    if source.directory is not None:
        scan_dir(tree, spool, source.directory)
        return tree
    for number, layer in enumerate(source.layers):
        spool.layer = number
        with layer.open() as stream:
            apply_tar(tree, spool, stream, layer.name, number)
    return tree
