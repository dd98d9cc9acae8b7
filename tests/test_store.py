from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from blockindex.format import CODEC_LZ4, CODEC_RAW
from cache.errors import CacheError
from cache.images import ImageStore
from cache.store import ChunkStore


def test_put_get_roundtrip(tmp_path):
    store = ChunkStore(tmp_path)
    digest = bytes(range(32))
    assert store.get(digest) is None
    assert store.put(digest, CODEC_LZ4, 1000, b"payload")
    assert store.contains(digest)
    codec, size, payload = store.get(digest)
    assert (codec, size, bytes(payload)) == (CODEC_LZ4, 1000, b"payload")
    assert store.usage() == (1, 24 + 7)
    assert os.listdir(store.path(digest).parent) == [digest.hex()]  # no temp file left


def test_contains_with_stored_size_counts_only_whole_entries(tmp_path):
    store = ChunkStore(tmp_path)
    digest = b"\x02" * 32
    store.put(digest, CODEC_RAW, 5, b"hello")
    assert store.contains(digest, 5) and store.contains(digest)
    with open(store.path(digest), "r+b") as f:
        f.truncate(24 + 2)  # torn by a crash
    assert store.contains(digest)  # exists...
    assert not store.contains(digest, 5)  # ...but is not a whole entry
    assert not store.contains(b"\x03" * 32, 5)


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
    store.put(b"\x01" * 32, 0, 3, b"abc")
    images = ImageStore(tmp_path)
    images.save_manifest("reg/app:1", "sha256:" + hashlib.sha256(b"{}").hexdigest(), b"{}")
    assert len(renames) >= 2
    assert all(src == dst for src, dst in renames), renames
    assert store.get(b"\x01" * 32) is not None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_entry_is_dropped_not_served(tmp_path, damage, caplog):
    store = ChunkStore(tmp_path)
    digest = b"\x01" * 32
    store.put(digest, CODEC_RAW, 5, b"hello")
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 1
    elif damage == "truncate":
        data = data[:-2]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"X" * 40)
    path.write_bytes(data)
    assert store.get(digest) is None
    assert not path.exists()
    assert store.dropped == 1
    assert "fetched again" in caplog.text


def test_put_failure_is_reported_not_raised(tmp_path, caplog):
    store = ChunkStore(tmp_path)
    store.path(b"\x02" * 32).parent.write_text("the disk refuses writes here")  # not a directory
    assert not store.put(b"\x02" * 32, CODEC_RAW, 1, b"x")
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
