"""Learned prefetch on real mounts against a real server (``lazyfs serve``, counting
requests): a workload recorded once runs on a fresh cache without waiting on the network
for any chunk of the trace, in fewer, larger requests; the per-file state xattr and the
slowest-reads list."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from blockindex.convert import convert
from lazyfs.serve import make_server
from testkit.waiting import wait_until

from .conftest import lazyfs

pytestmark = pytest.mark.mount

CHUNK = 64 << 10


def make_rootfs(root: Path) -> list[str]:
    """60 files of 20-300 KiB under three directories; returns the workload: every third
    file, in an order that is not the image's."""
    rng = random.Random(8)
    names = []
    for i in range(60):
        d = root / ("bin", "lib", "share")[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        name = f"{d.name}/file{i:02d}"
        (root / name).write_bytes(rng.randbytes(rng.randrange(20 << 10, 300 << 10)))
        names.append(name)
    work = names[::3]
    rng.shuffle(work)
    return work


@pytest.fixture
def traced(tmp_path):
    rootfs = tmp_path / "rootfs"
    work = make_rootfs(rootfs)
    images = tmp_path / "images"
    result = convert(f"dir:{rootfs}", f"oci:{images / 'app'}:1", chunk_size=CHUNK, blob_limit=4 << 20)
    server = make_server(images, "127.0.0.1", 0)
    server.start()
    yield rootfs, work, server, result.manifest_digest
    server.close()


def read_all(mnt: Path, rootfs: Path, work: list[str]) -> None:
    for name in work:
        assert (mnt / name).read_bytes() == (rootfs / name).read_bytes(), name


def chunk_requests(server, since: int) -> list[int]:
    """Sizes of the blob range requests the server answered after ``since``."""
    sizes = []
    for method, path, rng, _status in server.requests[since:]:
        if method == "GET" and "/blobs/" in path and rng:
            lo, hi = map(int, re.match(r"bytes=(\d+)-(\d+)", rng).groups())
            sizes.append(hi - lo + 1)
    return sizes


def test_recorded_trace_replays_ahead_of_reads_in_fewer_larger_requests(traced, mounts, tmp_path):
    rootfs, work, server, digest = traced
    ref = f"127.0.0.1:{server.port}/app:1"

    # 1. cold, fetch-on-read only, recording until unmounted
    cache1 = tmp_path / "cache1"
    mnt, _ = mounts.mount(ref, "--no-prefetch", "--record", cache=cache1, name="one")
    before = len(server.requests)
    read_all(mnt, rootfs, work)
    first = chunk_requests(server, before)
    st1 = mounts.status(mnt)
    assert st1["trace"]["recording"] and st1["trace"]["recorded_chunks"] > 0
    assert st1["reads"]["chunk_misses"] > 0
    lazyfs("umount", str(mnt))
    mounts.points.remove(mnt)
    trace_file = cache1 / "traces" / (digest.removeprefix("sha256:") + ".json")
    doc = json.loads(trace_file.read_text())
    [run] = doc["runs"]
    files_in_order = list(dict.fromkeys(e["file"] for e in run["entries"]))
    assert files_in_order == work  # first-read order, file by file

    shown = json.loads(lazyfs("trace", "show", ref, "--cache", str(cache1), "--json").stdout)
    assert [f["file"] for f in shown["files"]] == work
    assert shown["chunks"] == len(run["entries"])
    text = lazyfs("trace", "show", "--digest", digest, "--cache", str(cache1)).stdout
    assert work[0] in text

    # 2. a fresh cache that has only the trace: the learned order is fetched first
    cache2 = tmp_path / "cache2"
    (cache2 / "traces").mkdir(parents=True)
    shutil.copy(trace_file, cache2 / "traces")
    before = len(server.requests)
    mnt2, _ = mounts.mount(ref, "--prefetch", "trace", cache=cache2, name="two")
    wait_until(lambda: mounts.status(mnt2)["trace"]["lead_state"] == "done", 60, "the learned order")
    read_all(mnt2, rootfs, work)
    st2 = mounts.status(mnt2)
    second = chunk_requests(server, before)
    t = st2["trace"]
    assert t["lead_source"] == "local" and t["lead_chunks"] == len(run["entries"])
    assert t["lead_misses"] == 0  # no read waited on the network for a chunk of the trace
    assert st2["reads"]["chunk_misses"] == 0  # nor for any other: the workload is the same
    assert st2["prefetch"]["state"] == "off"  # --prefetch trace: the rest is not fetched
    assert len(second) < len(first) / 3, (len(first), len(second))
    assert sum(second) / len(second) > 3 * sum(first) / len(first)
    # the xattr of a file of the workload: cached, and served from the cache
    state = json.loads(os.getxattr(mnt2 / work[0], "user.lazyfs.state"))
    size = (rootfs / work[0]).stat().st_size
    assert state["size"] == size and state["complete"] and state["cached_bytes"] == size
    assert state["read_bytes"]["network"] == 0 and state["read_bytes"]["cache"] > 0
    assert state["lead_chunks"] == state["chunks"]
    # a file nobody read: not cached
    other = next(n for n in sorted(p.relative_to(rootfs).as_posix() for p in rootfs.rglob("file*"))
                 if n not in work)
    state = json.loads(os.getxattr(mnt2 / other, "user.lazyfs.state"))
    assert state["cached_chunks"] == 0 and not state["complete"] and state["read_bytes"]["cache"] == 0


def test_status_slow_lists_the_longest_network_waits(traced, mounts, tmp_path):
    rootfs, work, server, _ = traced
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/app:1", "--no-prefetch", "--record-window", "0")
    read_all(mnt, rootfs, work[:5])
    st = mounts.status(mnt)
    slow = st["slow"]
    assert 0 < len(slow) <= 16
    assert {s["file"] for s in slow} <= set(work[:5])
    assert all(s["chunks"] and s["wait"] >= 0 for s in slow)
    assert [s["wait"] for s in slow] == sorted((s["wait"] for s in slow), reverse=True)
    assert st["trace"]["recorded_chunks"] == 0
    out = lazyfs("status", str(mnt), "--slow").stdout
    assert slow[0]["file"] in out and slow[0]["chunks"][0][:16] in out
    state = json.loads(os.getxattr(mnt / work[0], "user.lazyfs.state"))
    assert state["read_bytes"]["network"] > 0


def test_a_trace_for_another_image_is_ignored(traced, mounts, tmp_path):
    rootfs, work, server, digest = traced
    cache = tmp_path / "cache"
    (cache / "traces").mkdir(parents=True)
    (cache / "traces" / (digest.removeprefix("sha256:") + ".json")).write_text(json.dumps(
        {"mediaType": "application/vnd.lazyfs.trace.v1+json", "version": 1,
         "manifest": "sha256:" + "0" * 64, "runs": []}))
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/app:1", "--prefetch", "trace", cache=cache)
    wait_until(lambda: mounts.status(mnt)["trace"]["lead_state"] == "done", 60, "the learned order")
    read_all(mnt, rootfs, work[:2])
    assert mounts.status(mnt)["trace"]["lead_source"] is None
    assert "ignored" in mounts.log()


def test_convert_prefetch_files_are_fetched_first(tmp_path, mounts):
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    (rootfs / "usr").mkdir()
    (rootfs / "usr" / "lnk").symlink_to("../bin")  # followed, as inside a container
    listing = tmp_path / "first.txt"
    listing.write_text("# entry points\n/usr/lnk/file03\n\nshare/file05\n")
    images = tmp_path / "images"
    lazyfs("convert", f"dir:{rootfs}", f"oci:{images / 'app'}:1", "--chunk-size", "64K",
           "--prefetch-files", str(listing))
    bad = tmp_path / "bad.txt"
    bad.write_text("/no/such/file\n")
    done = lazyfs("convert", f"dir:{rootfs}", f"oci:{tmp_path / 'x'}:1", "--prefetch-files", str(bad),
                  check=False)
    assert done.returncode == 2 and "no/such/file is not a regular file" in done.stderr
    assert "Traceback" not in done.stderr
    server = make_server(images, "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/app:1", "--prefetch", "trace")
        wait_until(lambda: mounts.status(mnt)["trace"]["lead_state"] == "done", 60, "the learned order")
        first = ["bin/file03", "share/file05"]
        chunks = sum(-(-(rootfs / n).stat().st_size // CHUNK) for n in first)
        t = mounts.status(mnt)["trace"]
        assert t["lead_source"] == "index" and t["lead_chunks"] == chunks
        read_all(mnt, rootfs, first)
        st = mounts.status(mnt)
        assert st["reads"]["chunk_misses"] == 0 and st["trace"]["lead_misses"] == 0
    finally:
        server.close()


def test_recording_window_closes_and_saves_without_unmount(traced, mounts, tmp_path):
    rootfs, work, server, digest = traced
    cache = tmp_path / "cache"
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/app:1", "--no-prefetch", "--record-window", "10",
                          cache=cache)
    read_all(mnt, rootfs, work[:1])
    st = wait_until(lambda: (s := mounts.status(mnt))["trace"]["saved"] and s, 120, "the window to close")
    assert not st["trace"]["recording"]
    read_all(mnt, rootfs, work[1:3])  # after the window: not recorded
    doc = json.loads((cache / "traces" / (digest.removeprefix("sha256:") + ".json")).read_text())
    assert [e["file"] for e in doc["runs"][0]["entries"]] == [work[0]] * st["trace"]["recorded_chunks"]
    assert mounts.status(mnt)["trace"]["recorded_chunks"] == st["trace"]["recorded_chunks"]
    lazyfs("umount", str(mnt))
    mounts.points.remove(mnt)
    doc = json.loads((cache / "traces" / (digest.removeprefix("sha256:") + ".json")).read_text())
    assert len(doc["runs"]) == 1  # saved once, not again at unmount
