"""What lazyfs keeps on disk is its user's alone: every directory it makes under a cache,
the snapshotter's root or its state directory is 0700 and every file 0600, whichever
command makes it first; an open cache is tightened, an open directory that is not
lazyfs's is refused and left as it is (``cache/private.py``).

Another local user is played by ``nobody`` (65534) through ``setpriv``: it must list no
directory and open no file under any of them, though it can reach the directory they
sit in (a file beside them proves it can). The tests run under a umask of 022, a
user's usual one, so that lazyfs's own umask is what keeps things private.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockindex.oci import Layout
from testkit import containerdkit as kit
from testkit.registryd import Registry, needs_registry

from .conftest import ROOT, lazyfs
from .test_mount import index_of
from .test_peers import TOKEN, free_ports

pytestmark = pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")

NOBODY = 65534

_PROBE = r"""
import os, sys
for arg in sys.argv[1:]:
    kind, path = arg.split(":", 1)
    try:
        if kind == "d":
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError:
        continue
    print(path)
"""


@pytest.fixture(autouse=True)
def _usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can reach and list, as /tmp or /var/cache are, with a file
    every user can read in it. Not under pytest's own directory, which every pytest
    session on the machine makes 0700 again."""
    tmp = Path(tempfile.mkdtemp(prefix="lzperm-"))
    try:
        yield _open_dir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_dir(path: Path) -> Path:
    path.mkdir(mode=0o755, exist_ok=True)
    path.chmod(0o755)
    (path / "control").write_text("anyone may read this\n")
    (path / "control").chmod(0o644)
    return path


def _tree(root: Path) -> list[Path]:
    """``root`` and everything below it, as its owner sees it, but not into mounts."""
    paths = [root]
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
        paths += [Path(top, name) for name in dirs + files]
    return paths


def assert_private(root: Path, *, open_dirs: tuple[Path, ...] = (), file_modes: bool = True) -> None:
    """Every directory under ``root`` 0700 (but ``open_dirs``), every file 0600 (with
    ``file_modes``), and ``nobody`` reads none of them."""
    paths = _tree(root)
    assert len(paths) > 1, f"{root} holds nothing to check"
    loose = [f"{p} {stat.S_IMODE(p.lstat().st_mode):04o}" for p in paths
             if p not in open_dirs and p.lstat().st_mode & 0o077 and (file_modes or p.is_dir())]
    assert loose == [], "open to other users:\n" + "\n".join(loose)
    control = next(d / "control" for d in root.parents if (d / "control").exists())
    probes = [f"{'d' if p.is_dir() else 'f'}:{p}" for p in paths] + [f"f:{control}"]
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-c", _PROBE, *probes], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    read = done.stdout.splitlines()
    assert str(control) in read, "the probe cannot reach the directory under test"
    assert [p for p in read if p != str(control)] == []


def ref(server) -> str:
    return f"127.0.0.1:{server.port}/rich:1"


def _read_all(mnt: Path) -> None:
    for p in _tree(mnt):
        if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK):
            p.read_bytes()


# -- each command that makes a cache or state directory -----------------------------------

@pytest.mark.mount
def test_a_background_mount_makes_a_private_cache_its_log_included(served, base, mounts):
    _image, _root, server = served
    cache, mnt = base / "cache", base / "mnt"
    mnt.mkdir()
    lazyfs("mount", ref(server), str(mnt), "--cache", str(cache), "--timeout", "10")  # log under CACHE/logs
    mounts.points.append(mnt)
    _read_all(mnt)
    mounts.wait_complete(mnt)
    assert list((cache / "logs").iterdir()) and list((cache / "chunks").iterdir())
    assert_private(cache)


@pytest.mark.mount
def test_a_foreground_mount_makes_a_private_cache(served, base, mounts):
    _image, _root, server = served
    cache, mnt = base / "cache", base / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "mount", ref(server), str(mnt), "--cache",
                             str(cache), "--timeout", "10", "--foreground"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "the mount did not come up"
            time.sleep(0.05)
        mounts.points.append(mnt)
        _read_all(mnt)
        mounts.wait_complete(mnt)
        assert_private(cache)
    finally:
        mounts.unmount_all()
        proc.wait(timeout=30)


@pytest.mark.mount
def test_lazyfs_peer_makes_a_private_cache(served, base):
    _image, root, server = served
    chunk = max(index_of(root).all_chunks(), key=lambda c: c.stored_size)
    token = base / "token"
    token.write_text(TOKEN + "\n")
    cache = base / "cache"
    [port] = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(cache),
                             "--listen", f"127.0.0.1:{port}", "--token-file", str(token)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "lazyfs peer did not listen"
                time.sleep(0.05)
        # the peer fetches the chunk from the origin and caches it
        url = (f"http://127.0.0.1:{port}/v1/chunks/{chunk.hexdigest}?blob={chunk.blob.digest}"
               f"&offset={chunk.offset}&stored={chunk.stored_size}&size={chunk.size}"
               f"&codec={chunk.codec}&repo=127.0.0.1:{server.port}/rich")
        with urllib.request.urlopen(urllib.request.Request(
                url, headers={"Authorization": f"Bearer {TOKEN}"}), timeout=10) as answer:
            assert answer.status == 200
        entry = cache / "chunks" / chunk.hexdigest[:2] / chunk.hexdigest
        while not entry.exists():
            assert time.monotonic() < deadline, "the peer did not cache the chunk"
            time.sleep(0.05)
        assert_private(cache)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.mount
