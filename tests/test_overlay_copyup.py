"""A container writing into directories of a lazy image while the prefetch fills the cache.

This is the snapshotter's layout: an overlay whose lower layer is the lazyfs mount and
whose upper and work dirs sit on the same filesystem as the node cache. Creating a file in
a directory of the image copies the directory up; overlayfs holds the filesystem's rename
lock while it asks the lazyfs mount for the directory's attributes and xattrs. A cache that
renamed its entries across directories (a common tmp/ dir) needed that same lock for every
chunk the prefetch wrote, and the two waited on each other forever, freezing every
cross-directory rename on the disk. Writes now rename within the entry's own directory
(``cache.store``). The deadlock needed a cache write on the mount's loop thread at the
moment of a copy-up, which this test makes likely but cannot force: the deterministic
guard is ``test_writes_rename_within_one_directory`` in ``tests/test_store.py``, which
fails on the old layout. This test checks the whole path with real mounts.

Should the deadlock come back, the watchdog aborts the FUSE connection (fusectl), which
frees the kernel, and the test fails instead of hanging the machine.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockindex.convert import convert
from lazyfs.serve import make_server
from testkit.waiting import wait_until

pytestmark = pytest.mark.mount

DIRS = 120
SUBDIRS = 4
#: seconds between two copy-ups: spreads the 600 of them over several of the prefetch's
#: batches, so that chunks are written while directories are copied up
PACE = 0.01
CHUNK = 64 << 10
#: seconds the copy-ups may take before the test calls it a deadlock (they take well
#: under a second each when nothing is wrong, even on a loaded machine)
WATCHDOG = 120


@pytest.fixture
def slow_many_dirs(tmp_path):
    """An image of many directories, each with an incompressible file (22.5 MiB in all),
    served over a 2 MiB/s link so that the prefetch is still writing chunks, for about ten
    seconds, while the test copies directories up."""
    rootfs = tmp_path / "rootfs"
    rng = random.Random(5)
    for i in range(DIRS):
        d = rootfs / f"d{i:03d}"
        d.mkdir(parents=True)
        (d / "data.bin").write_bytes(rng.randbytes(3 * CHUNK))
        (d / "small").write_bytes(rng.randbytes(2048))  # small ranges: cached on the loop thread
        for j in range(SUBDIRS):
            (d / f"e{j}").mkdir()
    convert(f"dir:{rootfs}", f"oci:{tmp_path / 'images' / 'dirs'}:1", chunk_size=CHUNK)
    shutil.rmtree(rootfs)
    server = make_server(tmp_path / "images", "127.0.0.1", 0, delay=0.05, rate=2 << 20)
    server.start()
    yield f"127.0.0.1:{server.port}/dirs:1"
    server.close()


def _fuse_abort(mnt: Path) -> None:
    conns = Path("/sys/fs/fuse/connections")
    if not conns.is_dir() or not any(conns.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conns)], capture_output=True)
    (conns / str(os.minor(os.stat(mnt).st_dev)) / "abort").write_text("1")


def test_copy_up_while_prefetching_does_not_deadlock(slow_many_dirs, mounts, tmp_path):
    mnt, _ = mounts.mount(slow_many_dirs)  # prefetch on: chunks are written all along
    cache = tmp_path / "cache"
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    assert os.stat(upper).st_dev == os.stat(cache).st_dev, "cache and upper dir must share a filesystem"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={mnt},upperdir={upper},workdir={work}", str(merged)], check=True)
    minor_before = os.minor(os.stat(mnt).st_dev)
    # The copy-ups start once the prefetch is writing chunks: started at once, they could
    # all be over before its first batch lands (a fast machine did that).
    before = wait_until(lambda: (p := mounts.status(mnt)["prefetch"])["cached_chunks"] and p, 60,
                        "the prefetch writing chunks", detail=lambda: mounts.status(mnt)["prefetch"])
    assert not before["complete"], "the prefetch finished before the copy-ups began: slow the link"
    done = threading.Event()
    errors: list[BaseException] = []

    targets = [Path(f"d{i:03d}", *sub)
               for i in range(DIRS) for sub in [(), *[(f"e{j}",) for j in range(SUBDIRS)]]]

    def container() -> None:
        try:
            for n, target in enumerate(targets):  # each create copies one directory of the image up
                (merged / target / "new.txt").write_text(str(n))
                time.sleep(PACE)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    try:
        writer = threading.Thread(target=container, daemon=True)
        writer.start()
        if not done.wait(WATCHDOG):
            _fuse_abort(mnt)
            pytest.fail(f"copy-ups stuck for {WATCHDOG}s while the prefetch ran: deadlock "
                        f"(FUSE connection {minor_before} aborted to free the kernel)")
        assert not errors, errors
        after = mounts.status(mnt)["prefetch"]
        assert after["cached_chunks"] > before["cached_chunks"], "the prefetch wrote nothing meanwhile"
        for n, target in enumerate(targets):
            assert (merged / target / "new.txt").read_text() == str(n)
        for i in range(DIRS):
            assert len((merged / f"d{i:03d}" / "data.bin").read_bytes()) == 3 * CHUNK
    finally:
        subprocess.run(["umount", "-l", str(merged)], capture_output=True)
