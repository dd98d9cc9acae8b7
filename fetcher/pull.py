"""Pull an image from a registry into an OCI image layout on disk (for ``convert``).

    pull_image(ref, layout_dir, options, platform=None) -> manifest digest

The manifest (Docker schema 2 or OCI; an index is resolved to one platform, this host's
unless told) is kept byte for byte and tagged ``pulled``; its config and layer blobs are
streamed to disk and checked against their digests. Blobs download a few at a time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import trio

from blockindex.errors import ImageError
from blockindex.oci import Layout, check_digest

from .imageref import ImageRef
from .manifests import resolve_image_manifest
from .options import RegistryOptions

log = logging.getLogger(__name__)

PULLED_TAG = "pulled"
PARALLEL_DOWNLOADS = 4


def pull_image(ref: ImageRef, layout_dir: Path, options: RegistryOptions,
               platform: str | None = None) -> str:
    """Pull ``ref`` into the layout at ``layout_dir``; the image manifest's digest."""
    return trio.run(_pull, ref, Layout(layout_dir), options, platform)


async def _pull(ref: ImageRef, layout: Layout, options: RegistryOptions,
                platform: str | None) -> str:
    layout.init()
    async with options.client(ref) as client:
        manifest = await resolve_image_manifest(client, ref, platform)
        doc = manifest.json()
        if doc.get("schemaVersion") == 1:
            raise ImageError(f"{ref}: Docker schema 1 manifests are not supported (re-push the image)")
        config, layers = doc.get("config"), doc.get("layers")
        if not isinstance(config, dict) or not isinstance(layers, list) or not all(
            isinstance(d, dict) for d in layers
        ):
            raise ImageError(f"{ref}: manifest {manifest.digest} is not an image manifest")
        limiter = trio.CapacityLimiter(PARALLEL_DOWNLOADS)

        async def fetch(desc: dict) -> None:
            digest = check_digest(str(desc.get("digest", "")))
            path = layout.blob_path(digest)
            if path.exists():
                return
            async with limiter:
                size = desc.get("size")
                cap = size if isinstance(size, int) and size >= 0 else 1 << 40
                got = await client.download_blob(digest, str(path), max_size=cap)
                log.debug("pulled %s (%d bytes)", digest, got)

        async with trio.open_nursery() as nursery:
            for desc in [config, *layers]:
                nursery.start_soon(fetch, desc)
    desc = layout.write_blob(manifest.data, manifest.media_type or json.loads(manifest.data).get(
        "mediaType", "application/vnd.oci.image.manifest.v1+json"))
    layout.tag(desc, PULLED_TAG)
    return manifest.digest


__all__ = ["pull_image", "PULLED_TAG"]
