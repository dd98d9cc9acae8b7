"""The snapshotter SIGKILLed again and again (issue 7), in the middle of a heavy prefetch
and of snapshot changes, with containerd's side played over gRPC by the test itself.

Every round kills the snapshotter while a thread prepares and removes container
snapshots through it and the image's mount process prefetches; every other round kills
that mount process too, as a crash of the whole node would. The restarted snapshotter must
list every snapshot it had committed, leave no half-made one, take back the live mount or
remount the dead one, and serve a new container's overlay whose every byte is right.
After the last round the prefetch completes and every cache entry holds the bytes its
digest names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from blockindex.convert import convert
from blockindex.oci import Layout
from blockindex.reader import IndexReader
from cache.store import ChunkStore
from lazyfs.process import wait_gone
from lazyfs.serve import make_server
from lazyfs.snapshotter.client import chain_ids
from testkit import containerdkit as kit
from testkit.waiting import wait_until

from .conftest import lazyfs
from .test_stress import _check_entries

pytestmark = [pytest.mark.mount, pytest.mark.timeout(600)]  # containerd killed and restarted in a loop

#: SIGKILL rounds. The issue asks for 20; 6 keeps CI fast (SNAPSHOTTER_KILL_ROUNDS=20 for more).
ROUNDS = int(os.environ.get("SNAPSHOTTER_KILL_ROUNDS", "6"))
CHUNK = 64 << 10
MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(files: path -> bytes, images root, manifest) of a rootfs of random files."""
    tmp = tmp_path_factory.mktemp("crash")
    rng = random.Random(5)
    files = {f"d{i % 3}/f{i}.bin": rng.randbytes(rng.randrange(1, 3 * MiB)) for i in range(12)}
    files["small/one"] = b"1"
    for rel, data in files.items():
        (tmp / "rootfs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "rootfs" / rel).write_bytes(data)
    convert(f"dir:{tmp / 'rootfs'}", f"oci:{tmp / 'images' / 'crash'}:1", chunk_size=CHUNK)
    shutil.rmtree(tmp / "rootfs")
    layout = Layout(tmp / "images" / "crash")
    digest = layout.resolve("1")["digest"]
    return files, tmp / "images", json.loads(layout.read_blob(digest)), digest


class Node:
    """A lazyfs snapshotter on its own socket and root, driven as containerd drives it."""

    def __init__(self, tmp: Path, ref: str, manifest: dict, digest: str) -> None:
        from lazyfs.snapshotter.server import pb

        self.pb = pb
        self.tmp = tmp
        self.sock = tmp / "s.sock"
        self.root = tmp / "lazyfs"
        self.log = tmp / "snapshotter.log"
        self.procs = kit.Procs()
        self.ref, self.manifest, self.digest = ref, manifest, digest
        self.layers = [layer["digest"] for layer in manifest["layers"]]
        self.chains = chain_ids(self.layers)
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        self.proc = kit.start_snapshotter(self.procs, self.sock, self.root, self.log, "--timeout", "10")
        self.channel, self.stub = kit.snapshots_stub(self.sock)

    def kill(self) -> None:
        assert self.proc is not None and self.channel is not None
        self.procs.stop(self.proc, signal.SIGKILL)
        self.channel.close()

    def pull(self) -> None:
        kit.pull_remote(self.stub, self.ref, self.digest, self.layers)

    def prepare(self, key: str) -> list:
        return list(self.stub.Prepare(self.pb.PrepareSnapshotRequest(
            snapshotter="lazyfs", key=key, parent=self.chains[-1]), timeout=120).mounts)

    def remove(self, key: str) -> None:
        self.stub.Remove(self.pb.RemoveSnapshotRequest(snapshotter="lazyfs", key=key), timeout=60)

    def listed(self) -> dict[str, int]:
        return {i.name: i.kind for r in self.stub.List(self.pb.ListSnapshotsRequest(snapshotter="lazyfs"),
                                                          timeout=60) for i in r.info}

    def image_mount(self) -> Path:
        [mnt] = [p for p in (self.root / "mounts").iterdir() if os.path.ismount(p)]
        return mnt

    def cache_count(self) -> int:
        return sum(1 for p in (self.root / "cache" / "chunks").glob("*/*") if not p.name.startswith("."))


def _status(mnt: Path) -> dict:
    return json.loads(lazyfs("status", str(mnt), "--json").stdout)


def _overlay(mounts: list, target: Path) -> None:
    [m] = mounts
    assert m.type == "overlay", m
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", str(target), "-o", ",".join(m.options)],
                   check=True, capture_output=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


def _churn(node: Node, stop: threading.Event, counts: dict[str, int]) -> None:
    """Container snapshots coming and going, as a busy node makes them, until the
    snapshotter dies under it."""
    i = 0
    while not stop.is_set():
        key = f"churn-{time.time_ns()}-{i}"
        i += 1
        try:
            node.prepare(key)
            counts["prepared"] += 1
            if i % 2:
                node.remove(key)
                counts["removed"] += 1
        except grpc.RpcError:
            return  # the snapshotter was killed: what is left is the restart's to sort out


def test_sigkill_loop_keeps_snapshots_mounts_and_cache_right(image):
    if not shutil.which("fusermount3"):
        pytest.skip("needs fusermount3")
    files, images, manifest, digest = image
    tmp = Path(tempfile.mkdtemp(prefix="lzk-"))  # short: unix socket paths are limited
    # a thin link (512 KiB/s) keeps the prefetch of this 18 MiB image running through the rounds
    server = make_server(images, "127.0.0.1", 0, delay=0.05, rate=512 << 10).start()
    node = Node(tmp, f"127.0.0.1:{server.port}/crash:1", manifest, digest)
    index = IndexReader(Layout(images / "crash").blob_path(manifest["layers"][0]["digest"]))
    digests = {c.digest for c in index.all_chunks()}
    rng = random.Random(3)
    rootfs = tmp / "rootfs"
    report = []
    try:
        node.start()
        node.pull()
        for n in range(ROUNDS):
            mnt = node.image_mount()
            pid = _status(mnt)["pid"]
            whole_node = n % 2 == 1
            before = node.cache_count()
            counts = {"prepared": 0, "removed": 0}
            stop = threading.Event()
            churn = threading.Thread(target=_churn, args=(node, stop, counts), daemon=True)
            churn.start()
            time.sleep(rng.uniform(0.2, 0.8))
            wait_until(lambda: counts["prepared"], 30, "a snapshot prepared", interval=0.01)  # noqa: B023
            node.kill()
            at_kill = node.cache_count()
            stop.set()
            churn.join(30)
            if whole_node:
                os.kill(pid, signal.SIGKILL)
                assert wait_gone(pid, 10), f"mount process {pid} survived SIGKILL"
            _check_entries(node.root / "cache", digests)  # whole, or absent
            if whole_node:
                # keep the prefetch busy for the rounds to come (about 36 s at 512 KiB/s): drop
                # the cache while no mount process runs, as an eviction would
                store = ChunkStore(node.root / "cache")
                for d in digests:
                    store.remove(d)

            node.start()
            listed = node.listed()
            # every layer of the image is still there, as committed snapshots
            assert all(listed.get(c) == node.pb.COMMITTED for c in node.chains), listed
            # nothing half-made: every active snapshot has its dirs, and after Cleanup
            # every dir belongs to a listed snapshot
            node.stub.Cleanup(node.pb.CleanupRequest(snapshotter="lazyfs"), timeout=60)
            actives = [k for k, kind in listed.items() if kind == node.pb.ACTIVE]
            for key in actives:
                [m] = node.stub.Mounts(node.pb.MountsRequest(snapshotter="lazyfs", key=key),
                                       timeout=60).mounts
                upper = next(o for o in m.options if o.startswith("upperdir=")).split("=", 1)[1]
                assert os.path.isdir(upper), f"{key}: {upper} is missing"
            assert len(list((node.root / "snapshots").iterdir())) == len(actives)
            # the image's mount: the same process taken back, or a new one in its place
            new_pid = _status(node.image_mount())["pid"]
            assert (new_pid != pid) if whole_node else (new_pid == pid), (whole_node, pid, new_pid)
            # a new container's overlay serves the right bytes
            _overlay(node.prepare(f"ctr-{n}"), rootfs)
            try:
                for rel in rng.sample(sorted(files), 3):  # a slice of each: the link is thin
                    data = files[rel]
                    at = rng.randrange(len(data))
                    with open(rootfs / rel, "rb") as f:
                        f.seek(at)
                        assert f.read(256 << 10) == data[at : at + (256 << 10)], (rel, at)
            finally:
                _umount(rootfs)
            for key in actives:
                node.remove(key)
            node.remove(f"ctr-{n}")
            report.append((before, at_kill, counts["prepared"], counts["removed"], whole_node))
        print(f"{len(digests)} chunks; rounds (cached at start, at the kill, prepared, removed, "
              f"whole node): {report}")
        # the kills came in the middle of the prefetch, not after it
        assert sum(r[1] < len(digests) for r in report) >= ROUNDS // 2, report

        # the thin link has kept the prefetch running through the rounds; what is left of it
        # (much of the image after a round that dropped the cache) need not take half a minute
        server.rate = 0
        mnt = node.image_mount()
        wait_until(lambda: _status(mnt)["prefetch"]["complete"], 180, "the prefetch completing",
                   interval=0.3, detail=lambda: _status(mnt)["prefetch"])
        assert _check_entries(node.root / "cache", digests) == len(digests)
        _overlay(node.prepare("ctr-last"), rootfs)
        try:
            for rel, data in files.items():
                assert (rootfs / rel).read_bytes() == data, rel
        finally:
            _umount(rootfs)
    finally:
        if os.path.ismount(rootfs):
            subprocess.run(["umount", "-l", str(rootfs)], capture_output=True)
        if node.channel is not None:
            node.channel.close()
        pids = []  # mount processes run in their own session: stop them by the pid they report
        for mnt in (node.root / "mounts").glob("*") if (node.root / "mounts").exists() else []:
            done = lazyfs("status", str(mnt), "--json", check=False)
            if done.returncode == 0:
                pids.append(json.loads(done.stdout)["pid"])
        kit.teardown(tmp, node.procs)
        for pid in pids:
            wait_gone(pid, 10, kill=True)
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
