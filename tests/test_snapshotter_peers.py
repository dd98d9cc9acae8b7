"""Peers on containerd nodes: ``lazyfs snapshotter --peers-file --token-file --advertise``
hands the options to every image mount it starts, remounts after a restart included,
while one ``lazyfs peer`` per node serves the node cache (``ROOT/cache``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyfs.snapshotter import filesystem
from lazyfs.snapshotter.errors import AlreadyExistsError
from lazyfs.snapshotter.filesystem import LazyFileSystem, PeerOptions
from lazyfs.snapshotter.labels import LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_TARGET
from lazyfs.snapshotter.service import SnapshotService

from .conftest import lazyfs
from .test_peers import TOKEN

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

