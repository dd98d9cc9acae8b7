"""Images converted with ``--compression zstd``: the codec on its own, then real mounts
(every file read back, a damaged chunk, ``cache verify``), and an index whose codec this
lazyfs does not know."""

from __future__ import annotations

import json
import os

import pytest
import trio
import zstandard

from blockindex.codec import ChunkDecodeError, decode, encode
from blockindex.format import ARTIFACT_ANNOTATION, CODEC_LZ4, CODEC_RAW, CODEC_ZSTD
from blockindex.oci import Layout
from blockindex.reader import IndexReader
from blockindex.writer import IndexWriter
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from lazyfs.content import ImageContent
from testkit import treecompare

from .conftest import lazyfs, serve_copy
from .fakes import make_blob
from .test_hostile import _hostile_index
from .test_mount import altered_chunk_is_eio_and_not_cached, index_of, ref

TEXT = b"".join(b"line %d of a text file\n" % i for i in range(4000))


# -- the codec --------------------------------------------------------------------------------


def test_zstd_where_it_pays_and_raw_where_it_does_not():
    codec, payload = encode(TEXT, codec=CODEC_ZSTD)
    assert codec == CODEC_ZSTD and len(payload) < len(TEXT) // 4
    assert decode(codec, len(TEXT), payload) == TEXT
    assert decode(codec, len(TEXT), memoryview(payload)) == TEXT
    noise = os.urandom(4096)
    assert encode(noise, codec=CODEC_ZSTD) == (CODEC_RAW, noise)


def test_a_zstd_payload_must_say_its_size_and_decode_whole():
    _, payload = encode(TEXT, codec=CODEC_ZSTD)
    with pytest.raises(ChunkDecodeError, match="declares"):  # nothing allocated for a lie
        decode(CODEC_ZSTD, len(TEXT) - 1, payload)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(TEXT)
    with pytest.raises(ChunkDecodeError, match="declares"):
        decode(CODEC_ZSTD, len(TEXT), unsized)
    for bad in (payload[:-5], payload + b"more", payload[:8] + bytes(len(payload) - 8), b"junk"):
        with pytest.raises(ChunkDecodeError):
            decode(CODEC_ZSTD, len(TEXT), bad)


def test_an_entry_another_image_cached_under_lz4_serves_a_zstd_image(tmp_path, caplog):
    """One node cache, two images of the same bytes: what an lz4 image cached is read by a
    zstd image (here offline), not dropped and fetched again."""
    _, (lz,), lz_raw = make_blob([TEXT], codec=CODEC_LZ4)
    blob, (zs,), _ = make_blob([TEXT], codec=CODEC_ZSTD)
    assert (lz.codec, zs.codec) == (CODEC_LZ4, CODEC_ZSTD) and lz.digest == zs.digest
    w = IndexWriter(1 << 20)
    w.add_inode(1, mode=0o40755, uid=0, gid=0, size=0, mtime_ns=0, nlink=2)
    w.add_inode(2, mode=0o100644, uid=0, gid=0, size=len(TEXT), mtime_ns=0, nlink=1)
    w.add_dirent(1, 0, b"f", 2)
    w.add_blob(1, blob.digest, blob.size)
    w.add_chunk(1, zs.digest, blob=1, offset=0, stored_size=zs.stored_size, size=zs.size,
                codec=zs.codec)
    w.add_extent(2, 0, 1)
    w.write(tmp_path / "index")
    store = ChunkStore(tmp_path / "cache")
    assert store.put(lz.digest, TEXT)  # what an lz4 image of the same bytes cached

    async def main() -> bytes:
        async with trio.open_nursery() as nursery:
            offline = ChunkFetcher(nursery, None, store)
            content = ImageContent(IndexReader(tmp_path / "index"), offline, memory_chunks=0)
            data = bytes(await content.read(2, 0, len(TEXT)))
            nursery.cancel_scope.cancel()
            return data

    assert trio.run(main) == TEXT
    assert store.contains(lz.digest) and "dropped" not in caplog.text


