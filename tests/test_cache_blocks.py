"""Reads of a complete image through a real mount, whose cache entries are damaged in the
ways the cache's per-block checksums guard against: a rotten block in the middle of an
entry, an entry torn short by a crash, an entry of the earlier cache format. Each is
never served: the chunk is fetched again, and every byte read is right, at odd offsets
and sizes across block and chunk boundaries."""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest
import xxhash

from blockindex.convert import convert
from blockindex.format import Chunk
from blockindex.oci import Layout
from blockindex.reader import IndexReader
from cache.entry import BLOCK_SIZE, entry_size
from cache.store import ChunkStore
from lazyfs.serve import make_server
from tests.cachekit import install, manifest_of

pytestmark = pytest.mark.mount

MiB = 1 << 20


@pytest.fixture(scope="module")
def block_image(tmp_path_factory):
    """(files, images root, the chunks of each file): 1 MiB chunks, incompressible and
    compressible files, some of odd sizes."""
    tmp = tmp_path_factory.mktemp("blocks")
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    rng = random.Random(17)
    files = {
        "random.bin": rng.randbytes(3 * MiB + 12345),
        "text.txt": b"".join(b"line %d of a compressible file\n" % i for i in range(90_000)),
        "small": rng.randbytes(3000),
    }
    for name, data in files.items():
        (rootfs / name).write_bytes(data)
    convert(f"dir:{rootfs}", f"oci:{tmp / 'images' / 'b'}:1", chunk_size=MiB)
    shutil.rmtree(rootfs)
    _, _, manifest = manifest_of(tmp / "images", "b")
    index = IndexReader(Layout(tmp / "images" / "b").blob_path(manifest["layers"][0]["digest"]))
    chunks = {name: index.chunks_of(index.lookup(1, name.encode()).ino) for name in files}
    index.close()
    return files, tmp / "images", chunks


def _old_entry(store: ChunkStore, root, c: Chunk) -> None:
    """Write ``c``'s entry as the earlier format did: the stored payload under "LZC1"."""
    payload = Layout(root / "b").read_blob(c.blob.digest)[c.offset : c.offset + c.stored_size]
    header = struct.pack("<4sB3xIIQ", b"LZC1", c.codec, c.size, len(payload),
                         xxhash.xxh3_64_intdigest(payload))
    store.path(c.digest).write_bytes(header + payload)


def test_damaged_entries_are_refetched_never_served(block_image, mounts, tmp_path):
    files, src, chunks = block_image
    root = tmp_path / "images"
    shutil.copytree(src, root)
    cache = tmp_path / "cache"
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    ref = f"127.0.0.1:{server.port}/b:1"
    try:
        install(root, "b", cache, ref=ref)
        store = ChunkStore(cache)
        rotten, torn = chunks["random.bin"][1], chunks["random.bin"][3]
        old, rotten_text = chunks["random.bin"][2], chunks["text.txt"][0]
        k = 5  # a block in the middle of the entry
        for c, at in ((rotten, k * BLOCK_SIZE + 1000), (rotten_text, 3 * BLOCK_SIZE + 7)):
            path = store.path(c.digest)
            raw = bytearray(path.read_bytes())
            raw[entry_size(c.size) - c.size + at] ^= 0x20
            path.write_bytes(raw)
        with open(store.path(torn.digest), "r+b") as f:
            f.truncate(entry_size(torn.size) // 2)
        _old_entry(store, root, old)

        mnt, _ = mounts.mount(ref, "--no-prefetch")
        rng = random.Random(5)
        with open(mnt / "random.bin", "rb") as f:
            data = files["random.bin"]
            # the rotten block first, alone; then odd reads everywhere
            spots = [(MiB + k * BLOCK_SIZE + 900, 300), (MiB - 5, 10), (2 * MiB + BLOCK_SIZE - 1, 2),
                     (3 * MiB + 1, 4096), (len(data) - 7, 100)]
            spots += [(rng.randrange(len(data)), rng.randrange(1, 300_000)) for _ in range(40)]
            for offset, size in spots:
                assert os.pread(f.fileno(), size, offset) == data[offset : offset + size], (offset, size)
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name
        st = mounts.status(mnt)
        assert st["reads"]["failed_reads"] == 0
        assert st["reads"]["chunk_misses"] >= 4  # fetched again, not served from the entries
        assert st["cache_state"]["dropped_entries"] >= 2
        assert st["cache_state"]["old_format_entries"] == 1
        log = mounts.log()
        assert f"cache entry {rotten.hexdigest} is corrupt (checksum mismatch in block {k})" in log
        assert f"cache entry {rotten_text.hexdigest} is corrupt (checksum mismatch in block 3)" in log
        assert log.count("old cache format") == 1
    finally:
        server.close()
    # the refetched chunks are cached whole again, in the new format
    for c in (rotten, torn, old, rotten_text):
        assert store.contains(c.digest, c.size), c.hexdigest


def test_a_complete_cache_serves_odd_reads_exactly_offline(block_image, mounts, tmp_path):
    """With every entry intact, a mount with no server reads exact bytes at odd offsets
    and sizes across block and chunk boundaries, from the cache alone."""
    files, root, _ = block_image
    cache = tmp_path / "cache"
    install(root, "b", cache, ref="127.0.0.1:9/b:1")
    mnt, _ = mounts.mount("127.0.0.1:9/b:1", "--no-prefetch")
    rng = random.Random(9)
    for name, data in files.items():
        with open(mnt / name, "rb") as f:
            for _ in range(60):
                offset, size = rng.randrange(len(data)), rng.choice([1, 7, 4096, 65_537, 200_000])
                got = os.pread(f.fileno(), size, offset)
                assert got == data[offset : offset + size], (name, offset, size)
    st = mounts.status(mnt)
    assert st["reads"]["chunk_misses"] == 0 and st["reads"]["failed_reads"] == 0
