"""A failed read is logged once as key=value fields naming the image, the file, the
chunk, its blob and the source (issue 7, observability)."""

from __future__ import annotations

import errno
import re
import shutil

import pytest

from blockindex.oci import Layout
from blockindex.reader import IndexReader
from fetcher.errors import DeadlineError, FetchError, IntegrityError, UnreachableError
from lazyfs.failures import ReadFailures, kind_of
from lazyfs.serve import make_server
from tests.cachekit import make_image, manifest_of


def _fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}


@pytest.fixture(scope="module")
def fail_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures") / "images"
    files = make_image(root, "f", {"big file.bin": 300_000, "small": 1000}, seed=41)
    return root, files


def test_kinds_and_fields_without_a_mount(fail_image):
    assert kind_of(IntegrityError("x")) == "integrity"
    assert kind_of(DeadlineError("x")) == "timeout"
    assert kind_of(UnreachableError("chunk 00 is not cached and the mount is offline")) == "offline"
    assert kind_of(FetchError("reset")) == "network"
    root, _ = fail_image
    _, _, manifest = manifest_of(root, "f")
    index = IndexReader(Layout(root / "f").blob_path(manifest["layers"][0]["digest"]))
    small = index.lookup(1, b"small")
    f = ReadFailures(index, "sha256:" + "ab" * 32)
    exc = UnreachableError("connection refused").about(source="origin")
    fields = f.fields(small.ino, 0, 4096, exc)
    [chunk] = index.chunks_of(small.ino)
    assert fields == {"kind": "network", "image": "sha256:" + "ab" * 32, "path": "/small", "inode": small.ino,
                      "range": "0+4096", "chunk": chunk.hexdigest, "blob": chunk.blob.digest,
                      "source": "origin", "error": "connection refused"}
    index.close()


@pytest.mark.mount
def test_altered_chunk_failure_names_image_file_chunk_blob_and_source(fail_image, mounts, tmp_path):
    src, files = fail_image
    root = tmp_path / "images"
    shutil.copytree(src, root)
    digest, _, manifest = manifest_of(root, "f")
    index = IndexReader(Layout(root / "f").blob_path(manifest["layers"][0]["digest"]))
    node = index.lookup(1, b"big file.bin")
    chunk = index.chunks_of(node.ino)[1]
    index.close()
    blob = Layout(root / "f").blob_path(chunk.blob.digest)
    data = bytearray(blob.read_bytes())
    data[chunk.offset + 7] ^= 0x55
    blob.write_bytes(bytes(data))
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/f:1", "--no-prefetch")
        with open(mnt / "big file.bin", "rb") as fh:
            fh.seek(chunk.size + 10)
            with pytest.raises(OSError) as e:
                fh.read(100)
        assert e.value.errno == errno.EIO
    finally:
        server.close()
    lines = [ln for ln in mounts.log().splitlines() if "read failed (EIO)" in ln]
    assert lines, mounts.log()
    fields = _fields(lines[0])
    assert fields["kind"] == "integrity"
    assert fields["image"] == digest
    assert fields["path"] == "/big file.bin"
    assert fields["chunk"] == chunk.hexdigest
    assert fields["blob"] == chunk.blob.digest
    assert fields["source"] == "origin"
    # the fetcher's own line about it names the image too (the mount tags its warnings)
    verification = [ln for ln in mounts.log().splitlines() if "failed verification (" in ln]
    assert verification and all(chunk.hexdigest in ln and ln.endswith(f" image={digest}")
                                for ln in verification)
