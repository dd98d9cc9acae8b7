"""Shared fixtures: a directory of small OCI layouts and a real server over it."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockindex.oci import MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json  # noqa: E402
from lazyfs.serve import ServerHandle, make_server  # noqa: E402


@dataclasses.dataclass
class Image:
    layout: Layout
    manifest: bytes
    manifest_digest: str
    blobs: dict[str, bytes]  # digest -> bytes (the layers)

    @property
    def big(self) -> str:
        return max(self.blobs, key=lambda d: len(self.blobs[d]))


def build_image(path: Path, tag: str = "1", big_size: int = 300_000) -> Image:
    layout = Layout(path)
    layout.init()
    payloads = [os.urandom(big_size), b"hello world"]
    layers = [layout.write_blob(p, "application/octet-stream") for p in payloads]
    config = layout.write_blob(b"{}", "application/vnd.oci.image.config.v1+json")
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": config, "layers": layers,
    })
    desc = layout.write_blob(manifest, MEDIA_TYPE_OCI_MANIFEST)
    layout.tag(desc, tag)
    return Image(layout, manifest, desc["digest"],
                 {d["digest"]: p for d, p in zip(layers, payloads, strict=True)})


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Image]:
    root = tmp_path / "root"
    return {name: build_image(root / name) for name in ("app", "team/app")}


@pytest.fixture
def server(tmp_path: Path, images: dict[str, Image]) -> Iterator[ServerHandle]:
    handle = make_server(tmp_path / "root", "127.0.0.1", 0, access_log=tmp_path / "access.log")
    with handle:
        yield handle
