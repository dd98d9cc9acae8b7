"""The snapshotter's mount parent (``lazyfs.mountparent``): image mounts are forked from
it, each in a session of its own with the parent's signal handlers and descriptors left
behind; they outlive it; a dead parent is replaced on the next mount; errors come back
as before; a malformed request is refused and the parent keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from cache.pids import alive
from lazyfs.errors import ExitCode, UserError
from lazyfs.mountparent import MAX_REQUEST
from lazyfs.process import wait_exited
from lazyfs.snapshotter.filesystem import LazyFileSystem
from testkit.treecompare import compare_tree

pytestmark = pytest.mark.mount


@pytest.fixture
def fs(tmp_path):
    fs = LazyFileSystem(tmp_path / "root", timeout=10, prefetch=False, mount_parent=True)
    yield fs
    fs.close()
    for mnt in (tmp_path / "root" / "mounts").glob("*"):
        fs.unmount(mnt)


def _parent_pid(fs: LazyFileSystem) -> int:
    assert fs.parent is not None
    pid = fs.parent.pid
    assert pid is not None, "no mount parent running"
    return pid


def _proc_status(pid: int) -> dict[str, str]:
    lines = open(f"/proc/{pid}/status").read().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _stat(pid: int) -> list[str]:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()


def _sockets(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def test_mounts_are_forked_from_the_parent_and_outlive_it(served, fs):
    image, _root, server = served
    fs.start_mount_parent()
    parent = _parent_pid(fs)
    mnt = fs.mount(f"127.0.0.1:{server.port}/rich:1", {})
    pid = fs.status(mnt)["pid"]
    assert int(_proc_status(pid)["PPid"]) == parent, "the mount was not forked by the mount parent"
    assert len(os.listdir(f"/proc/{parent}/task")) == 1, "the mount parent runs threads: unsafe to fork"
    assert int(_stat(pid)[3]) == pid, "the mount is not in a session of its own"  # its session id
    assert not int(_proc_status(pid)["SigIgn"], 16) & (1 << (signal.SIGCHLD - 1)), \
        "the mount ignores SIGCHLD as its parent does"
    assert not _sockets(parent) & _sockets(pid), "the mount holds the parent's request socket"
    assert [int(_stat(int(t))[16]) for t in os.listdir(f"/proc/{pid}/task")] == \
        [0] * len(os.listdir(f"/proc/{pid}/task")), "the mount runs at the imports' lowered priority"
    log = (fs.root / "logs" / f"{mnt.name}.log").read_text()
    assert "mounted 127.0.0.1" in log  # the image's own log, not the parent's

    os.kill(parent, signal.SIGKILL)
    assert wait_exited(parent, 10)
    assert alive(pid), "the mount died with its parent"
    assert compare_tree(mnt, image.expected) == []

    other = fs.mount(f"localhost:{server.port}/rich:1", {})
    assert other != mnt
    second = _parent_pid(fs)
    assert second != parent
    assert int(_proc_status(fs.status(other)["pid"])["PPid"]) == second
    assert compare_tree(other, image.expected) == []
    fs.close()
    assert wait_exited(second, 10), "the mount parent did not end when its input closed"
    assert alive(pid) and alive(fs.status(other)["pid"]), "closing the parent took a mount with it"


def test_errors_come_back_and_the_parent_stays(served, fs):
    _image, _root, server = served
    fs.start_mount_parent()
    parent = _parent_pid(fs)
    with pytest.raises(UserError) as err:
        fs.mount(f"127.0.0.1:{server.port}/missing:1", {})
    assert str(err.value).endswith("/missing: no manifest 1"), err.value
    assert err.value.exit_code == ExitCode.NETWORK
    assert _parent_pid(fs) == parent


def test_a_malformed_request_is_refused_and_the_parent_keeps_serving(served, fs):
    image, _root, server = served
    fs.start_mount_parent()
    parent = _parent_pid(fs)
    sock = fs.parent._sock
    r, w = os.pipe()
    try:
        socket.send_fds(sock, [b"{not json"], [w])
        assert "error" in json.loads(sock.recv(MAX_REQUEST))
        sock.send(b'{"argv": [], "log_file": "x"}')  # no ready pipe
        assert "error" in json.loads(sock.recv(MAX_REQUEST))
    finally:
        os.close(w)
        os.close(r)
    mnt = fs.mount(f"127.0.0.1:{server.port}/rich:1", {})
    assert _parent_pid(fs) == parent
    assert compare_tree(mnt, image.expected) == []
