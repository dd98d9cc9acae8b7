"""The containerd snapshotter: metadata and snapshot semantics against a fake filesystem,
the gRPC service in-process, then the real thing with Debian's containerd."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from blockindex.convert import convert
from blockindex.oci import Layout
from lazyfs.errors import NotLazyImageError
from lazyfs.process import wait_gone
from lazyfs.serve import make_server
from lazyfs.snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from lazyfs.snapshotter.metadata import Kind, MetadataStore
from lazyfs.snapshotter.service import (
    LABEL_DEFER,
    LABEL_IMAGE_REF,
    LABEL_LAYER,
    LABEL_MANIFEST,
    LABEL_TARGET,
    SnapshotService,
    image_of,
)
from testkit import containerdkit as kit
from testkit import imagegen
from testkit.waiting import wait_until

from .conftest import lazyfs


def test_cli_errors_are_one_line_with_an_exit_code(tmp_path):
    done = lazyfs("pull", "--address", str(tmp_path / "none.sock"), "127.0.0.1:1/x:1", check=False)
    assert done.returncode == 4 and done.stderr.startswith("lazyfs: error: ") and done.stderr.count("\n") == 1
    (tmp_path / "file").write_text("")
    done = lazyfs("snapshotter", "--root", str(tmp_path / "file" / "root"), "--address",
                  str(tmp_path / "s.sock"), check=False)
    assert done.returncode == 7 and done.stderr.startswith("lazyfs: error: snapshotter root")


class FakeFileSystem:
    """Mounts are directories; ``lazy`` says which refs are lazyfs images."""

    def __init__(self, root: Path, lazy: set[str]) -> None:
        self.root, self.lazy = root, lazy
        self.mounted: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def mountpoint(self, ref: str) -> Path:
        return self.root / "mnt" / ref.replace("/", "_").replace(":", "_").replace("@", "_")

    def mount(self, ref: str, labels: dict[str, str]) -> Path:
        self.calls.append(("mount", ref))
        if ref.split("@")[0] not in self.lazy:
            raise NotLazyImageError(f"{ref} is not a lazyfs image")
        self.mounted.add(ref)
        self.mountpoint(ref).mkdir(parents=True, exist_ok=True)
        return self.mountpoint(ref)

    def check(self, mountpoint: Path) -> None:
        from lazyfs.errors import MountError

        if not any(self.mountpoint(r) == mountpoint for r in self.mounted):
            raise MountError(f"{mountpoint} is not mounted")

    def unmount(self, mountpoint: Path) -> None:
        self.calls.append(("unmount", str(mountpoint)))
        self.mounted = {r for r in self.mounted if self.mountpoint(r) != mountpoint}

    def usage(self, ref: str, layer: str) -> tuple[int, int]:
        return {"sha256:l1": (4096, 1), "sha256:l2": (3 << 20, 3)}.get(layer, (0, 0))


@pytest.fixture
def fake(tmp_path):
    fs = FakeFileSystem(tmp_path, lazy={"reg/app"})
    return SnapshotService(tmp_path / "root", fs), fs


def lazy_labels(target: str, ref: str = "reg/app:1", layer: str = "") -> dict[str, str]:
    labels = {LABEL_TARGET: target, LABEL_IMAGE_REF: ref, LABEL_MANIFEST: "sha256:m1"}
    return {**labels, LABEL_LAYER: layer} if layer else labels


def test_metadata_survives_reopen_and_rolls_back(tmp_path):
    store = MetadataStore(tmp_path / "m.db")
    store.create("a", "", Kind.ACTIVE, {"x": "1"})
    store.commit("A", "a", {"y": "2"})
    store.create("b", "A", Kind.ACTIVE, {})
    with pytest.raises(AlreadyExistsError):
        store.create("b", "A", Kind.ACTIVE, {})
    with pytest.raises(FailedPreconditionError):
        store.create("c", "b", Kind.ACTIVE, {})  # parent must be committed
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("DELETE FROM snapshots")
        raise RuntimeError("crash mid-change")
    store.close()
    again = MetadataStore(tmp_path / "m.db")
    assert [(s.key, s.parent, s.kind, s.labels) for s in again.list()] == [
        ("A", "", Kind.COMMITTED, {"x": "1", "y": "2"}), ("b", "A", Kind.ACTIVE, {})]
    with pytest.raises(FailedPreconditionError, match="children"):
        again.remove("A")


def test_overlay_semantics_for_ordinary_images(fake):
    svc, _fs = fake
    [m] = svc.prepare("l1", "", {})
    assert m.type == "bind" and "rw" in m.options
    (Path(m.source) / "one").write_text("1")
    svc.commit("L1", "l1", {})
    [m] = svc.prepare("l2", "L1", {})
    assert m.type == "overlay"
    l1_fs = str(svc.root / "snapshots" / str(svc.stat("L1").id) / "fs")
    assert f"lowerdir={l1_fs}" in m.options
    svc.commit("L2", "l2", {})
    [v] = svc.view("v", "L1", {})
    assert (v.type, v.source, v.options) == ("bind", l1_fs, ["ro", "rbind"])
    [v2] = svc.view("v2", "L2", {})
    assert v2.type == "overlay" and v2.options[0].startswith("lowerdir=") and v2.options[0].count(":") == 1
    [c] = svc.prepare("c", "L2", {})
    assert [o.split("=")[0] for o in c.options] == ["workdir", "upperdir", "lowerdir"]
    with pytest.raises(FailedPreconditionError):
        svc.mounts("L1")
    assert svc.mounts("c") == [c]
    assert svc.usage("L1")[0] > 0
    svc.update("L1", {"k": "v"}, ["labels.k"])
    assert svc.stat("L1").labels == {"k": "v"}
    with pytest.raises(FailedPreconditionError):
        svc.remove("L1")
    for key in ("c", "v", "v2", "L2"):
        svc.remove(key)
    with pytest.raises(NotFoundError):
        svc.stat("c")
    (svc.root / "snapshots" / "999").mkdir()
    svc.cleanup()
    assert sorted(p.name for p in (svc.root / "snapshots").iterdir()) == [str(svc.stat("L1").id)]


def test_lazy_layers_are_remote_snapshots_sharing_one_mount(fake):
    svc, fs = fake
    with pytest.raises(AlreadyExistsError):
        svc.prepare("extract-1 c1", "", lazy_labels("c1"))
    with pytest.raises(AlreadyExistsError):
        svc.prepare("extract-2 c2", "c1", lazy_labels("c2"))
    assert [s.key for s in svc.list()] == ["c1", "c2"]
    assert all(s.kind == Kind.COMMITTED for s in svc.list())
    mnt = fs.mountpoint("reg/app@sha256:m1")
    assert fs.mounted == {"reg/app@sha256:m1"}
    # two containers: each its own upper dir over the one image mount
    [a] = svc.prepare("ctr-a", "c2", {})
    [b] = svc.prepare("ctr-b", "c2", {})
    assert a.type == b.type == "overlay"
    assert f"lowerdir={mnt}" in a.options and a.options != b.options
    # a second pull of the same layer: already there, no second mount
    with pytest.raises(AlreadyExistsError):
        svc.prepare("extract-3 c1", "", lazy_labels("c1"))
    assert fs.calls.count(("mount", "reg/app@sha256:m1")) == 2
    # the mount goes when the last snapshot of the image goes
    for key in ("ctr-a", "ctr-b", "c2"):
        svc.remove(key)
    assert fs.mounted
    svc.remove("c1")
    assert not fs.mounted and ("unmount", str(mnt)) in fs.calls


def test_usage_of_lazy_layers_is_their_cache_share_and_of_containers_their_upper_dir(fake):
    svc, _fs = fake
    for target, parent, layer in (("c1", "", "sha256:l1"), ("c2", "c1", "sha256:l2")):
        with pytest.raises(AlreadyExistsError):
            svc.prepare(f"extract {target}", parent, lazy_labels(target, layer=layer))
    assert svc.usage("c1") == (4096, 1) and svc.usage("c2") == (3 << 20, 3)
    [m] = svc.prepare("ctr", "c2", {})
    upper = Path(next(o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir="))
    (upper / "written").write_bytes(b"x" * 100_000)
    size, inodes = svc.usage("ctr")
    assert size >= 100_000 and inodes == 1


def test_cache_usage_counts_the_cached_entries_of_each_layer(rich, tmp_path):
    from blockindex.codec import decode
    from blockindex.reader import IndexReader
    from cache.images import ImageStore
    from cache.store import ChunkStore
    from lazyfs.snapshotter.usage import CacheUsage

    _image, images = rich
    layout = Layout(images / "rich")
    digest = layout.resolve("1")["digest"]
    raw = layout.read_blob(digest)
    index, *blobs = json.loads(raw)["layers"]
    now = [0.0]
    usage = CacheUsage(tmp_path / "cache", ttl=2.0, clock=lambda: now[0])
    assert usage.image(digest) == {}  # the node has never seen the image
    store = ImageStore(tmp_path / "cache")
    store.save_manifest(None, digest, raw)
    index_path = store.save_index(index["digest"], layout.read_blob(index["digest"]))
    now[0] += 5
    assert usage.image(digest) == {index["digest"]: (index_path.stat().st_blocks * 512, 1)}
    chunks = ChunkStore(tmp_path / "cache")
    reader = IndexReader(index_path)
    first = [c for c in reader.all_chunks() if c.blob.digest == blobs[0]["digest"]]
    reader.close()
    data = layout.read_blob(blobs[0]["digest"])
    for c in first:
        chunks.put(c.digest, decode(c.codec, c.size, data[c.offset:c.offset + c.stored_size]))
    assert usage.layer(digest, blobs[0]["digest"]) == (0, 0)  # one sweep's answer, kept for ttl
    now[0] += 5
    expected = sum(chunks.path(c.digest).stat().st_blocks * 512 for c in first)
    assert expected > 0 and usage.layer(digest, blobs[0]["digest"]) == (expected, len(first))
    assert all(usage.layer(digest, b["digest"]) == (0, 0) for b in blobs[1:])


def test_an_ordinary_image_with_cri_labels_is_unpacked_as_usual(fake):
    svc, _fs = fake
    [m] = svc.prepare("extract-1 c1", "", lazy_labels("c1", ref="reg/plain:1"))
    assert m.type == "bind"
    svc.commit("c1", "extract-1 c1", {})
    assert svc.stat("c1").image == ""


def test_restore_remounts_dead_mounts(tmp_path):
    fs = FakeFileSystem(tmp_path, lazy={"reg/app"})
    svc = SnapshotService(tmp_path / "root", fs)
    with pytest.raises(AlreadyExistsError):
        svc.prepare("x", "", lazy_labels("c1"))
    fs.mounted.clear()  # the mount process died with the node
    SnapshotService(tmp_path / "root", fs).restore()
    assert fs.mounted == {"reg/app@sha256:m1"}


def test_a_dead_mount_is_replaced_before_a_container_gets_it(fake):
    svc, fs = fake
    with pytest.raises(AlreadyExistsError):
        svc.prepare("x", "", lazy_labels("c1"))
    fs.mounted.clear()  # the mount process died; the snapshotter lives on
    [m] = svc.prepare("ctr", "c1", {})
    mnt = fs.mountpoint("reg/app@sha256:m1")
    assert fs.mounted == {"reg/app@sha256:m1"} and f"lowerdir={mnt}" in m.options
    fs.mounted.clear()
    fs.lazy.clear()  # and now it cannot be mounted at all
    with pytest.raises(UnavailableError, match="cannot be remounted"):
        svc.prepare("ctr2", "c1", {})
    with pytest.raises(NotFoundError):
        svc.stat("ctr2")


def test_a_slow_mount_holds_up_only_its_own_image(tmp_path):
    class SlowFileSystem(FakeFileSystem):
        def __init__(self, *a) -> None:
            super().__init__(*a)
            self.entered, self.release = threading.Event(), threading.Event()

        def mount(self, ref: str, labels: dict[str, str]) -> Path:
            if ref.startswith("reg/slow"):
                self.entered.set()
                assert self.release.wait(30)
            return super().mount(ref, labels)

    fs = SlowFileSystem(tmp_path, {"reg/slow", "reg/app"})
    svc = SnapshotService(tmp_path / "root", fs)
    errors: list[BaseException] = []

    def pull_slow() -> None:
        try:
            svc.prepare("extract s1", "", lazy_labels("s1", ref="reg/slow:1"))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    t = threading.Thread(target=pull_slow)
    t.start()
    try:
        assert fs.entered.wait(10)
        with pytest.raises(AlreadyExistsError):  # another image: not held up
            svc.prepare("extract c1", "", lazy_labels("c1"))
        [m] = svc.prepare("plain", "", {})  # nor an ordinary snapshot
        assert m.type == "bind"
    finally:
        fs.release.set()
        t.join(10)
    assert [type(e) for e in errors] == [AlreadyExistsError]
    assert {s.key for s in svc.list()} == {"s1", "c1", "plain"}


class GatedFileSystem(FakeFileSystem):
    """Mounts of ``reg/app`` wait for ``release``; ``fail`` makes the next ones fail."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail = False

    def mount(self, ref: str, labels: dict[str, str]) -> Path:
        self.entered.set()
        assert self.release.wait(30)
        if self.fail:
            from lazyfs.errors import UserError

            self.calls.append(("mount", ref))
            raise UserError(f"cannot mount {ref}: the registry is gone")
        return super().mount(ref, labels)


