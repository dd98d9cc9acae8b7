"""Peers on containerd nodes: ``lazyfs snapshotter --peers-file --token-file --advertise``
hands the options to every image mount it starts, remounts after a restart included,
while one ``lazyfs peer`` per node serves the node cache (``ROOT/cache``).

First the argv of the mounts against a fake process, then two nodes for real (each its
own root, socket, snapshotter and ``lazyfs peer``), driven over gRPC as containerd would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from blockindex.oci import Layout
from lazyfs.process import wait_gone
from lazyfs.snapshotter import filesystem
from lazyfs.snapshotter.errors import AlreadyExistsError
from lazyfs.snapshotter.filesystem import LazyFileSystem, PeerOptions
from lazyfs.snapshotter.labels import LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_TARGET
from lazyfs.snapshotter.service import SnapshotService
from testkit import containerdkit as kit
from testkit.treecompare import compare_tree
from testkit.waiting import listening, wait_until

from .conftest import ROOT, lazyfs
from .test_peers import TOKEN, free_ports, origin_range_bytes

IMAGE = "127.0.0.1:5000/app@sha256:" + "ab" * 32


class FakeMounts:
    """Mount processes that say they are mounted at once, and the argv of each."""

    def __init__(self, monkeypatch) -> None:
        self.argvs: list[list[str]] = []
        self.alive: set[Path] = set()
        fake = self

        class Started:
            pid = 0

            def __init__(self, argv, **_kw):
                fake.argvs.append(argv)
                fake.alive.add(Path(argv[argv.index("mount") + 2]))
                os.write(int(argv[argv.index("--ready-fd") + 1]), b"ok\n")

            def poll(self):
                return None

        def check(_fs, mountpoint):
            if mountpoint not in fake.alive:
                raise filesystem.MountError("not mounted")

        monkeypatch.setattr(filesystem.subprocess, "Popen", Started)
        monkeypatch.setattr(LazyFileSystem, "check", check)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_snapshotter_hands_verify_layers_to_its_mounts(tmp_path, monkeypatch):
    fake = FakeMounts(monkeypatch)
    labels = {LABEL_TARGET: "sha256:" + "11" * 32, LABEL_IMAGE_REF: IMAGE.split("@")[0] + ":1",
              LABEL_MANIFEST: IMAGE.split("@")[1], LABEL_LAYER: "sha256:" + "22" * 32}
    strict = SnapshotService(tmp_path, LazyFileSystem(tmp_path, verify_layers=True))
    with pytest.raises(AlreadyExistsError):
        strict.prepare("extract-1", "", labels)
    fake.alive.clear()
    SnapshotService(tmp_path, LazyFileSystem(tmp_path)).restore()
    assert ["--verify-layers" in argv for argv in fake.argvs] == [True, False]


def test_the_snapshotter_hands_its_peer_options_to_every_mount_remounts_included(tmp_path, monkeypatch):
    """Peers are node-wide: every image mount the snapshotter starts asks them (and never
    listens: the node's `lazyfs peer` serves the cache), and so does a mount that a
    restarted snapshotter starts again in place of a dead one."""
    fake = FakeMounts(monkeypatch)
    peers = PeerOptions(peers_file=tmp_path / "peers", token_file=tmp_path / "token",
                        advertise="http://10.0.0.5:7070")
    labels = {LABEL_TARGET: "sha256:" + "11" * 32, LABEL_IMAGE_REF: IMAGE.split("@")[0] + ":1",
              LABEL_MANIFEST: IMAGE.split("@")[1], LABEL_LAYER: "sha256:" + "22" * 32}
    service = SnapshotService(tmp_path, LazyFileSystem(tmp_path, peers=peers))
    with pytest.raises(AlreadyExistsError):
        service.prepare("extract-1", "", labels)

    # restarted, with the mount alive: taken back as it is, no new process
    restarted = SnapshotService(tmp_path, LazyFileSystem(tmp_path, peers=peers))
    restarted.restore()
    assert len(fake.argvs) == 1
    # restarted after the mount died: the new mount has the options too
    fake.alive.clear()
    SnapshotService(tmp_path, LazyFileSystem(tmp_path, peers=peers)).restore()
    assert len(fake.argvs) == 2
    for argv in fake.argvs:
        assert argv[argv.index("mount") + 1] == IMAGE
        assert _flag(argv, "--peers-file") == str(tmp_path / "peers")
        assert _flag(argv, "--token-file") == str(tmp_path / "token")
        assert _flag(argv, "--advertise") == "http://10.0.0.5:7070"
        assert "--listen" not in argv
        assert _flag(argv, "--cache") == str(tmp_path / "cache")

    # without peers (and without --advertise), no peer option at all
    fake.alive.clear()
    SnapshotService(tmp_path, LazyFileSystem(tmp_path)).restore()
    assert not {"--peers-file", "--token-file", "--advertise"} & set(fake.argvs[-1])
    noself = PeerOptions(peers_file=tmp_path / "peers", token_file=tmp_path / "token").argv()
    assert noself == ["--peers-file", str(tmp_path / "peers"), "--token-file", str(tmp_path / "token")]


def test_snapshotter_peer_option_mistakes_are_one_line(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    peers = tmp_path / "peers"
    peers.write_text("http://127.0.0.1:7070\n")
    base = ["snapshotter", "--root", str(tmp_path / "root"), "--address", str(tmp_path / "s.sock")]
    for args, message in (
            (["--peers-file", str(peers)], "--peers-file needs --token-file (the cluster token)"),
            (["--token-file", str(token)], "--token-file needs --peers-file"),
            (["--advertise", "http://127.0.0.1:7070"], "--advertise needs --peers-file"),
            (["--peers-file", str(tmp_path / "none"), "--token-file", str(token)],
             f"peers file {tmp_path / 'none'} does not exist"),
            (["--peers-file", str(peers), "--token-file", str(tmp_path / "none")], "cannot read token file"),
            (["--peers-file", str(peers), "--token-file", str(token), "--advertise", "ftp://x"],
             "--advertise: not a peer URL")):
        bad = lazyfs(*base, *args, check=False, timeout=60)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith(f"lazyfs: error: {message}"), (args, bad.stderr)
        assert len(bad.stderr.splitlines()) == 1, bad.stderr
        assert "--listen" not in bad.stderr  # the snapshotter has none: its mounts never listen
    assert not (tmp_path / "root").exists()  # checked before anything is made


# -- two nodes for real ---------------------------------------------------------------------


class Node:
    """One node: a snapshotter with its own root and socket, and the `lazyfs peer` that
    serves its cache, started and stopped by pid."""

    def __init__(self, tmp: Path, name: str, url: str, peers_file: Path, token_file: Path) -> None:
        from lazyfs.snapshotter.server import pb

        self.pb = pb
        self.dir = tmp / name
        self.dir.mkdir()
        self.root, self.sock, self.url = self.dir / "root", self.dir / "s.sock", url
        self.procs = kit.Procs()
        self.options = ["--timeout", "10", "--peers-file", str(peers_file), "--token-file", str(token_file),
                        "--advertise", url]
        self.peers_argv = ["-m", "lazyfs", "peer", "--cache", str(self.root / "cache"),
                           "--listen", url.removeprefix("http://"), "--token-file", str(token_file)]
        self.snapshotter: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start_peer(self) -> None:
        peer = self.procs.start([sys.executable, *self.peers_argv], self.dir / "peer.log", cwd=ROOT)
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        wait_until(lambda: listening(int(port), host), 30, "lazyfs peer listening", alive=peer,
                   detail=lambda: (self.dir / "peer.log").read_text()[-2000:])

    def start(self) -> None:
        log = self.dir / "snapshotter.log"
        self.snapshotter = kit.start_snapshotter(self.procs, self.sock, self.root, log, *self.options)
        self.channel, self.stub = kit.snapshots_stub(self.sock)

    def kill(self) -> None:
        assert self.snapshotter is not None and self.channel is not None
        self.procs.stop(self.snapshotter, signal.SIGKILL)
        self.channel.close()

    def pull(self, ref: str, digest: str, layers: list[str]) -> None:
        kit.pull_remote(self.stub, ref, digest, layers)

    def image_mount(self) -> Path:
        [mnt] = [p for p in (self.root / "mounts").iterdir() if os.path.ismount(p)]
        return mnt

    def status(self) -> dict:
        return json.loads(lazyfs("status", str(self.image_mount()), "--json").stdout)

    def wait_complete(self, timeout: float = 180) -> dict:
        return wait_until(lambda: (st := self.status())["prefetch"]["complete"] and st, timeout,
                          "the prefetch completing", interval=0.3, detail=lambda: self.status()["prefetch"])

    def teardown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        pids = []  # mount processes run in their own session: stop them by the pid they report
        for mnt in (self.root / "mounts").glob("*") if (self.root / "mounts").exists() else []:
            done = lazyfs("status", str(mnt), "--json", check=False)
            if done.returncode == 0:
                pids.append(json.loads(done.stdout)["pid"])
        kit.teardown(self.dir, self.procs)
        for pid in pids:
            wait_gone(pid, 10, kill=True)


def _chunk_requests(server, blobs: set[str]) -> int:
    return sum(1 for _m, path, rng, _s in server.requests
               if rng and path.rsplit("/", 1)[-1] in blobs)


@pytest.mark.mount
@pytest.mark.timeout(600)  # two nodes' snapshotters and a 180 s prefetch wait
def test_a_second_node_gets_the_image_from_the_first_nodes_peer_not_the_origin(served):
    """Node A pulls the image and its mount prefetches it all (asking B's `lazyfs peer` for
    the chunks B owns, which fetches them once for the cluster); then node B pulls it, and
    its mount takes every chunk from A's peer or its own cache: the origin sees no range
    request after A is done. A restarted B remounts with the same peers."""
    image, root, server = served
    layout = Layout(root / "rich")
    digest = layout.resolve("1")["digest"]
    manifest = json.loads(layout.read_blob(digest))
    layers = [d["digest"] for d in manifest["layers"]]
    blobs = set(layers[1:])  # the chunk blobs (the index is layer 0)
    ref = f"127.0.0.1:{server.port}/rich:1"
    tmp = Path(tempfile.mkdtemp(prefix="lzp-"))  # short: unix socket paths are limited
    token_file, peers_file = tmp / "token", tmp / "peers"
    token_file.write_text(TOKEN + "\n")
    url_a, url_b = (f"http://127.0.0.1:{port}" for port in free_ports(2))
    peers_file.write_text(f"{url_a}\n{url_b}\n")
    a = Node(tmp, "a", url_a, peers_file, token_file)
    b = Node(tmp, "b", url_b, peers_file, token_file)
    try:
        for node in (a, b):
            node.start_peer()
            node.start()
        a.pull(ref, digest, layers)
        st_a = a.wait_complete()
        assert st_a["peers"]["self"] == url_a
        before = _chunk_requests(server, blobs)
        assert before > 0 and origin_range_bytes(server) > 0

        b.pull(ref, digest, layers)
        st_b = b.wait_complete()
        mnt_b = b.image_mount()
        assert compare_tree(mnt_b, image.expected) == []
        st_b = b.status()
        assert st_b["peers"]["self"] == url_b
        sources = st_b["bytes_by_source"]
        assert sources["origin"] == 0, sources
        assert sources.get(f"peer {url_a}", 0) > 0, sources
        assert _chunk_requests(server, blobs) == before, "B's mount read chunks from the origin"
        print(f"\nnode B's image mount fetched: {sources}; origin range requests: {before}, all A's")

        # the whole node restarts (snapshotter and mount killed): the remount asks peers too
        pid = st_b["pid"]
        b.kill()
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 10), f"mount process {pid} survived SIGKILL"
        b.start()
        st_again = b.status()
        assert st_again["pid"] != pid
        assert st_again["peers"]["self"] == url_b
        assert url_a in st_again["peers"]["peers"]
        assert compare_tree(b.image_mount(), image.expected) == []
        assert _chunk_requests(server, blobs) == before
        for node in (a, b):
            assert "Traceback" not in (node.dir / "snapshotter.log").read_text()
    finally:
        b.teardown()
        a.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