def test_the_snapshotter_makes_a_private_root_and_cache(served):
    _image, root, server = served
    layout = Layout(root / "rich")
    digest = layout.resolve("1")["digest"]
    layers = [d["digest"] for d in json.loads(layout.read_blob(digest))["layers"]]
    tmp = _open_dir(Path(tempfile.mkdtemp(prefix="lzperm-")))  # short: unix socket paths are limited
    base = _open_dir(tmp / "open")
    snap_root, sock = base / "lazyfs", tmp / "s.sock"
    procs = kit.Procs()
    channel = None
    try:
        kit.start_snapshotter(procs, sock, snap_root, tmp / "snapshotter.log", "--timeout", "10")
        assert stat.S_IMODE((tmp / "s-pull.sock").stat().st_mode) == 0o600, "others may ask for pulls"
        channel, stub = kit.snapshots_stub(sock)
        kit.pull_remote(stub, ref(server), digest, layers)
        [mnt] = [p for p in (snap_root / "mounts").iterdir() if os.path.ismount(p)]
        _read_all(mnt)
        status = json.loads(lazyfs("status", str(mnt), "--json").stdout)
        deadline = time.monotonic() + 120
        while not status["prefetch"]["complete"]:
            assert time.monotonic() < deadline, "the prefetch did not complete"
            time.sleep(0.2)
            status = json.loads(lazyfs("status", str(mnt), "--json").stdout)
        # a container's snapshot on the image: its root directory stays open, as
        # containerd's overlay snapshotter makes it (its users need not be root)
        from lazyfs.snapshotter.client import chain_ids
        from lazyfs.snapshotter.server import pb

        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazyfs", key="ctr",
                                               parent=chain_ids(layers)[-1]), timeout=60)
        [upper] = [d / "fs" for d in (snap_root / "snapshots").iterdir() if (d / "work").is_dir()]
        assert stat.S_IMODE(upper.stat().st_mode) == 0o755
        assert list((snap_root / "cache" / "chunks").iterdir())
        assert_private(snap_root, open_dirs=(upper,))
    finally:
        if channel is not None:
            channel.close()
        pids = [json.loads(done.stdout)["pid"] for m in (snap_root / "mounts").glob("*")
                if (done := lazyfs("status", str(m), "--json", check=False)).returncode == 0]
        kit.teardown(tmp, procs)
        from lazyfs.process import wait_gone

        for pid in pids:
            wait_gone(pid, 10, kill=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_as_an_older_lazyfs_left_it(cache: Path) -> None:
    """A cache made under a umask of 022 by a lazyfs that set none: 0755 and 0644."""
    hexd = "ab" * 32
    for sub, name in (("chunks/ab", hexd), ("manifests", "cd" * 32), ("indexes", "ef" * 32),
                      ("logs", "mnt.log"), ("traces", "12" * 32 + ".json")):
        (cache / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub / name).write_bytes(b"private bytes\n")
    for p in _tree(cache):
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.mark.parametrize("command", [
    ["cache"],
    ["cache", "verify"],
    ["trace", "show", "--digest", "sha256:" + "12" * 32],
])
def test_an_open_cache_is_tightened_by_the_first_command_that_opens_it(base, command):
    cache = base / "cache"
    _cache_as_an_older_lazyfs_left_it(cache)
    done = lazyfs(*command, "--cache", str(cache), check=False)
    assert f"cache directory {cache} was mode 0755, open to other users: made it 0700" in done.stderr
    assert "Traceback" not in done.stderr
    # every directory tightened: the files inside, 0644 still, are out of others' reach
    assert_private(cache, file_modes=False)
    again = lazyfs(*command, "--cache", str(cache), check=False)
    assert "open to other users" not in again.stderr  # said once


@pytest.mark.parametrize("command", [
    ["mount", "127.0.0.1:1/app:1", "{mnt}", "--cache", "{dir}"],
    ["mount", "127.0.0.1:1/app:1", "{mnt}", "--cache", "{dir}", "--foreground"],
    ["peer", "--cache", "{dir}", "--listen", "127.0.0.1:0", "--token-file", "{token}"],
    ["trace", "show", "--digest", "sha256:" + "12" * 32, "--cache", "{dir}"],
    ["snapshotter", "--root", "{dir}", "--address", "{dir}/s.sock"],
])
def test_an_open_directory_that_is_not_lazyfs_s_is_refused_and_left_as_it_is(base, command):
    other = base / "shared"
    (other / "someone-else").mkdir(parents=True)
    other.chmod(0o755)
    (base / "mnt").mkdir()
    (base / "token").write_text(TOKEN + "\n")
    argv = [a.format(dir=other, mnt=base / "mnt", token=base / "token") for a in command]
    done = lazyfs(*argv, check=False, timeout=60)
    assert done.returncode == 7, done.stderr
    assert done.stderr.startswith("lazyfs: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
    assert os.listdir(other) == ["someone-else"]


@needs_registry
def test_convert_keeps_its_state_private_and_its_output_as_the_umask_says(rich, base, tmp_path):
    image, _images = rich
    registry = Registry(tmp_path)
    try:
        env = {**os.environ, "XDG_STATE_HOME": str(base / "state")}
        lazyfs("convert", f"docker-archive:{image.path}", f"docker://{registry.host}/app:1-lazy",
               "--chunk-size", "64K", env=env)
        lazyfs("convert", f"docker-archive:{image.path}", f"oci:{base / 'out'}:1", "--chunk-size", "64K",
               env=env)
    finally:
        registry.stop()
    state = base / "state" / "lazyfs"
    assert (state / "blob-repos.json").is_file()
    assert_private(state)
    # the output layout is the user's: made as the user's umask (022 here) says
    assert stat.S_IMODE((base / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((base / "out" / "blobs" / "sha256").stat().st_mode) == 0o755
