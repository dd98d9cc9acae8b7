"""Exposure (issue 7): who else on the node can reach a mount, and what an image's own
metadata can make the host do.

- Without ``--allow-other`` only the mounting user gets in (the kernel's FUSE rule);
  with it, other users get in but ``default_permissions`` makes the kernel apply each
  file's own mode and owner, so a root-only file in the image stays root-only.
- The mount is ``nosuid,nodev``: a set-uid program or a device node in an image gives
  nobody on the host more than a plain file would (a container gets both from its own
  overlay mount, which containerd makes, as with any image).

Other users are played by ``nobody`` (65534) through ``setpriv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs import mountinfo

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)"),
]

NOBODY = 65534


def ref(server) -> str:
    return f"127.0.0.1:{server.port}/rich:1"


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


def _reachable(mnt: Path) -> None:
    """Give ``nobody`` search rights down to the mountpoint (pytest's tmp dirs are 0700)."""
    for parent in [mnt.parent, *mnt.parent.parents]:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o001)


def test_without_allow_other_other_users_get_nothing(served, mounts):
    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    _reachable(mnt)
    assert (mnt / "data" / "small.txt").read_bytes() == b"hello lazyfs\n"  # the owner reads
    done = as_nobody("cat", str(mnt / "data" / "small.txt"))
    assert done.returncode != 0 and "Permission denied" in done.stderr
    done = as_nobody("ls", str(mnt))
    assert done.returncode != 0 and "Permission denied" in done.stderr


def test_allow_other_lets_others_read_what_the_modes_allow_and_nothing_more(served, mounts):
    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch", "--allow-other")
    _reachable(mnt)
    assert as_nobody("cat", str(mnt / "data" / "small.txt")).stdout == "hello lazyfs\n"  # 0644
    # 0400 root:root in the image: default_permissions makes the kernel check the mode
    done = as_nobody("cat", str(mnt / "data" / "root.txt"))
    assert done.returncode != 0 and "Permission denied" in done.stderr, done
    assert (mnt / "data" / "root.txt").read_bytes() == b"root only\n"  # root may
    # a 0700 directory of uid 1000: nobody may not list it or reach below it
    done = as_nobody("ls", str(mnt / "dirs" / "a" / "b"))
    assert done.returncode != 0 and "Permission denied" in done.stderr, done
    done = as_nobody("cat", str(mnt / "dirs" / "a" / "b" / "c" / "deep.txt"))
    assert done.returncode != 0 and "Permission denied" in done.stderr, done
    # writes are refused for everyone, root included
    with pytest.raises(OSError) as err:
        (mnt / "data" / "new.txt").write_bytes(b"x")
    assert err.value.errno == 30  # EROFS


def test_mount_is_nosuid_and_nodev(served, mounts):
    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch", "--allow-other")
    _reachable(mnt)
    options = _mount_options(mnt)
    assert {"ro", "nosuid", "nodev"} <= options, options
    # the image's /dev/null (char 1,3, mode 0666) is metadata only: opening it fails
    st = os.lstat(mnt / "dev" / "null")
    assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    with pytest.raises(PermissionError):
        open(mnt / "dev" / "null", "rb").close()  # noqa: SIM115
    # the set-uid bit is kept as metadata, and nosuid (checked above) makes it inert
    assert os.stat(mnt / "bin" / "setuid-tool").st_mode & 0o4000


def _mount_options(mnt: Path) -> set[str]:
    assert mountinfo.find(mnt) is not None, f"{mnt} is not mounted"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            return set(fields[5].split(","))
    raise AssertionError(f"{mnt} not in /proc/self/mountinfo")
