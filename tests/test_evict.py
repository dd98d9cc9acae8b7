"""Eviction (cache/evict.py) and pins (cache/pins.py), on real cache directories."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
import trio

from blockindex.codec import chunk_digest
from cache import pins
from cache.evict import CacheKeeper, EvictionBusy, evict, eviction_lock
from cache.images import ImageStore
from cache.store import TOUCH_AFTER, ChunkStore
from tests.cachekit import chunk_digests, install, make_image


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("evict") / "images"
    make_image(root, "a", {"a1": 400_000, "a2": 300_000}, seed=1)
    make_image(root, "b", {"b1": 500_000}, seed=2)
    return root


def _age(store: ChunkStore, digests, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    for d in digests:
        os.utime(store.path(d), (t, t))


def _pin_for(cache, pid: int, manifest: str, index: str, start=None) -> None:
    (cache / "pins").mkdir(exist_ok=True)
    doc = {"pid": pid, "start": start, "manifest": manifest, "index": index, "ref": "x", "mountpoint": "/m"}
    (cache / "pins" / f"{pid}-{manifest[7:]}").write_text(json.dumps(doc))


def test_least_recently_used_go_first_and_complete_markers_follow(two_images, tmp_path):
    cache = tmp_path / "cache"
    ma, _ = install(two_images, "a", cache)
    mb, _ = install(two_images, "b", cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    a, b = chunk_digests(two_images, "a"), chunk_digests(two_images, "b")
    _age(store, a, 3000)  # a: used long ago
    _age(store, b, 10)
    total = store.usage()[1]
    b_bytes = sum(store.path(d).stat().st_size for d in b)
    r = evict(store, images, total - 1)  # one byte too many: the oldest entry goes
    assert r.evicted_entries == 1 and next(iter(d for d in a if not store.contains(d)))
    assert all(store.contains(d) for d in b)
    assert r.incomplete == [ma]
    assert not images.is_complete(ma) and images.is_complete(mb)
    r = evict(store, images, b_bytes)  # room for b alone: all of a goes, b stays whole
    assert not any(store.contains(d) for d in a)
    assert all(store.contains(d) for d in b)
    assert r.bytes == b_bytes and store.usage()[1] == b_bytes
    assert images.is_complete(mb)


def test_pinned_image_is_never_evicted_even_over_the_limit(two_images, tmp_path, caplog):
    cache = tmp_path / "cache"
    ma, ia = install(two_images, "a", cache)
    mb, _ = install(two_images, "b", cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    a, b = chunk_digests(two_images, "a"), chunk_digests(two_images, "b")
    _age(store, a, 3000)  # a is the oldest, but pinned
    with eviction_lock(cache):
        path = pins.pin(images, ma, ia, "host/a:1", "/mnt/a")
    r = evict(store, images, 0)
    assert all(store.contains(d) for d in a)
    assert not any(store.contains(d) for d in b)
    assert r.pinned_bytes == r.bytes > 0
    assert images.is_complete(ma) and not images.is_complete(mb)

    # the keeper says so once, and keeps serving (nothing raised)
    keeper = CacheKeeper(store, images, limit=1000)
    trio.run(keeper.tick)
    trio.run(keeper.tick)
    assert keeper.over_limit and keeper.state()["pinned_bytes"] == r.bytes
    assert caplog.text.count("over its limit") == 1
    pins.unpin(path)
    evict(store, images, 0)
    assert store.usage() == (0, 0)


def test_pins_of_dead_processes_are_released(two_images, tmp_path):
    cache = tmp_path / "cache"
    ma, ia = install(two_images, "a", cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _pin_for(cache, dead.pid, ma, ia)  # a SIGKILLed mount's
    _pin_for(cache, os.getpid(), ma, ia, start=1)  # our pid, but another process's start time
    assert pins.live_pins(images) == []
    assert os.listdir(cache / "pins") == []
    evict(store, images, 0)
    assert store.usage() == (0, 0)
    _pin_for(cache, os.getpid(), ma, ia, start=pins.start_time(os.getpid()))
    assert [p.pid for p in pins.live_pins(images)] == [os.getpid()]


def test_reads_refresh_recency_in_batches(two_images, tmp_path):
    cache = tmp_path / "cache"
    install(two_images, "a", cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    a = sorted(chunk_digests(two_images, "a"))
    _age(store, a, 2 * TOUCH_AFTER)
    used = a[0]
    store.get(used)
    assert store.path(used).stat().st_mtime < time.time() - TOUCH_AFTER  # not written per read
    assert store.flush_touches() == 1
    assert store.path(used).stat().st_mtime > time.time() - 60
    total = store.usage()[1]
    evict(store, images, total - store.path(a[1]).stat().st_size)
    assert store.contains(used)


def test_one_eviction_at_a_time(tmp_path):
    store, images = ChunkStore(tmp_path), ImageStore(tmp_path)
    with eviction_lock(tmp_path), pytest.raises(EvictionBusy):
        evict(store, images, 0, wait=False)


def test_eviction_racing_readers_never_serves_a_partial_entry(two_images, tmp_path):
    """Readers in threads read every chunk again and again while another thread evicts
    everything and re-installs it: each read is the whole, right chunk or nothing."""
    cache = tmp_path / "cache"
    install(two_images, "a", cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    digests = sorted(chunk_digests(two_images, "a"))
    stop = threading.Event()
    bad: list[str] = []
    served = [0]

    def reader() -> None:
        s = ChunkStore(cache)
        while not stop.is_set():
            for d in digests:
                entry = s.get(d)
                if entry is None:
                    continue
                if chunk_digest(entry) != d:
                    bad.append(d.hex())
                served[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            evict(store, images, 0)
            install(two_images, "a", cache)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    assert served[0] > 0


def test_snapshotter_passes_the_cache_limit_to_its_image_mounts(tmp_path, monkeypatch):
    """The limit is node-wide: the snapshotter hands it to every mount process it starts."""
    from lazyfs.snapshotter import filesystem

    seen: list[list[str]] = []

    class Started:
        """A mount process that says it is mounted on its ready pipe at once."""

        pid = 0

        def __init__(self, argv, **_kw):
            seen.append(argv)
            os.write(int(argv[argv.index("--ready-fd") + 1]), b"ok\n")

        def poll(self):
            return None

    def not_mounted(self, mountpoint):
        raise filesystem.MountError("not mounted")

    monkeypatch.setattr(filesystem.subprocess, "Popen", Started)
    monkeypatch.setattr(filesystem.LazyFileSystem, "check", not_mounted)
    fs = filesystem.LazyFileSystem(tmp_path, cache_size=5 << 30)
    fs.mount("127.0.0.1:5000/app:1", {})
    [mount_argv] = [a for a in seen if "mount" in a and "--cache" in a]
    assert mount_argv[mount_argv.index("--cache-size") + 1] == str(5 << 30)
