"""The images a cache knows about, and which chunks each needs.

An image is known when its manifest is under ``manifests/``; its chunks are listed by
its index under ``indexes/`` (both kept by every mount for offline remounts). The
eviction, ``lazyfs cache`` and the pins all ask here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import urllib.parse

from blockindex import format as fmt
from blockindex.errors import IndexFormatError
from blockindex.format import Chunk
from blockindex.reader import IndexReader

from .images import ImageStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KnownImage:
    manifest: str
    """``sha256:...`` of the manifest."""
    index: str | None
    """``sha256:...`` of the block index, None when the manifest names none."""
    refs: tuple[str, ...]
    """References that last resolved to this manifest on this node."""


def known_images(images: ImageStore) -> list[KnownImage]:
    """Every image whose manifest is cached, with the references naming it."""
    names: dict[str, list[str]] = {}
    try:
        for quoted in os.listdir(images.root / "refs"):
            if quoted.startswith("."):
                continue  # a temp file being written
            ref = urllib.parse.unquote(quoted)
            digest = images.resolve(ref)
            if digest:
                names.setdefault(digest, []).append(ref)
    except OSError:
        pass
    out = []
    try:
        hexes = sorted(n for n in os.listdir(images.root / "manifests") if not n.startswith("."))
    except OSError:
        hexes = []
    for hexd in hexes:
        digest = f"sha256:{hexd}"
        try:
            data = images.manifest(digest)
        except ValueError:
            continue  # not a name the store writes
        if data is None:
            continue
        out.append(KnownImage(digest, index_digest(data), tuple(sorted(names.get(digest, [])))))
    return out


def index_digest(manifest: bytes) -> str | None:
    try:
        doc = json.loads(manifest)
        for layer in doc.get("layers") or []:
            if isinstance(layer, dict) and layer.get("mediaType") in fmt.BLOCK_INDEX_MEDIA_TYPES:
                return str(layer["digest"])
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def image_chunks(images: ImageStore, index: str) -> list[Chunk] | None:
    """The chunks of the image with block index ``index``; None when the index is not
    cached or unreadable."""
    try:
        path = images.index_path(index)
    except ValueError:
        return None
    if not path.exists():
        return None
    try:
        reader = IndexReader(path)
    except (IndexFormatError, OSError) as exc:
        log.warning("cached index %s is unreadable: %s", index, exc)
        return None
    try:
        return list(reader.all_chunks())
    except (IndexFormatError, OSError, sqlite3.Error) as exc:
        log.warning("cached index %s is unreadable: %s", index, exc)
        return None
    finally:
        reader.close()
