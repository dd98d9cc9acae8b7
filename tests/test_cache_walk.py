"""A walk through a complete image whose cache is out of the page cache (a node after a
reboot, or under memory pressure): a real mount reads a directory of many small files in
order, and most reads find their entry in memory, because a read that waits for the disk
asks the disk for the entries after it in its blob (``fetcher/diskahead.py``). Counted by
the mount itself (``fetch.disk_reads`` in ``lazyfs status``), not timed."""

from __future__ import annotations

import random

import pytest

from cache.store import ChunkStore
from tests.cachekit import drop_from_page_cache, install, make_image
from tests.conftest import lazyfs

pytestmark = pytest.mark.mount

FILES = 300
REF = "127.0.0.1:9/walk:1"  # nothing listens there: the cache alone serves the image


@pytest.fixture(scope="module")
def walk_image(tmp_path_factory):
    """One directory of small files (one chunk each, 2-16 KiB): about 2.7 MiB of blob."""
    root = tmp_path_factory.mktemp("walk") / "images"
    rng = random.Random(5)
    files = make_image(root, "walk", {f"f{i:03d}": rng.randrange(2 << 10, 16 << 10) for i in range(FILES)},
                       seed=5)
    return root, files


@pytest.mark.parametrize("mode", ["--offline", "--no-prefetch"])
def test_a_walk_through_files_out_of_the_page_cache_seldom_waits_for_the_disk(walk_image, mounts,
                                                                               tmp_path, mode):
    root, files = walk_image
    cache = tmp_path / "cache"
    install(root, "walk", cache, ref=REF)
    mnt, _ = mounts.mount(REF, mode, cache=cache)
    drop_from_page_cache(ChunkStore(cache).path(digest) for digest, _ in ChunkStore(cache).entries())
    for name in sorted(files):
        assert (mnt / name).read_bytes() == files[name], name
    st = mounts.status(mnt)
    reads, fetch = st["reads"], st["fetch"]
    assert reads["chunk_misses"] == 0 and reads["failed_reads"] == 0
    assert reads["chunk_hits_cache"] >= FILES
    # Without asking ahead, each file's first read waits for the disk (every entry was out
    # of the page cache): here only the first read of each 2 MiB window of the blob does,
    # and the reads that overtake the disk's readahead
    assert 1 <= fetch["disk_reads"] <= FILES // 5, fetch
    assert f"({fetch['disk_reads']} waited for the disk)" in lazyfs("status", str(mnt)).stdout
