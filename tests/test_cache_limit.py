"""``--cache-size`` on real mounts: least recently used chunks of images no mount needs
are evicted; a mounted image is never made incomplete, even when it alone is over the
limit (the log and status say so, and reading goes on)."""

from __future__ import annotations

import pytest

from cache.entry import entry_size
from cache.images import ImageStore
from cache.store import ChunkStore
from lazyfs.serve import make_server
from testkit.waiting import wait_until
from tests.cachekit import chunk_digests, make_image, manifest_of

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def limit_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("limit") / "images"
    files = {"a": make_image(root, "a", {"a1": 1_200_000, "a2": 700_000}, seed=11),
             "b": make_image(root, "b", {"b1": 900_000, "b2": 300_001}, seed=12)}
    return root, files


@pytest.fixture
def limit_server(limit_images):
    server = make_server(limit_images[0], "127.0.0.1", 0)
    server.start()
    yield server
    server.close()


def _entry_bytes(root, name: str) -> int:
    from blockindex.oci import Layout
    from blockindex.reader import IndexReader

    _, _, manifest = manifest_of(root, name)
    reader = IndexReader(Layout(root / name).blob_path(manifest["layers"][0]["digest"]))
    try:
        return sum(entry_size(c.size) for c in reader.all_chunks())
    finally:
        reader.close()


def test_cache_size_evicts_unmounted_images_lru_and_keeps_mounted_ones(limit_images, limit_server, mounts,
                                                                     tmp_path):
    root, files = limit_images
    cache = tmp_path / "cache"
    store, images = ChunkStore(cache), ImageStore(cache)
    a, b = chunk_digests(root, "a"), chunk_digests(root, "b")
    ma = manifest_of(root, "a")[0]
    ref = f"127.0.0.1:{limit_server.port}"

    mnt_a, _ = mounts.mount(f"{ref}/a:1", name="a", cache=cache)
    mounts.wait_complete(mnt_a)
    mounts.unmount_all()
    assert images.is_complete(ma) and all(store.contains(d) for d in a)

    # room for b (at the 90% low-water mark), not for a and b
    limit = int(_entry_bytes(root, "b") / 0.9) + (64 << 10)
    assert _entry_bytes(root, "a") + _entry_bytes(root, "b") > limit
    mnt_b, _ = mounts.mount(f"{ref}/b:1", "--cache-size", str(limit), name="b", cache=cache)
    mounts.wait_complete(mnt_b)
    wait_until(lambda: store.usage()[1] <= limit, 60, "eviction below the limit")
    assert all(store.contains(d) for d in b), "a chunk of the mounted image was evicted"
    assert not all(store.contains(d) for d in a)
    assert not images.is_complete(ma), "an image that lost chunks is still marked complete"
    st = mounts.status(mnt_b)
    assert st["cache_state"]["limit"] == limit and st["cache_state"]["evicted_entries"] > 0
    assert not st["cache_state"]["over_limit"]
    for rel, data in files["b"].items():
        assert (mnt_b / rel).read_bytes() == data

    # a second image mounted while b is: both pinned, together over a tiny limit
    mnt_a, _ = mounts.mount(f"{ref}/a:1", "--cache-size", "100K", name="a2", cache=cache)
    mounts.wait_complete(mnt_a)
    wait_until(lambda: mounts.status(mnt_a)["cache_state"]["over_limit"], 60, "the over-limit report")
    assert all(store.contains(d) for d in a | b)
    for rel, data in files["a"].items():
        assert (mnt_a / rel).read_bytes() == data
    log = mounts.log("a2")
    assert log.count("over its limit") == 1, log
    assert "Traceback" not in log + mounts.log("b")
