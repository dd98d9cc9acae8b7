from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
import xxhash

from blockindex.format import CODEC_RAW
from cache.entry import BLOCK_SIZE, entry_size
from cache.errors import CacheError
from cache.images import ImageStore
from cache.store import ChunkStore


def test_put_get_roundtrip(tmp_path):
    store = ChunkStore(tmp_path)
    digest = bytes(range(32))
    assert store.get(digest) is None and store.read_range(digest, 0, 10) is None
    assert store.put(digest, b"plain bytes")
    assert store.contains(digest)
    assert bytes(store.get(digest)) == b"plain bytes"
    assert bytes(store.read_range(digest, 6, 100)) == b"bytes"
    assert store.usage() == (1, entry_size(11))
    assert os.listdir(store.path(digest).parent) == [digest.hex()]  # no temp file left


def test_an_entry_another_process_wrote_is_not_written_again_but_a_torn_one_is(tmp_path):
    """Two processes of one cache (a mount and its node's lazyfs peer) fetch the same chunk:
    the second put finds the whole entry and leaves it; a torn one is written anew."""
    digest = hashlib.sha256(b"x").digest()
    plain = os.urandom(3 * BLOCK_SIZE + 5)
    ChunkStore(tmp_path).put(digest, plain)  # the other process
    store = ChunkStore(tmp_path)
    first = os.stat(store.path(digest)).st_ino
    assert store.put(digest, plain)
    assert os.stat(store.path(digest)).st_ino == first and store.written_bytes == 0
    os.truncate(store.path(digest), entry_size(len(plain)) - 1)
    assert store.put(digest, plain)
    assert os.stat(store.path(digest)).st_ino != first
    assert bytes(store.get(digest)) == plain


def test_contains_with_size_counts_only_whole_entries(tmp_path):
    store = ChunkStore(tmp_path)
    digest = b"\x02" * 32
    store.put(digest, b"hello")
    assert store.contains(digest, 5) and store.contains(digest)
    with open(store.path(digest), "r+b") as f:
        f.truncate(entry_size(5) - 2)  # torn by a crash
    assert store.contains(digest)  # exists...
    assert not store.contains(digest, 5)  # ...but is not a whole entry
    assert not store.contains(b"\x03" * 32, 5)


SIZES = [1, 4000, BLOCK_SIZE, BLOCK_SIZE + 1, 5 * BLOCK_SIZE - 7, 1 << 20]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("nowait", [False, True])
def test_ranges_at_odd_offsets_and_sizes_are_exact(tmp_path, size, nowait):
    """Reads across block boundaries, from inside the first 4 KiB (read with the header)
    and past it, past the chunk's end: exactly the chunk's bytes."""
    store = ChunkStore(tmp_path)
    rng = random.Random(size)
    data = rng.randbytes(size)
    digest = bytes(32)
    store.put(digest, data)
    spots = [(0, size), (0, 1), (size - 1, 10), (size, 5), (BLOCK_SIZE - 3, 7), (4000, 200)]
    spots += [(rng.randrange(size), rng.randrange(1, 3 * BLOCK_SIZE)) for _ in range(60)]
    for offset, n in spots:
        try:
            got = store.read_range(digest, offset, n, nowait=nowait)
        except BlockingIOError:  # not in the page cache (it is, just written: still allowed)
            got = store.read_range(digest, offset, n)
        assert got is not None and bytes(got) == data[offset : offset + n], (offset, n)
    assert store.dropped == 0


def _entry_with_flip(store, digest, at: int) -> None:
    path = store.path(digest)
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x04
    path.write_bytes(raw)