def test_a_pull_that_defers_the_mount_returns_before_it_and_a_container_waits_for_it(tmp_path):
    """``lazyfs pull``'s Prepares (LABEL_DEFER) are answered while the mount is still
    coming up; the container's Prepare over the image waits for it, and gets the mount."""
    fs = GatedFileSystem(tmp_path, {"reg/app"})
    svc = SnapshotService(tmp_path / "root", fs)
    deferred = {LABEL_DEFER: "1"}
    with pytest.raises(AlreadyExistsError):
        svc.prepare("extract-1 c1", "", {**lazy_labels("c1"), **deferred})
    with pytest.raises(AlreadyExistsError):
        svc.prepare("extract-2 c2", "c1", {**lazy_labels("c2"), **deferred})
    assert fs.entered.wait(10) and not fs.mounted  # answered while the mount waits
    assert [s.key for s in svc.list()] == ["c1", "c2"]
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(svc.prepare("ctr", "c2", {})))
    t.start()
    time.sleep(0.3)
    assert not got  # the container waits for the mount
    fs.release.set()
    t.join(10)
    [[m]] = got
    assert f"lowerdir={fs.mountpoint('reg/app@sha256:m1')}" in m.options
    assert fs.calls.count(("mount", "reg/app@sha256:m1")) == 1  # one mount for both layers


