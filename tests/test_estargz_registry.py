"""An eStargz image in a real registry (Debian's docker-registry, fed by skopeo) mounts
lazily with no side index: file for file as docker would unpack it, after reading only
each layer's footer and TOC; a second mount reads no TOC again; an altered member is EIO
and never cached; a TOC that does not match its annotation is one line and exit 6; an image
with a layer that names no TOC is not mounted lazily (exit 3, as any image without a side
index)."""

from __future__ import annotations

import dataclasses
import errno
import re
from pathlib import Path

import pytest

from blockindex.format import CODEC_GZIP_MEMBER
from blockindex.reader import IndexReader
from testkit import imagegen, treecompare
from testkit.estargz import EstargzBlob, push_estargz, write_estargz
from testkit.layermerge import merge
from testkit.registryd import Registry, needs_registry
from testkit.tarwriter import NS, Entry

pytestmark = [needs_registry, pytest.mark.mount]

CHUNK = 256 << 10


def _whole_seconds(layers: list[list[Entry]]) -> list[list[Entry]]:
    """A TOC's modtime has whole seconds (RFC 3339, as Go's writer rounds it)."""
    return [[dataclasses.replace(e, mtime_ns=e.mtime_ns // NS * NS) for e in layer] for layer in layers]


@pytest.fixture(scope="module")
def rich():
    layers = _whole_seconds(imagegen.rich_layers())
    return [write_estargz(layer, chunk_size=CHUNK) for layer in layers], merge(layers)


def _index(cache: Path) -> IndexReader:
    [path] = (cache / "indexes").iterdir()
    return IndexReader(path)


def _blob_bytes(registry: Registry, since: int) -> int:
    """Bytes of blob GETs the registry answered since log offset ``since``."""
    log = registry.log()[since:]
    return sum(int(m[1]) for m in re.finditer(r'"GET \S+/blobs/sha256:\w+ HTTP/[\d.]+" 20\d (\d+)', log))


def test_estargz_image_mounts_lazily_as_it_is(registry, rich, mounts, tmp_path):
    blobs, expected = rich
    push_estargz(registry, tmp_path, blobs, "app:1")
    before = len(registry.log())
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", name="first")
    # only the footers and TOCs so far: far less than the layers
    toc_bytes = _blob_bytes(registry, before)
    assert 0 < toc_bytes < sum(len(b.blob) - b.toc_offset for b in blobs) + 1024
    assert treecompare.compare_tree(mnt, expected) == []  # no landmark file shown either
    index = _index(mounts.tmp / "cache")
    index.check()
    assert index.meta["format"] == "4" and index.chunk_size == CHUNK
    chunks = list(index.all_chunks())
    assert chunks and {c.codec for c in chunks} == {CODEC_GZIP_MEMBER}
    random_bin = index.lookup(index.lookup(1, b"data").ino, b"random.bin")
    assert len(index.chunks_of(random_bin.ino)) == -(-random_bin.size // CHUNK) > 2
    # a second mount of the image builds nothing and reads no TOC: its index is the node's
    mounts.unmount_all()
    before = len(registry.log())
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", name="second")
    assert _blob_bytes(registry, before) == 0
    assert (mnt / "data" / "small.txt").read_bytes() == b"hello lazyfs\n"


def test_an_altered_member_is_eio_and_not_cached(registry, rich, mounts, tmp_path):
    blobs, _ = rich
    push_estargz(registry, tmp_path, blobs, "app:1")
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", name="first", cache=tmp_path / "c1")
    index = _index(tmp_path / "c1")
    chunk = index.chunks_of(index.lookup(index.lookup(1, b"data").ino, b"random.bin").ino)[2]
    mounts.unmount_all()
    blob = registry.blob_file(chunk.blob.digest)
    data = bytearray(blob.read_bytes())
    data[chunk.offset + chunk.size // 2] ^= 0x55  # random bytes: a stored block's, within its member
    blob.write_bytes(data)
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", name="second", cache=tmp_path / "c2")
    with pytest.raises(OSError) as e:
        (mnt / "data" / "random.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "data" / "small.txt").read_bytes() == b"hello lazyfs\n"
    assert not (tmp_path / "c2" / "chunks" / chunk.hexdigest[:2] / chunk.hexdigest).exists()
    assert mounts.status(mnt)["fetch"]["integrity_failures"] >= 1


def test_a_toc_that_does_not_match_its_annotation_is_one_line_and_exit_6(registry, rich, mounts, tmp_path):
    blobs, _ = rich
    forged: list[EstargzBlob] = [blobs[0], dataclasses.replace(blobs[1], toc_digest="sha256:" + "ab" * 32)]
    push_estargz(registry, tmp_path, forged, "app:1")
    mnt, done = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", check=False)
    assert done.returncode == 6, done.stderr
    assert "does not match" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not list((mounts.tmp / "cache" / "indexes").iterdir())


def test_a_layer_without_the_annotation_is_not_mounted_lazily(registry, rich, mounts, tmp_path):
    blobs, _ = rich
    push_estargz(registry, tmp_path, blobs, "app:1", annotate=[True, False])
    push_estargz(registry, tmp_path, blobs, "app:2")
    mnt, done = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", check=False)
    assert done.returncode == 3, done.stderr
    assert "has no side index" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    # the same layers, both annotated
    mnt, _ = mounts.mount(f"{registry.host}/app:2", "--no-prefetch", name="annotated")
    assert (mnt / "data" / "small.txt").read_bytes() == b"hello lazyfs\n"
