"""``lazyfs cache``: usage per image, prune (LRU, pinned images kept), verify (xxh3 and
BLAKE3, every entry); and a prune while an image is mounted leaves it whole, readable
with the server gone."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest

from cache import pins
from cache.evict import eviction_lock
from cache.images import ImageStore
from cache.store import ChunkStore
from lazyfs.serve import make_server
from tests.cachekit import chunk_digests, install, make_image, manifest_of
from tests.conftest import lazyfs


@pytest.fixture(scope="module")
def cmd_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachecmd") / "images"
    files = {"a": make_image(root, "a", {"a1": 600_000, "a2": 100_000}, seed=21),
             "b": make_image(root, "b", {"b1": 500_000}, seed=22)}
    return root, files


def _filled(root, cache):
    ma, ia = install(root, "a", cache, ref="reg.example/a:1")
    mb, _ = install(root, "b", cache, ref="reg.example/b:1")
    return ma, ia, mb


def _json(*args):
    return json.loads(lazyfs("cache", *args, "--json").stdout)


def test_show_reports_usage_per_image_and_pins(cmd_images, tmp_path):
    root, _ = cmd_images
    cache = tmp_path / "cache"
    ma, ia, mb = _filled(root, cache)
    store = ChunkStore(cache)
    with eviction_lock(cache):
        pins.pin(ImageStore(cache), ma, ia, "reg.example/a:1", "/mnt/a")
    report = _json("--cache", str(cache))
    entries, total = store.usage()
    assert (report["entries"], report["bytes"]) == (entries, total)
    by = {im["manifest"]: im for im in report["images"]}
    a, b = by[ma], by[mb]
    assert a["refs"] == ["reg.example/a:1"] and a["complete"] and a["cached_bytes"] == a["bytes"] > 0
    assert [p["pid"] for p in a["pinned_by"]] == [os.getpid()]
    assert b["pinned_by"] == [] and b["complete"]
    assert a["bytes"] + b["bytes"] == total and report["other_entries"] == 0
    store.remove(next(iter(chunk_digests(root, "b"))))
    text = lazyfs("cache", "--cache", str(cache)).stdout
    assert "reg.example/a:1" in text and f"pinned by pid {os.getpid()}" in text
    assert "incomplete, not mounted" in text


def test_prune_evicts_unpinned_lru_first_and_by_image(cmd_images, tmp_path):
    root, _ = cmd_images
    cache = tmp_path / "cache"
    ma, ia, mb = _filled(root, cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    a, b = chunk_digests(root, "a"), chunk_digests(root, "b")
    old = time.time() - 5000
    for d in b:
        os.utime(store.path(d), (old, old))
    b_bytes = sum(store.path(d).stat().st_size for d in b)
    total = store.usage()[1]
    out = _json("prune", "--cache", str(cache), "--to", str(total - b_bytes))
    assert out["evicted_entries"] == len(b) and out["no_longer_complete"] == [mb]
    assert all(store.contains(d) for d in a) and not images.is_complete(mb) and images.is_complete(ma)

    install(root, "b", cache, ref="reg.example/b:1")
    out = _json("prune", "--cache", str(cache), "--image", "reg.example/a:1")
    assert out["evicted_entries"] == len(a)
    assert all(store.contains(d) for d in b) and not any(store.contains(d) for d in a)

    install(root, "a", cache)
    with eviction_lock(cache):
        pins.pin(images, ma, ia, "reg.example/a:1", "/mnt/a")
    text = lazyfs("cache", "prune", "--cache", str(cache)).stdout
    assert "pinned by mounted images" in text and "the rest belongs to mounted images" in text
    assert all(store.contains(d) for d in a) and not any(store.contains(d) for d in b)

    done = lazyfs("cache", "prune", "--cache", str(cache), "--image", "reg.example/nope:1", check=False)
    assert done.returncode == 3 and done.stderr.startswith("lazyfs: error: image reg.example/nope:1")
    done = lazyfs("cache", "--cache", str(tmp_path / "nothing"), check=False)
    assert done.returncode == 7 and "not a lazyfs cache" in done.stderr
    assert not (tmp_path / "nothing").exists()


def test_verify_drops_flipped_and_misnamed_entries(cmd_images, tmp_path):
    root, _ = cmd_images
    cache = tmp_path / "cache"
    ma, _ia, mb = _filled(root, cache)
    store, images = ChunkStore(cache), ImageStore(cache)
    a, b = sorted(chunk_digests(root, "a")), sorted(chunk_digests(root, "b"))
    flipped = store.path(a[0])  # whole length, one byte flipped: xxh3 catches it
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    flipped.write_bytes(bytes(raw))
    store.path(b[0]).write_bytes(store.path(b[1]).read_bytes())  # a sound entry, wrong name: BLAKE3
    size = struct.unpack_from("<4sIQ", raw)[2]
    assert store.contains(a[0], size)  # the length-only completeness scan sees it as cached
    out = _json("verify", "--cache", str(cache))
    assert out["checked"] == len(a) + len(b)
    assert {(x["digest"], x["problem"].split(" ")[0]) for x in out["bad"]} == {
        (a[0].hex(), "corrupt"), (b[0].hex(), "wrong")}
    assert sorted(out["no_longer_complete"]) == sorted([ma, mb])
    assert not store.path(a[0]).exists() and not store.path(b[0]).exists()
    assert not images.is_complete(ma)
    text = lazyfs("cache", "verify", "--cache", str(cache)).stdout
    assert "0 bad" in text


@pytest.mark.mount
def test_prune_while_mounted_keeps_the_image_whole_and_readable_offline(cmd_images, mounts, tmp_path):
    root, files = cmd_images
    cache = tmp_path / "cache"
    install(root, "b", cache, ref="other/b:1")
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    try:
        ref = f"127.0.0.1:{server.port}/a:1"
        mnt, _ = mounts.mount(ref, cache=cache)
        mounts.wait_complete(mnt)
        out = _json("prune", "--cache", str(cache))
        assert out["evicted_entries"] == len(chunk_digests(root, "b"))
        report = _json("--cache", str(cache))
        [a] = [im for im in report["images"] if im["manifest"] == manifest_of(root, "a")[0]]
        assert a["complete"] and a["pinned_by"][0]["mountpoint"] == str(mnt)
    finally:
        server.close()
    for rel, data in files["a"].items():  # the server is gone: all from the cache
        assert (mnt / rel).read_bytes() == data
    mounts.unmount_all()
    mnt, _ = mounts.mount(ref, "--offline", name="offline", cache=cache)
    for rel, data in files["a"].items():
        assert (mnt / rel).read_bytes() == data
    assert mounts.status(mnt)["reads"]["chunk_misses"] == 0
