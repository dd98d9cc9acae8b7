"""eStargz on its own, no network: a layer's footer and TOC read back, the index built from
the TOCs of two layers (whiteouts, hard links, symlinks, chunks of one size), every file
read back from its members and checked by sha256; what lazyfs cannot mount is refused, and
a sha256-named chunk is a good cache entry."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from blockindex.codec import ChunkDecodeError, decode_verified
from blockindex.errors import ImageError, UnsupportedImageError
from blockindex.estargz import FOOTER_SIZE, is_estargz_image, parse_toc, toc_json, toc_offset
from blockindex.estargzindex import EstargzLayer, build_estargz_index
from blockindex.format import CODEC_GZIP_MEMBER, Blob, Chunk, ChunkDigest
from blockindex.reader import IndexReader
from cache.images import ImageStore
from cache.store import ChunkStore
from cache.verify import verify
from testkit.estargz import TOC_DIGEST_ANNOTATION, EstargzBlob, footer, write_estargz
from testkit.tarwriter import Entry

CHUNK = 4096
BIG = bytes(range(256)) * 50  # 12,800 bytes: four chunks, the last short


def _layers() -> list[list[Entry]]:
    f = "file"
    return [
        [Entry(path=b"app", kind="dir", perm=0o755),
         Entry(path=b"app/big", kind=f, perm=0o644, data=BIG),
         Entry(path=b"app/empty", kind=f, perm=0o600),
         Entry(path=b"app/gone", kind=f, perm=0o644, data=b"whited out\n"),
         Entry(path=b"app/link", kind="symlink", perm=0o777, target=b"big"),
         Entry(path=b"app/twin", kind="hardlink", perm=0o644, target=b"app/big")],
        [Entry(path=b"app/.wh.gone", kind=f, perm=0o600),
         Entry(path=b"app/new", kind=f, perm=0o4755, uid=7, data=b"layer two\n",
               xattrs={b"user.k": b"\x00\xffv"})],
    ]


def _blob_digest(b: EstargzBlob) -> str:
    return "sha256:" + hashlib.sha256(b.blob).hexdigest()


def _read(b: EstargzBlob) -> EstargzLayer:
    """What a mount does with a layer: footer, TOC member, TOC."""
    offset = toc_offset(b.blob[-FOOTER_SIZE:], len(b.blob))
    data = toc_json(b.blob[offset:-FOOTER_SIZE])
    assert "sha256:" + hashlib.sha256(data).hexdigest() == b.toc_digest
    return EstargzLayer(_blob_digest(b), len(b.blob), parse_toc(data, toc_offset=offset))


def _file(index: IndexReader, blobs: dict[str, bytes], path: bytes) -> bytes:
    ino = 1
    for name in path.split(b"/"):
        node = index.lookup(ino, name)
        assert node is not None, path
        ino = node.ino
    out = b""
    for c in index.chunks_of(ino):
        out += bytes(decode_verified(c, blobs[c.blob.digest][c.offset : c.offset + c.stored_size]))
    return out


def test_an_index_built_from_two_layers_reads_back_every_file(tmp_path):
    blobs = [write_estargz(layer, chunk_size=CHUNK) for layer in _layers()]
    build_estargz_index([_read(b) for b in blobs], tmp_path / "i")
    index = IndexReader(tmp_path / "i")
    index.check()
    assert index.meta["format"] == "4" and index.chunk_size == CHUNK
    by_digest = {_blob_digest(b): b.blob for b in blobs}
    assert _file(index, by_digest, b"app/big") == BIG
    assert _file(index, by_digest, b"app/twin") == BIG
    assert _file(index, by_digest, b"app/new") == b"layer two\n"
    app = index.lookup(1, b"app").ino
    assert [n for _, n, _ in index.children(app)] == [b"big", b"empty", b"link", b"new", b"twin"]
    assert index.lookup(app, b"big").ino == index.lookup(app, b"twin").ino
    assert index.lookup(app, b"big").nlink == 2
    assert index.readlink(index.lookup(app, b"link").ino) == b"big"
    new = index.lookup(app, b"new")
    assert (new.mode & 0o7777, new.uid) == (0o4755, 7)
    assert index.xattrs(new.ino) == {b"user.k": b"\x00\xffv"}
    assert index.lookup(app, b"empty").size == 0 and index.chunks_of(index.lookup(app, b"empty").ino) == []
    assert index.lookup(1, b".no.prefetch.landmark") is None
    assert {c.codec for c in index.all_chunks()} == {CODEC_GZIP_MEMBER}


def test_the_files_before_a_prefetch_landmark_are_fetched_first(tmp_path):
    def edit(toc: dict) -> None:
        at = next(i for i, e in enumerate(toc["entries"]) if e["name"] == "app/empty")
        toc["entries"].insert(at + 1, {"name": ".prefetch.landmark", "type": "reg", "mode": 0o644})

    blob = write_estargz(_layers()[0], chunk_size=CHUNK, edit_toc=edit)
    build_estargz_index([_read(blob)], tmp_path / "i")
    index = IndexReader(tmp_path / "i")
    # the files before it in the layer (the landmarks themselves neither shown nor listed)
    assert [p for _, p in json.loads(index.meta["prefetch_files"])] == ["app/big", "app/empty"]
    assert index.lookup(1, b".prefetch.landmark") is None


def test_a_member_is_checked_by_its_sha256():
    blob = write_estargz(_layers()[0], chunk_size=CHUNK)
    layer = _read(blob)
    big = next(e for e in layer.toc.entries if e.name == b"app/big")
    c = big.chunks[1]
    chunk = Chunk(ChunkDigest(c.digest), Blob(1, layer.digest, len(blob.blob)), c.offset,
                  c.end - c.offset, c.size, CODEC_GZIP_MEMBER)
    payload = bytearray(blob.blob[c.offset : c.end])
    assert bytes(decode_verified(chunk, payload)) == BIG[CHUNK : 2 * CHUNK]
    with pytest.raises(ChunkDecodeError):  # the same bytes under another name
        decode_verified(dataclasses.replace(chunk, digest=ChunkDigest(bytes(32))), bytes(payload))
    payload[len(payload) // 2] ^= 0x01
    with pytest.raises(ChunkDecodeError):
        decode_verified(chunk, payload)


def test_a_sha256_named_cache_entry_is_kept_by_cache_verify(tmp_path):
    store = ChunkStore(tmp_path / "cache")
    images = ImageStore(tmp_path / "cache")
    good, bad = b"estargz chunk", b"another"
    store.put(hashlib.sha256(good).digest(), good)
    store.put(hashlib.sha256(b"not these bytes").digest(), bad)
    result = verify(store, images)
    assert result.checked == 2
    assert [d for d, _ in result.bad] == [hashlib.sha256(b"not these bytes").hexdigest()]
    assert store.contains(hashlib.sha256(good).digest())


def test_the_footer_must_be_estargz():
    blob = write_estargz(_layers()[0], chunk_size=CHUNK)
    assert toc_offset(footer(1234), 5000) == 1234
    with pytest.raises(ImageError):
        toc_offset(blob.blob[-47:].rjust(FOOTER_SIZE, b"\0"), len(blob.blob))  # stargz's 47 bytes
    with pytest.raises(ImageError):
        toc_offset(footer(6000), 5000)  # past the end


def _toc_of(edit) -> tuple[EstargzBlob, EstargzLayer]:
    blob = write_estargz(_layers()[0], chunk_size=CHUNK, edit_toc=edit)
    return blob, _read(blob)


def _edit_big(change):
    def edit(toc: dict) -> None:
        for e in toc["entries"]:
            if e["name"] == "app/big":
                change(e)
    return edit


@pytest.mark.parametrize(("change", "error", "words"), [
    (lambda e: e.pop("chunkDigest"), UnsupportedImageError, "chunkDigest"),
    (lambda e: e.update(innerOffset=10), UnsupportedImageError, "innerOffset"),
    (lambda e: e.update(chunkOffset=e.get("chunkOffset", 0) + 1) if e["type"] == "chunk" else None,
     ImageError, "expected"),
])
def test_a_toc_lazyfs_cannot_mount_is_refused(change, error, words):
    with pytest.raises(error, match=words):
        _toc_of(_edit_big(change))


def test_chunks_of_two_sizes_are_refused(tmp_path):
    one = write_estargz(_layers()[0], chunk_size=CHUNK)
    two = write_estargz(_layers()[0], chunk_size=2 * CHUNK)
    with pytest.raises(UnsupportedImageError, match="one chunk size"):
        build_estargz_index([_read(one), _read(two)], tmp_path / "i")


def test_an_image_is_estargz_when_every_layer_names_its_toc():
    named = {"digest": "sha256:" + "0" * 64, "annotations": {TOC_DIGEST_ANNOTATION: "sha256:" + "1" * 64}}
    plain = {"digest": "sha256:" + "2" * 64}
    assert is_estargz_image({"layers": [named, named]})
    assert not is_estargz_image({"layers": [named, plain]})
    assert not is_estargz_image({"layers": []})