# -- mounts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rich_zstd(rich, tmp_path_factory):
    """The rich test image, converted by the command line with zstd."""
    image, _ = rich
    out = tmp_path_factory.mktemp("rich-zstd") / "images"
    lazyfs("convert", f"docker-archive:{image.path}", f"oci:{out / 'rich'}:1",
           "--chunk-size", "64K", "--compression", "zstd")
    return image, out


@pytest.fixture
def served_zstd(rich_zstd, tmp_path):
    image, images = rich_zstd
    for root, server in serve_copy(images, tmp_path):
        yield image, root, server


def _zstd_chunk_of_a_file(index, image):
    for path, e in sorted(image.expected.items()):
        if e.kind != "file" or not e.size:
            continue
        node = index.attr(1)
        for part in path.split(b"/"):
            node = index.lookup(node.ino, part)
        chunks = index.chunks_of(node.ino)
        if chunks and chunks[0].codec == CODEC_ZSTD:
            return path, chunks[0]
    raise AssertionError("no file starts with a zstd chunk")


@pytest.mark.mount
def test_a_zstd_image_mounts_reads_back_and_verifies(served_zstd, mounts):
    image, root, server = served_zstd
    index = index_of(root)
    assert index.meta["format"] == "2"
    codecs = {c.codec for c in index.all_chunks()}
    assert CODEC_ZSTD in codecs and CODEC_LZ4 not in codecs
    layout = Layout(root / "rich")
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    assert manifest["annotations"][ARTIFACT_ANNOTATION] == "2"

    mnt, _ = mounts.mount(ref(server))
    mounts.wait_complete(mnt)
    assert treecompare.compare_tree(mnt, image.expected) == []
    lazyfs("umount", str(mnt))
    mounts.points.remove(mnt)

    cache = mounts.tmp / "cache"
    out = json.loads(lazyfs("cache", "verify", "--cache", str(cache), "--json").stdout)
    assert out["checked"] == index.totals()["chunks"] and out["bad"] == []
    # an entry whose block checksums are right but whose bytes are not the chunk's: only
    # the digest finds it
    _, chunk = _zstd_chunk_of_a_file(index, image)
    store = ChunkStore(cache)
    plain = store.get(chunk.digest)
    assert plain is not None and len(plain) == chunk.size
    damaged = bytearray(plain)
    damaged[len(damaged) // 2] ^= 0x55
    store.remove(chunk.digest)  # a put leaves a whole entry as it is
    assert store.put(chunk.digest, bytes(damaged))
    out = json.loads(lazyfs("cache", "verify", "--cache", str(cache), "--json").stdout)
    assert [b["digest"] for b in out["bad"]] == [chunk.hexdigest]
    assert not store.contains(chunk.digest)


@pytest.mark.mount
def test_an_altered_zstd_chunk_is_eio_and_not_cached(served_zstd, mounts):
    image, root, server = served_zstd
    path, chunk = _zstd_chunk_of_a_file(index_of(root), image)
    altered_chunk_is_eio_and_not_cached(mounts, root, server, path, chunk)


@pytest.mark.mount
@pytest.mark.parametrize(("codec", "fmt"), [(7, "1"), (CODEC_ZSTD, "1")],
                         ids=["unknown", "zstd-in-format-1"])
def test_a_codec_the_index_format_lacks_is_refused_at_mount(served, mounts, codec, fmt):
    _image, root, server = served
    _hostile_index(Layout(root / "rich"), "1", f"UPDATE chunks SET codec = {codec} WHERE id = 1")
    mnt, done = mounts.mount(ref(server), check=False)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("lazyfs: error:") and done.stderr.count("\n") == 1, done.stderr
    assert f"codec {codec}, which index format {fmt} does not have" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.ismount(mnt)