@pytest.mark.parametrize("read", ["range", "get"])
def test_a_rotten_block_is_never_served_and_its_entry_is_dropped(tmp_path, read, caplog):
    store = ChunkStore(tmp_path)
    data = random.Random(3).randbytes(4 * BLOCK_SIZE + 100)
    digest = b"\x05" * 32
    store.put(digest, data)
    k = 2
    head = entry_size(len(data)) - len(data)
    # a read of another block is served (only the blocks read are checked)...
    _entry_with_flip(store, digest, head + k * BLOCK_SIZE + BLOCK_SIZE // 2)
    assert bytes(store.read_range(digest, 10, 100)) == data[10:110]
    # ...one that touches block k is not, and the entry is gone
    got = store.read_range(digest, k * BLOCK_SIZE - 5, 10) if read == "range" else store.get(digest)
    assert got is None
    assert not store.path(digest).exists()
    assert store.dropped == 1
    assert f"checksum mismatch in block {k}" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage", "header", "zeros"])
def test_damaged_entry_is_dropped_not_served(tmp_path, damage, caplog):
    store = ChunkStore(tmp_path)
    digest = b"\x01" * 32
    store.put(digest, b"hello")
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 1
    elif damage == "truncate":
        data = data[:-2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(b"X" * 40)
    elif damage == "header":
        data[8] ^= 1  # the chunk size: the header's own checksum catches it
    else:  # a crash after the rename, before the data reached the disk
        data = bytearray(len(data))
    for read in (lambda: store.get(digest), lambda: store.read_range(digest, 0, 5)):
        path.write_bytes(data)
        assert read() is None
        assert not path.exists()
    assert store.dropped == 2
    assert "fetched again" in caplog.text


def test_an_entry_of_the_old_format_is_dropped_as_missing(tmp_path, caplog):
    """Entries written by the earlier format (the stored payload, "LZC1") are refetched:
    reported missing, deleted, logged once per store, not counted as corrupt."""
    store = ChunkStore(tmp_path)
    old = [bytes([i]) * 32 for i in range(3)]
    for d in old:
        store.path(d).parent.mkdir(parents=True, exist_ok=True)
        payload = b"hello"
        header = struct.pack("<4sB3xIIQ", b"LZC1", CODEC_RAW, 5, 5, xxhash.xxh3_64_intdigest(payload))
        store.path(d).write_bytes(header + payload)
    assert store.contains(old[0]) and not store.contains(old[0], 5)  # the prefetch refetches it
    assert store.get(old[0]) is None and store.read_range(old[1], 0, 5) is None
    assert not store.path(old[0]).exists() and not store.path(old[1]).exists()
    assert store.dropped == 0 and store.old_entries == 2
    assert caplog.text.count("old cache format") == 1
    assert store.put(old[0], b"hello") and bytes(store.get(old[0])) == b"hello"


def test_temp_entries_of_dead_writers_are_swept_on_open(tmp_path):
    store = ChunkStore(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    sub = store.path(b"\xab" * 32).parent
    sub.mkdir(parents=True, exist_ok=True)
    (sub / f".tmp.{'ab' * 32}.{dead.pid}.7").write_bytes(b"LZC1 half")  # a SIGKILLed writer's
    (sub / f".tmp.{'ab' * 31}cd.{os.getpid()}.7").write_bytes(b"LZC1 half")  # a live writer's
    (sub / "not-ours").write_bytes(b"x")
    store = ChunkStore(tmp_path)
    store._sweeper.join(10)
    assert store.swept == 1
    assert sorted(os.listdir(sub)) == sorted([f".tmp.{'ab' * 31}cd.{os.getpid()}.7", "not-ours"])


def test_writes_rename_within_one_directory(tmp_path, monkeypatch):
    """A rename across directories takes the filesystem's rename lock, which overlayfs
    holds during copy-up while it asks the lazyfs mount below for attributes: the cache
    must never need it (see cache.store), for chunks and image metadata alike."""
    renames = []
    real = os.replace

    def replace(src, dst):
        renames.append((Path(src).parent, Path(dst).parent))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store = ChunkStore(tmp_path)
    store.put(b"\x01" * 32, b"abc")
    images = ImageStore(tmp_path)
    images.save_manifest("reg/app:1", "sha256:" + hashlib.sha256(b"{}").hexdigest(), b"{}")
    assert len(renames) >= 2
    assert all(src == dst for src, dst in renames), renames
    assert store.get(b"\x01" * 32) is not None


def test_put_failure_is_reported_not_raised(tmp_path, caplog):
    store = ChunkStore(tmp_path)
    store.path(b"\x02" * 32).parent.write_text("the disk refuses writes here")  # not a directory
    assert not store.put(b"\x02" * 32, b"x")
    assert store.write_errors == 1
    assert "serving it from the network" in caplog.text
    assert not store.contains(b"\x02" * 32)


def test_unusable_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(CacheError, match="not usable"):
        ChunkStore(blocker / "cache")


def test_a_new_cache_is_its_owners_alone_and_an_open_one_is_tightened(tmp_path, caplog):
    ChunkStore(tmp_path / "new" / "cache")
    assert (tmp_path / "new" / "cache").stat().st_mode & 0o777 == 0o700
    assert "open to other users" not in caplog.text
    shared = tmp_path / "shared"
    (shared / "chunks" / "ab").mkdir(parents=True)
    for d in (shared, shared / "chunks", shared / "chunks" / "ab"):
        d.chmod(0o777)
    ChunkStore(shared)
    assert f"cache directory {shared} was mode 0777, open to other users: made it 0700" in caplog.text
    for d in (shared, shared / "chunks", shared / "chunks" / "ab"):
        assert d.stat().st_mode & 0o777 == 0o700, d
    caplog.clear()
    ChunkStore(shared)  # once: the next process finds it tight
    assert "open to other users" not in caplog.text


def test_an_open_directory_that_is_not_a_cache_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "var-cache"
    (other / "apt").mkdir(parents=True)
    other.chmod(0o755)
    with pytest.raises(CacheError, match=r"open to other users \(mode 0755\) and holds files that are not"):
        ChunkStore(other)
    with pytest.raises(CacheError):
        ImageStore(other)
    assert other.stat().st_mode & 0o777 == 0o755 and sorted(os.listdir(other)) == ["apt"]


def test_an_open_cache_seeded_with_a_trace_alone_is_lazyfs_s_and_tightened(tmp_path):
    """A trace carried from another node into a new cache directory: every name in it is
    one lazyfs makes there, so it is tightened, not refused; one more name is refused."""
    seeded = tmp_path / "seeded"
    (seeded / "traces").mkdir(parents=True)
    seeded.chmod(0o755)
    (seeded / "traces").chmod(0o755)
    ChunkStore(seeded)
    assert seeded.stat().st_mode & 0o777 == 0o700 and (seeded / "traces").stat().st_mode & 0o777 == 0o700
    mixed = tmp_path / "mixed"
    for name in ("traces", "photos"):
        (mixed / name).mkdir(parents=True)
    mixed.chmod(0o755)
    with pytest.raises(CacheError, match="not lazyfs's"):
        ChunkStore(mixed)


def test_image_store_verifies_what_it_reads(tmp_path):
    images = ImageStore(tmp_path)
    import hashlib

    data = b'{"x": 1}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    images.save_manifest("host/app:1", digest, data)
    assert images.resolve("host/app:1") == digest
    assert images.manifest(digest) == data
    (tmp_path / "manifests" / digest[7:]).write_bytes(b"tampered")
    assert images.manifest(digest) is None
    assert images.resolve("host/other:1") is None
    assert not images.is_complete(digest)
    images.mark_complete(digest)
    assert images.is_complete(digest)
