"""``lazyfs images REF``: what an image in a registry is: lazy or not, its size, and for a
lazyfs image its files and chunks (from its index, downloaded to a temporary file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockindex import format as fmt

from ..errors import ExitCode, UserError
from .common import human, seconds
from .registry import add_registry_arguments, image_ref, registry_options

if TYPE_CHECKING:
    from fetcher.imageref import ImageRef
    from fetcher.options import RegistryOptions

    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("images", help="describe an image in a registry: lazy or not, size, chunks, files")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="which image of an index")
    p.add_argument("--timeout", type=seconds,
                   help="seconds one registry request may take (default: the config file's, else 30)")
    add_registry_arguments(p)
    p.set_defaults(func=cmd_images)


def cmd_images(args: argparse.Namespace) -> int:
    import trio  # with httpx, the registry client: for this command only

    ref = image_ref(args.ref)
    info = trio.run(describe_image, ref, registry_options(args), args.platform)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"{info['ref']}")
    print(f"  manifest  {info['digest']} ({info['media_type']})")
    if info["lazy"]:
        print(f"  lazy      yes (lazyfs format {info['format']}, chunk size {human(info['chunk_size'])})")
        print(f"  files     {info['files']} files, {human(info['file_bytes'])}")
        print(f"  chunks    {info['chunks']} in {info['blobs']} blobs, {human(info['stored_bytes'])} stored")
        print(f"  index     {info['index']} ({human(info['index_size'])})")
    else:
        print(f"  lazy      no (an ordinary image: {info['layers']} layers, {human(info['stored_bytes'])}; "
              f"convert it with lazyfs convert docker://{args.ref} docker://REPO:TAG)")
    return 0


async def describe_image(ref: ImageRef, options: RegistryOptions, platform: str | None) -> dict[str, Any]:
    """What ``images --json`` prints: a JSON object (the image's config among it)."""
    import tempfile

    # the index reader (sqlite3), the converter's names and the registry client: when used
    from blockindex.convert import CHUNK_SIZE_ANNOTATION
    from blockindex.reader import IndexReader
    from fetcher.manifests import resolve_image_manifest

    async with options.client(ref) as client:
        manifest = await resolve_image_manifest(client, ref, platform)
        doc = manifest.json()
        layers = [d for d in doc.get("layers") or [] if isinstance(d, dict)]
        annotations = doc.get("annotations") or {}
        info: dict[str, Any] = {
            "ref": str(ref), "digest": manifest.digest, "media_type": manifest.media_type,
            "lazy": fmt.ARTIFACT_ANNOTATION in annotations, "layers": len(layers),
            "stored_bytes": sum(int(d.get("size", 0)) for d in layers),
        }
        config_desc = doc.get("config") or {}
        if isinstance(config_desc.get("digest"), str):
            try:
                info["config"] = json.loads(await client.read_blob(config_desc["digest"], max_size=4 << 20))
            except ValueError:
                info["config"] = None
        if not info["lazy"]:
            return info
        index_desc = next((d for d in layers if d.get("mediaType") in fmt.BLOCK_INDEX_MEDIA_TYPES), None)
        if index_desc is None:
            raise UserError(f"{ref}: lazyfs image manifest has no index layer", ExitCode.IMAGE)
        size = index_desc.get("size")
        if type(size) is not int or not 0 < size <= 1 << 30:
            raise UserError(f"{ref}: index size {size!r} is out of range", ExitCode.IMAGE)
        with tempfile.TemporaryDirectory() as tmp:  # never more than its declared size
            path = Path(tmp) / "index.sqlite"
            await client.download_blob(index_desc["digest"], str(path), size=size)
            reader = IndexReader(path)
            try:
                totals = reader.totals()
            finally:
                reader.close()
    info.update(
        format=annotations.get(fmt.ARTIFACT_ANNOTATION),
        chunk_size=int(annotations.get(CHUNK_SIZE_ANNOTATION, 0)),
        files=totals["files"], file_bytes=totals["file_bytes"], chunks=totals["chunks"],
        blobs=len(layers) - 1, index=index_desc["digest"], index_size=size,
        stored_bytes=sum(int(d.get("size", 0)) for d in layers if d is not index_desc),
    )
    return info
