"""Registries that redirect blob GETs to object storage with signed URLs that expire: the
redirected URL is reused for later ranges of the same blob, and when it stops working the
registry is asked for a fresh one without the read failing. Against real servers
(``redirectd.py`` in front of ``lazyfs serve``), on both range paths: the lean HTTP/1.1
client and httpx."""

from __future__ import annotations

import calendar
import os
import time

import httpx
import pytest
import trio

from fetcher.imageref import ImageRef
from fetcher.redirects import EXPIRY_MARGIN, RedirectCache, url_expiry
from fetcher.registry import RegistryClient
from testkit import treecompare

from .redirectd import RedirectingRegistry


@pytest.fixture
def front(server):
    f = RedirectingRegistry(server.url.removeprefix("http://"))
    yield f
    f.stop()


@pytest.mark.parametrize("path", ["lean", "httpx"])
def test_redirected_url_is_reused_then_renewed_when_it_expires(front, images, path):
    image = images["app"]
    data = image.blobs[image.big]
    ref = ImageRef.parse(f"{front.host}/app:1")
    # a transport of its own turns the lean client off: every range goes through httpx
    kw = {"transport": httpx.AsyncHTTPTransport()} if path == "httpx" else {}
    ranges = [(0, 1000), (5000, 4096), (100_000, 65536), (len(data) - 10, 10), (1, 1)]

    async def main() -> None:
        async with RegistryClient(ref, timeout=10, **kw) as client:
            assert (client.lean is None) == (path == "httpx")
            for offset, length in ranges:
                assert await client.read_range(image.big, offset, length) == data[offset:offset + length]
            # one trip to the registry; every range from the blob server
            assert front.redirects == 1
            assert front.blobs.served == len(ranges) and front.blobs.refused == 0
            assert client.redirects.reused == len(ranges) - 1
            front.blobs.expire_all()
            for offset, length in ranges:
                assert await client.read_range(image.big, offset, length) == data[offset:offset + length]
            # the stale URL was refused once, then a fresh redirect served the rest
            assert front.blobs.refused == 1 and front.redirects == 2
            assert front.blobs.served == 2 * len(ranges)
            assert client.redirects.renewed == 1
            # another blob gets its own redirect
            other = next(d for d in image.blobs if d != image.big)
            assert await client.read_range(other, 0, 5) == image.blobs[other][:5]
            assert front.redirects == 3

    trio.run(main)


def test_whole_blob_reads_follow_redirects(front, images):
    image = images["app"]
    ref = ImageRef.parse(f"{front.host}/app:1")

    async def main() -> None:
        async with RegistryClient(ref, timeout=10) as client:
            assert await client.read_blob(image.big) == image.blobs[image.big]
            assert (await client.get_manifest()).digest == image.manifest_digest

    trio.run(main)
    assert front.redirects == 1 and front.blobs.served == 1


def test_signed_url_expiry_is_read_from_its_query():
    now = 1_800_000_000
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    s3 = f"https://b.s3.example/x?X-Amz-Date={amz_date}&X-Amz-Expires=600&X-Amz-Signature=ab"
    assert url_expiry(s3) == now + 600
    goog = f"https://storage.example/x?X-Goog-Date={amz_date}&X-Goog-Expires=60"
    assert url_expiry(goog) == now + 60
    assert url_expiry(f"https://cdn.example/x?Expires={now}&Signature=z") == now
    se = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    assert url_expiry(f"https://acct.blob.example/c/x?se={se}&sig=q") == calendar.timegm(time.gmtime(now))
    assert url_expiry("http://127.0.0.1:1/storage/x?gen=1") is None
    cache = RedirectCache(max_kept=2)
    cache.remember("a", s3)
    assert cache.get("a", now=now + 100) == s3
    assert cache.get("a", now=now + 600 - EXPIRY_MARGIN) is None  # about to expire: not used
    assert cache.renewed == 1
    for key in "bcd":
        cache.remember(key, f"http://h/{key}")
    assert cache.get("b") is None and cache.get("d") == "http://h/d"  # bounded


@pytest.mark.mount
def test_mount_through_a_redirecting_registry(served, mounts):
    image, _root, server = served
    front = RedirectingRegistry(server.url.removeprefix("http://"))
    try:
        # --amplify 0: the first reads fetch only their own chunks, so that the second half
        # of the files is still to be fetched when the URLs expire
        mnt, _ = mounts.mount(f"{front.host}/rich:1", "--no-prefetch", "--amplify", "0")
        files = sorted(p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink())
        for p in files[: len(files) // 2]:
            p.read_bytes()
        first_redirects = front.redirects
        front.blobs.expire_all()
        assert treecompare.compare_tree(mnt, image.expected) == []
        assert front.blobs.refused >= 1  # a stale URL was tried, and the reads still worked
        assert front.redirects > first_redirects
        # far fewer trips to the registry than ranges read from storage
        assert front.redirects < front.blobs.served
        assert "the redirected URL stopped working" in mounts.log()
    finally:
        front.stop()
    assert os.path.ismount(mnt)
