"""A side index is pushed as its SQLite file in one zstd frame, and a node keeps it
decompressed, as an index it built from that blob; one pushed before (a plain SQLite file)
is read as it was; anything else, or a frame that decompresses past the limit, is refused
with one line."""

from __future__ import annotations

import sqlite3

import pytest
import trio
import zstandard

from blockindex.errors import IndexFormatError
from blockindex.oci import sha256_digest
from blockindex.sideindex import SQLITE_MAGIC, pack_side_index, unpack_side_index
from cache.images import ImageStore
from fetcher.imageref import ImageRef
from lazyfs import sideindex


def _sqlite(tmp_path) -> bytes:
    path = tmp_path / "side.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE names (name TEXT)")
    names = [(f"/usr/lib/python3/dist-packages/m{n}.py",) for n in range(3000)]
    db.executemany("INSERT INTO names VALUES (?)", names)
    db.commit()
    db.close()
    return path.read_bytes()


def test_packing_halves_a_tree_and_unpacks_to_the_same_file(tmp_path):
    plain = _sqlite(tmp_path)
    packed = pack_side_index(plain)
    assert len(packed) < len(plain) / 2
    assert unpack_side_index(packed, 1 << 30) == plain
    assert unpack_side_index(plain, 1 << 30) == plain  # pushed before packing: as it is


@pytest.mark.parametrize("blob, why", [
    (b"not an index at all", "neither an SQLite file nor zstd"),
    (zstandard.ZstdCompressor().compress(b"x" * 1000), "does not decompress to an SQLite file"),
    (zstandard.ZstdCompressor().compress(SQLITE_MAGIC + bytes(10_000)), "more than 5000 bytes"),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 40, "does not decompress"),
])
def test_a_blob_that_is_no_side_index_or_too_large_is_refused(blob, why):
    with pytest.raises(IndexFormatError, match=why):
        unpack_side_index(blob, 5000)


@pytest.mark.parametrize("packed", [True, False])
def test_a_node_keeps_a_pushed_side_index_as_sqlite_either_way_it_was_pushed(tmp_path, monkeypatch, packed):
    plain = _sqlite(tmp_path)
    blob = pack_side_index(plain) if packed else plain
    digest = sha256_digest(blob)
    images = ImageStore(tmp_path / "cache")
    asked = []

    async def found(client, manifest_digest, refused):
        asked.append(manifest_digest)
        return digest, blob

    monkeypatch.setattr(sideindex, "find_side_index", found)
    ref = ImageRef.parse("reg.example/app:1")
    for _ in range(2):  # the second time from the node cache
        got_digest, path = trio.run(sideindex.open_side_index, None, ref, "sha256:" + "a" * 64, images)
        assert got_digest == digest and path.read_bytes() == plain
    assert len(asked) == 2
    if packed:
        assert images.built_index(digest) == path
