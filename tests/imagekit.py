"""Build small test images in memory (tars, docker archives, OCI layouts) and read
converted images back through IndexReader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import blake3
import lz4.block

from blockindex.format import CODEC_LZ4, ROOT_INO, Inode, InodeT
from blockindex.oci import Layout
from blockindex.reader import IndexReader

CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "created": "x", "config": {}}).encode()


def entry(
    name: str | bytes,
    data: bytes | None = None,
    *,
    type: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    linkname: str | bytes = "",
    uid: int = 0,
    gid: int = 0,
    mtime: float = 0,
    pax: dict[str, str] | None = None,
    devmajor: int = 0,
    devminor: int = 0,
) -> tuple[tarfile.TarInfo, bytes | None]:
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    if isinstance(linkname, bytes):
        linkname = linkname.decode("utf-8", "surrogateescape")
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type, mode, uid, gid, mtime
    ti.linkname, ti.devmajor, ti.devminor = linkname, devmajor, devminor
    ti.pax_headers = dict(pax or {})
    if data is not None:
        ti.size = len(data)
    return ti, data


def d(name: str, mode: int = 0o755, **kw: Any) -> tuple[tarfile.TarInfo, None]:
    return entry(name, type=tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[return-value]


def make_tar(
    entries: list[tuple[tarfile.TarInfo, bytes | None]], compress: str | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw, mtime=0)
    if compress == "zstd":
        zstd = ["zstd", "-q", "-c"]
        return subprocess.run(zstd, input=raw, capture_output=True, check=True).stdout
    return raw


def docker_archive(path: Path, layers: list[bytes], config: bytes = CONFIG,
                   tags: list[str] | None = None) -> Path:
    files: list[tuple[str, bytes]] = [("config.json", config)]
    names = []
    for i, layer in enumerate(layers):
        names.append(f"l{i}/layer.tar")
        files.append((names[-1], layer))
    manifest = [{"Config": "config.json", "RepoTags": tags or ["test:latest"], "Layers": names}]
    files.append(("manifest.json", json.dumps(manifest).encode()))
    path.write_bytes(make_tar([entry(n, data) for n, data in files]))
    return path


def oci_layout(
    root: Path, layers: list[bytes], config: bytes = CONFIG
) -> tuple[Layout, dict[str, Any]]:
    lay = Layout(root)
    lay.init()
    descs = [lay.write_blob(b, "application/vnd.oci.image.layer.v1.tar") for b in layers]
    cfg = lay.write_blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": descs}
    mdesc = lay.write_blob(json.dumps(manifest).encode(), manifest["mediaType"])
    return lay, mdesc


class Image:
    """A converted image opened for checking."""

    def __init__(self, out: Path, index_digest: str) -> None:
        self.layout = Layout(out)
        self.r = IndexReader(self.layout.blob_path(index_digest))

    def path(self, path: bytes | str) -> Inode:
        if isinstance(path, str):
            path = path.encode()
        node = self.r.attr(InodeT(ROOT_INO))
        for part in [p for p in path.split(b"/") if p]:
            found = self.r.lookup(node.ino, part)
            assert found is not None, f"{path!r}: no {part!r}"
            node = found
        return node

    def exists(self, path: str | bytes) -> bool:
        try:
            self.path(path)
        except AssertionError:
            return False
        return True

    def names(self, path: str | bytes = "/") -> list[bytes]:
        return [name for _, name, _ in self.r.children(self.path(path).ino)]

    def read(self, path: str | bytes) -> bytes:
        return self.read_range(path, 0, self.path(path).size)

    def read_range(self, path: str | bytes, offset: int, size: int) -> bytes:
        ino = self.path(path)
        out = bytearray()
        for span in self.r.chunks(ino.ino, offset, size):
            if span.chunk is None:
                out += bytes(span.length)
                continue
            c = span.chunk
            with open(self.layout.blob_path(c.blob.digest), "rb") as f:
                f.seek(c.offset)
                stored = f.read(c.stored_size)
            data = stored
            if c.codec == CODEC_LZ4:
                data = lz4.block.decompress(stored, uncompressed_size=c.size)
            assert len(data) == c.size
            assert blake3.blake3(data).digest() == c.digest
            out += data[span.chunk_offset : span.chunk_offset + span.length]
        return bytes(out)

    def dump(self) -> list[tuple]:
        """Every path with its attributes, xattrs, target and content digest."""
        out = []
        stack: list[tuple[bytes, int]] = [(b"", ROOT_INO)]
        while stack:
            prefix, ino = stack.pop()
            for _, name, node in self.r.children(InodeT(ino)):
                p = prefix + b"/" + name
                extra: Any = None
                if node.mode & 0o170000 == 0o100000:
                    extra = hashlib.sha256(self.read(p)).hexdigest()
                elif node.mode & 0o170000 == 0o120000:
                    extra = self.r.readlink(node.ino)
                out.append((p, node, sorted(self.r.xattrs(node.ino).items()), extra))
                if node.mode & 0o170000 == 0o040000:
                    stack.append((p, node.ino))
        return out
