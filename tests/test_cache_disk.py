"""The cache on a small filesystem that fills up (issue 7): reads keep working from the
network, the log and ``lazyfs status`` say so once, the prefetch pauses rather than
fetching what it cannot keep, and caching resumes once there is room again.

The cache lives on a tmpfs of a few MiB that the test mounts (and grows, to give the
space back) at a path of its own."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from blockindex.convert import convert
from lazyfs.serve import make_server
from testkit.waiting import wait_until
from tests.conftest import lazyfs

pytestmark = pytest.mark.mount

CHUNK = 64 << 10
MiB = 1 << 20


@pytest.fixture(scope="module")
def disk_image(tmp_path_factory):
    """(files: name -> bytes, images root): 12 MiB of incompressible files, 64 KiB chunks."""
    tmp = tmp_path_factory.mktemp("diskfull")
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    rng = random.Random(3)
    files = {f"f{n}.bin": rng.randbytes(2 * MiB + n * 1000) for n in range(6)}
    for name, data in files.items():
        (rootfs / name).write_bytes(data)
    convert(f"dir:{rootfs}", f"oci:{tmp / 'images' / 'disk'}:1", chunk_size=CHUNK)
    shutil.rmtree(rootfs)
    return files, tmp / "images"


@pytest.fixture
def small_cache(tmp_path):
    """A 3 MiB tmpfs for the cache, unmounted at teardown (after the lazyfs mounts)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", f"lazyfs-test-{tmp_path.name}", str(cache)],
                   check=True)
    yield cache
    subprocess.run(["umount", "-l", str(cache)], capture_output=True)


def test_full_cache_disk_serves_from_network_pauses_prefetch_and_resumes(
        disk_image, small_cache, mounts, tmp_path):
    files, root = disk_image
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/disk:1", cache=small_cache)
        st = wait_until(lambda: (s := mounts.status(mnt))["prefetch"]["state"] == "paused-cache-full" and s,
                        60, "a paused prefetch")
        assert st["cache_state"]["full"] and st["cache_state"]["full_events"] == 1

        # every byte still right, though most chunks cannot be cached
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name
        st = mounts.status(mnt)
        assert st["reads"]["failed_reads"] == 0
        assert st["reads"]["chunk_misses"] > 0
        assert st["cache_state"]["served_uncached"] > 0
        text = lazyfs("status", str(mnt)).stdout
        assert "FULL" in text and "served without caching" in text

        # still paused after the reads (that it fetches nothing while paused, through many
        # retry periods, tests/test_prefetch_pause.py checks with a short retry period)
        assert st["prefetch"]["state"] == "paused-cache-full"

        log = mounts.log()
        assert log.count("cache full:") == 1, log
        assert log.count("prefetch paused") == 1, log
        assert "Traceback" not in log

        # a second mount of the image on the full disk works too (its pin or manifest may
        # not fit: those cost only eviction protection and an offline remount)
        mnt2, _ = mounts.mount(f"127.0.0.1:{server.port}/disk:1", "--no-prefetch", name="second",
                               cache=small_cache)
        name, data = next(iter(files.items()))
        assert (mnt2 / name).read_bytes() == data
        assert "Traceback" not in mounts.log("second")

        # space comes back: caching resumes and the prefetch completes
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_cache)], check=True)
        st = mounts.wait_complete(mnt)
        assert not st["cache_state"]["full"]
        assert st["prefetch"]["cached_chunks"] == st["prefetch"]["total_chunks"]
        log = mounts.log()
        assert log.count("caching resumed") == 1, log
        assert log.count("prefetch resumed") == 1, log
        assert "Traceback" not in log
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name
    finally:
        server.close()