def test_a_deferred_mount_that_fails_fails_the_container_with_its_reason(tmp_path):
    fs = GatedFileSystem(tmp_path, {"reg/app"})
    fs.fail = True
    svc = SnapshotService(tmp_path / "root", fs)
    with pytest.raises(AlreadyExistsError):
        svc.prepare("extract-1 c1", "", {**lazy_labels("c1"), LABEL_DEFER: "1"})
    fs.release.set()
    with pytest.raises(UnavailableError, match="the registry is gone"):
        svc.prepare("ctr", "c1", {})
    assert fs.calls.count(("mount", "reg/app@sha256:m1")) == 2  # tried again for the container
    assert not fs.mounted and not svc._mounting


def test_image_of():
    assert image_of({LABEL_IMAGE_REF: "h:5000/a/b:1", LABEL_MANIFEST: "sha256:x"}) == "h:5000/a/b@sha256:x"
    assert image_of({LABEL_IMAGE_REF: "h:5000/a@sha256:y", LABEL_MANIFEST: "sha256:y"}) == "h:5000/a@sha256:y"
    assert image_of({LABEL_IMAGE_REF: "h/a"}) == ""


def test_grpc_round_trip(fake, tmp_path, monkeypatch):
    import grpc

    from lazyfs.snapshotter.server import pb, pb_grpc, serve

    svc, _fs = fake
    sock = tmp_path / "s.sock"
    # born 0600, not made so afterwards: a client may connect before any chmod
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(svc, sock), kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            assert sock.stat().st_mode & 0o777 == 0o600  # containerd (root) only
            stub = pb_grpc.SnapshotsStub(ch)
            r = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazyfs", key="k"))
            assert r.mounts[0].type == "bind"
            with pytest.raises(grpc.RpcError) as e:
                stub.Prepare(pb.PrepareSnapshotRequest(key="x", labels=lazy_labels("c9")))
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            with pytest.raises(grpc.RpcError) as e:
                stub.Stat(pb.StatSnapshotRequest(snapshotter="lazyfs", key="nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            infos = [i for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info]
            assert {(i.name, i.kind) for i in infos} == {("k", pb.ACTIVE), ("c9", pb.COMMITTED)}
    finally:
        stop.set()
        t.join(10)


#: containerd started (by the first test), pulls, runs and restarts, each step with a 120 s deadline
CONTAINERD = pytest.mark.timeout(600)


# -- the real thing: Debian's containerd, runc and docker-registry, the lazyfs snapshotter -------

@dataclasses.dataclass
class Node:
    tmp: Path
    sock: Path
    snap_sock: Path
    snap_root: Path
    procs: kit.Procs
    snapshotter: subprocess.Popen
    server: object
    ref: str
    manifest: dict

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(["ctr", "-a", str(self.sock), *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {done.returncode}:\n{done.stderr}\n"
                                 f"snapshotter log:\n{self.log('snapshotter')[-3000:]}")
        return done

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def start(self) -> None:
        """The snapshotter, then containerd using it (the test is skipped if containerd
        does not answer here)."""
        self.start_snapshotter()
        kit.start_containerd(self.procs, self.tmp, kit.containerd_config(self.tmp, self.sock, self.snap_sock))
        if self.ctr("plugins", "ls", check=False).returncode != 0:
            pytest.skip(f"containerd does not answer here:\n{self.log('containerd')[-2000:]}")

    def start_snapshotter(self) -> subprocess.Popen:
        log = self.tmp / "snapshotter.log"
        self.snapshotter = kit.start_snapshotter(self.procs, self.snap_sock, self.snap_root, log,
                                                 "--no-prefetch", "--timeout", "10")
        return self.snapshotter

    def chunk_blob_requests(self) -> list:
        blobs = {layer["digest"] for layer in self.manifest["layers"][1:]}
        return [r for r in self.server.requests()  # downloads: not the push's HEADs and PUTs
                if r[0] == "GET" and any(r[1].endswith(b) for b in blobs)]


def skip_without_containerd() -> None:
    """Skip the test unless this is root with containerd, ctr, runc and FUSE."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("containerd", "ctr", "runc")):
        pytest.skip("needs root, containerd, ctr and runc (tests/setup.sh installs them)")
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("needs /dev/fuse and fusermount3")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    skip_without_containerd()
    tmp = Path(tempfile.mkdtemp(prefix="lzc-"))  # short: unix socket paths are limited
    procs = kit.Procs()
    server = None
    snap_root = tmp / "lazyfs"
    try:
        image = imagegen.build_python_image(tmp / "python.tar", cache_dir=_python_cache())
        convert(f"docker-archive:{image}", f"oci:{tmp / 'images' / 'python'}:1")
        server = kit.registry_with(tmp, tmp / "images")
        layout = Layout(tmp / "images" / "python")
        manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
        n = Node(tmp, tmp / "c.sock", tmp / "s.sock", snap_root, procs, None, server,  # type: ignore[arg-type]
                 f"127.0.0.1:{server.port}/python:1", manifest)
        n.start()
        yield n
    finally:
        kit.teardown(tmp, procs)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _python_cache() -> Path:
    from .test_imagegen import _python_cache as cache

    return cache()


@pytest.mark.mount
@CONTAINERD
def test_lazy_pull_and_run_downloads_no_chunk_before_start(node):
    # the snapshotter pulls: this process loads neither grpc nor trio (nor httpx)
    done = lazyfs("pull", "--address", str(node.sock), "--snapshotter-address", str(node.snap_sock),
                  node.ref, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert "lazily" in done.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "socket" in imported and not {"grpc", "trio", "httpx"} & imported, sorted(imported)
    assert f"pulled {node.ref}" in node.log("snapshotter")
    paths = [r[1] for r in node.server.requests() if r[0] == "GET"]
    assert any("/manifests/" in p for p in paths)
    assert node.chunk_blob_requests() == [], "a chunk blob was downloaded before the container started"
    # the image's mount comes up in the background (the pull did not wait for it): it
    # fetches the index, and no chunk
    wait_until(lambda: any(node.manifest["layers"][0]["digest"] in r[1] for r in node.server.requests()),
               timeout=60, what="the mount's fetch of the index")
    assert node.chunk_blob_requests() == [], "a chunk blob was downloaded before the container started"
    out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", node.ref, "t1",
                   "/usr/bin/python3", "-c", "print(1)")
    assert out.stdout.strip() == "1"
    assert node.chunk_blob_requests(), "the container read its files through the lazy mount"


@pytest.mark.mount
@CONTAINERD
def test_a_pull_the_snapshotter_makes_fails_as_one_pulling_here_does(node):
    missing = node.ref.replace("/python:1", "/missing:1")
    here = lazyfs("pull", "--address", str(node.sock), "--snapshotter-address", str(node.tmp / "none.sock"),
                  missing, check=False)
    there = lazyfs("pull", "--address", str(node.sock), "--snapshotter-address", str(node.snap_sock),
                   missing, check=False)
    assert here.returncode == there.returncode == 4
    assert here.stderr == there.stderr and there.stderr.startswith("lazyfs: error: ") \
        and there.stderr.count("\n") == 1, (here.stderr, there.stderr)
    assert f"pull of {missing}" not in node.log("snapshotter")  # no traceback: a user's error


@pytest.mark.mount
@CONTAINERD
def test_usage_of_a_lazy_image_is_what_it_takes_in_the_node_cache(node):
    from lazyfs.snapshotter.client import chain_ids

    lazyfs("pull", "--address", str(node.sock), node.ref)
    node.ctr("run", "--rm", "--snapshotter", "lazyfs", node.ref, "t-usage", "/usr/bin/python3", "-c", "1")
    rows = [line.split() for line in node.ctr("snapshot", "--snapshotter", "lazyfs", "usage", "-b").stdout
            .splitlines()[1:]]
    usage = {key: (int(size), int(inodes)) for key, size, inodes in rows}
    chains = chain_ids([layer["digest"] for layer in node.manifest["layers"]])
    cache = node.snap_root / "cache"
    entries = [p.stat() for p in (cache / "chunks").rglob("*") if p.is_file()]
    index = (cache / "indexes" / node.manifest["layers"][0]["digest"].removeprefix("sha256:")).stat()
    assert entries, "the container read chunks"
    assert sum(usage[c][0] for c in chains) == sum(st.st_blocks * 512 for st in [index, *entries])
    assert sum(usage[c][1] for c in chains) == len(entries) + 1


@pytest.mark.mount
@CONTAINERD
def test_an_ordinary_image_runs_through_the_same_snapshotter(node):
    archive = node.tmp / "python.tar"
    node.ctr("image", "import", "--snapshotter", "lazyfs", "--index-name", "plain/python:1", str(archive))
    out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", "plain/python:1", "t-plain",
                   "/usr/bin/python3", "-c", "print(2)")
    assert out.stdout.strip() == "2"


@pytest.mark.mount
@CONTAINERD
def test_kill_9_keeps_containers_running_and_restart_takes_mounts_back(node):
    lazyfs("pull", "--address", str(node.sock), node.ref)
    node.ctr("run", "-d", "--snapshotter", "lazyfs", node.ref, "t-long",
             "/usr/bin/python3", "-c", "import time; time.sleep(60)")
    try:
        before = node.ctr("snapshot", "--snapshotter", "lazyfs", "ls").stdout
        [mnt] = [p for p in (node.snap_root / "mounts").iterdir() if os.path.ismount(p)]
        pid = json.loads(lazyfs("status", str(mnt), "--json").stdout)["pid"]
        node.procs.stop(node.snapshotter, signal.SIGKILL)
        tasks = node.ctr("task", "ls").stdout
        assert "t-long" in tasks and "RUNNING" in tasks
        exec_ = node.ctr("task", "exec", "--exec-id", "e1", "t-long", "/usr/bin/python3", "-c",
                         "import os; print(len(os.listdir('/usr/lib')) > 0)")
        assert exec_.stdout.strip() == "True"
        node.start_snapshotter()
        # containerd's proxy reconnects to the new socket with gRPC's backoff
        def listed() -> subprocess.CompletedProcess | None:
            done = node.ctr("snapshot", "--snapshotter", "lazyfs", "ls", check=False)
            return done if done.returncode == 0 else None

        after = wait_until(listed, 30, "containerd listing the snapshots again", interval=0.5)
        assert after.stdout == before
        # the same mount process, taken back rather than replaced
        assert json.loads(lazyfs("status", str(mnt), "--json").stdout)["pid"] == pid
        assert f"took back the live mount of {node.ref.rsplit(':', 1)[0]}@" in node.log("snapshotter")
        out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", node.ref, "t2",
                       "/usr/bin/python3", "-c", "print(3)")
        assert out.stdout.strip() == "3"
    finally:
        node.ctr("task", "kill", "-s", "SIGKILL", "t-long", check=False)
        with contextlib.suppress(AssertionError):  # then deleted all the same
            wait_until(lambda: "t-long" not in node.ctr("task", "ls", check=False).stdout, 20,
                       "the task killed", interval=0.2)
        node.ctr("task", "delete", "t-long", check=False)
        node.ctr("container", "delete", "t-long", check=False)


@pytest.mark.mount
@CONTAINERD
def test_restart_remounts_a_dead_mount_from_the_cache_alone_when_the_registry_is_gone(node):
    """The node cache holds the whole image (a prefetch completed); the snapshotter and
    the image's mount process are killed and the registry goes away: the restarted
    snapshotter remounts the image from the cache and a new container starts from it."""
    from lazyfs.snapshotter.filesystem import LazyFileSystem

    # an image of its own (other chunks: other chain ids), on a registry of its own
    images = node.tmp / "offline-images"
    convert(f"docker-archive:{node.tmp / 'python.tar'}", f"oci:{images / 'python'}:1", chunk_size=256 << 10)
    layout = Layout(images / "python")
    digest = layout.resolve("1")["digest"]
    registry = make_server(images, "127.0.0.1", 0).start()
    try:
        ref = f"127.0.0.1:{registry.port}/python:1"
        warm = node.tmp / "warm"
        warm.mkdir()
        lazyfs("mount", ref, str(warm), "--cache", str(node.snap_root / "cache"), "--timeout", "10")
        try:
            wait_until(lambda: json.loads(lazyfs("status", str(warm), "--json").stdout)["prefetch"]
                       ["complete"], 120, "the prefetch completing", interval=0.2)
        finally:
            lazyfs("umount", str(warm))
        lazyfs("pull", "--address", str(node.sock), ref)
        mnt = LazyFileSystem(node.snap_root).mountpoint(f"127.0.0.1:{registry.port}/python@{digest}")
        pid = json.loads(lazyfs("status", str(mnt), "--json").stdout)["pid"]
        node.procs.stop(node.snapshotter, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 10)
    finally:
        registry.close()
    node.start_snapshotter()
    done = lazyfs("status", str(mnt), "--json", check=False)
    assert done.returncode == 0, f"{done.stderr}\n{node.log('snapshotter')[-3000:]}"
    status = json.loads(done.stdout)
    assert status["pid"] != pid and status["manifest"] == digest
    assert "from the cache alone" in (node.snap_root / "logs" / f"{mnt.name}.log").read_text()
    def ran() -> subprocess.CompletedProcess | None:
        done = node.ctr("run", "--rm", "--snapshotter", "lazyfs", ref, "t-offline", "/usr/bin/python3",
                        "-c", "import json; print(4)", check=False)
        return done if done.returncode == 0 else None

    # containerd reconnects to the new socket
    out = wait_until(ran, 30, "a container run from the remounted image", interval=0.5)
    assert out.stdout.strip() == "4"


@pytest.mark.mount
@CONTAINERD
def test_removing_the_image_unmounts_its_lazyfs_mount(node):
    from lazyfs.snapshotter.filesystem import LazyFileSystem

    lazyfs("pull", "--address", str(node.sock), node.ref)
    digest = Layout(node.tmp / "images" / "python").resolve("1")["digest"]
    mounts = [LazyFileSystem(node.snap_root).mountpoint(f"{node.ref.rsplit(':', 1)[0]}@{digest}")]
    assert os.path.ismount(mounts[0])
    node.ctr("image", "rm", "--sync", node.ref)
    node.ctr("content", "prune", "references", check=False)
    wait_until(lambda: not os.path.ismount(mounts[0]), 30, "the image unmounted", interval=0.2,
               detail=lambda: node.log("snapshotter")[-3000:])
    from lazyfs.snapshotter.client import chain_ids

    listed = node.ctr("snapshot", "--snapshotter", "lazyfs", "ls").stdout
    assert not [c for c in chain_ids([x["digest"] for x in node.manifest["layers"]]) if c in listed]


@pytest.mark.mount
@CONTAINERD
def test_a_stuck_mount_is_killed_and_replaced_not_waited_on(node):
    """An image's mount process alive but answering nothing (SIGSTOPped here) must not
    hang the snapshotter's calls: its check gives up after the status timeout, the stuck
    process is killed and the image mounted again."""
    from lazyfs.mountinfo import NotAnsweringError
    from lazyfs.process import exited
    from lazyfs.snapshotter.filesystem import LazyFileSystem

    lazyfs("pull", "--address", str(node.sock), node.ref)
    mounts = [p for p in (node.snap_root / "mounts").iterdir() if os.path.ismount(p)]
    fs = LazyFileSystem(node.snap_root)  # the snapshotter's view of the same root
    fs.status_timeout = 1.0
    status = next(st for m in mounts if (st := fs.status(m))["ref"].startswith(node.ref.split(":1")[0]))
    mnt, pid = Path(status["mountpoint"]), int(status["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(NotAnsweringError):
            fs.check(mnt)
        assert time.monotonic() - started < 5
        assert fs.mount(status["ref"], {}) == mnt  # kills the stuck one, mounts anew
        assert exited(pid), "the stuck mount process was left running"
        assert fs.status(mnt)["pid"] != pid
        out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", node.ref, "t-stuck",
                       "/usr/bin/python3", "-c", "print(2)")
        assert out.stdout.strip() == "2"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
