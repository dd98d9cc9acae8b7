"""The snapshotter's spare mount process (``lazyfs.spare``): started ahead of need, it
becomes the next image's mount; a new spare follows; a dead spare costs only its speed;
ending its input ends it without a mount."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cache.pids import alive
from lazyfs.errors import ExitCode, UserError
from lazyfs.process import read_ready, wait_gone
from lazyfs.snapshotter.filesystem import LazyFileSystem
from testkit.treecompare import compare_tree

from .conftest import ROOT

pytestmark = pytest.mark.mount


@pytest.fixture
def fs(tmp_path):
    fs = LazyFileSystem(tmp_path / "root", timeout=10, prefetch=False, spare=True)
    yield fs
    fs.close()
    for mnt in (tmp_path / "root" / "mounts").glob("*"):
        fs.unmount(mnt)


def _spare_pid(fs: LazyFileSystem) -> int:
    assert fs._spare is not None, "no spare mount process"
    return fs._spare[0].pid


def _nice(tid: int) -> int:
    return int(open(f"/proc/{tid}/stat").read().rsplit(")", 1)[1].split()[16])


def test_the_spare_becomes_the_mount_and_another_follows(served, fs):
    image, _root, server = served
    fs.start_spare()
    first = _spare_pid(fs)
    mnt = fs.mount(f"127.0.0.1:{server.port}/rich:1", {})
    assert fs.status(mnt)["pid"] == first
    # its imports ran niced, in a thread of their own; the mount's threads must not be
    assert [_nice(int(t)) for t in os.listdir(f"/proc/{first}/task")] == [0] * len(os.listdir(
        f"/proc/{first}/task")), "the mount runs at lowered priority"
    assert compare_tree(mnt, image.expected) == []
    log = (fs.root / "logs" / f"{mnt.name}.log").read_text()
    assert "mounted 127.0.0.1" in log  # the image's own log, not the spare's
    second = _spare_pid(fs)
    assert second != first and alive(second)
    fs.close()
    assert wait_gone(second, 10), "the spare did not end when its input closed"
    assert alive(first), "closing the spare took the image's mount with it"


def test_a_dead_spare_means_a_cold_start_not_a_failure(served, fs):
    image, _root, server = served
    fs.start_spare()
    dead = _spare_pid(fs)
    fs._spare[0].kill()
    fs._spare[0].wait(10)
    mnt = fs.mount(f"127.0.0.1:{server.port}/rich:1", {})
    assert fs.status(mnt)["pid"] != dead
    assert compare_tree(mnt, image.expected) == []


def test_errors_come_back_through_the_spare(served, fs, tmp_path):
    _image, _root, server = served
    fs.start_spare()
    taken = _spare_pid(fs)
    with pytest.raises(UserError) as err:
        fs.mount(f"127.0.0.1:{server.port}/missing:1", {})
    assert str(err.value).endswith("/missing: no manifest 1"), err.value
    assert err.value.exit_code == ExitCode.NETWORK
    assert not alive(taken) and _spare_pid(fs) != taken


def test_a_spare_without_a_request_exits_quietly_and_a_bad_one_is_one_line(tmp_path):
    for stdin, want_code, want_answer in ((b"", 0, ""), (b"{not json\n", 2, "error 2 ")):
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "lazyfs.spare", str(w)], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(w,), cwd=ROOT)
        os.close(w)
        _, err = proc.communicate(stdin, timeout=60)
        assert proc.returncode == want_code, err
        assert read_ready(r, 10).startswith(want_answer) if want_answer else read_ready(r, 10) == ""
        assert err == b""
