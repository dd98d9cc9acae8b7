"""Faults on the way to the origin or a peer (issue 7): through the fault-injecting proxy
(``testkit/faultproxy.py``), every read of a real mount either returns the right bytes or
fails with EIO within its deadline, and reads succeed again once the fault clears.

Each read runs in a thread joined with a bound far above the mount's ``--timeout``, so
that a hang fails the test, not the suite."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lazyfs.serve import make_server
from testkit.faultproxy import FaultProxy
from testkit.registryd import free_port
from testkit.waiting import listening, stop_process, wait_until

from .cachekit import CHUNK, install, make_image
from .conftest import ROOT

pytestmark = pytest.mark.mount

TIMEOUT = 4.0
"""The mounts' --timeout: a read must end (bytes or EIO) within it."""
SLACK = 3.0
"""What a read may take past ``TIMEOUT`` (FUSE queues, a loaded 2-core machine): twice
the deadline, the kernel's re-read of a failed page waiting a deadline of its own, is
caught."""
HANG = TIMEOUT + 15.0
"""A read still running after this is a hang."""
FILES = {f"f{i}.bin": 3 * CHUNK + 1000 * i for i in range(12)}


@pytest.fixture(scope="module")
def fault_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "images"
    return root, make_image(root, "f", FILES, seed=7)


@pytest.fixture(scope="module")
def origin(fault_image):
    root, _ = fault_image
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    yield server
    server.close()


@pytest.fixture
def proxy(origin):
    with FaultProxy(origin.port) as p:
        yield p


class Read:
    """One pread in a thread of its own: its bytes or its errno, and how long it took."""

    def __init__(self, path: Path, offset: int = 0, size: int = 1 << 20) -> None:
        self.path, self.offset, self.size = path, offset, size
        self.data: bytes | None = None
        self.errno: int | None = None
        self.seconds = 0.0
        self.short = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                self.data = os.pread(fd, self.size, self.offset)
            finally:
                os.close(fd)
        except OSError as exc:
            self.errno = exc.errno
        self.seconds = time.monotonic() - started

    def check(self, files: dict[str, bytes]) -> Read:
        """The right bytes or EIO, within the deadline; AssertionError otherwise."""
        self._thread.join(HANG)
        what = f"read of {self.path.name} [{self.offset}+{self.size}]"
        assert not self._thread.is_alive(), f"{what} hung past {HANG}s"
        if self.errno is None:
            # a read that fails part of the way returns the bytes before the failure
            want = files[self.path.name][self.offset : self.offset + self.size]
            assert self.data and self.data == want[: len(self.data)], f"{what}: wrong bytes"
            self.short = len(self.data) < len(want)
        else:
            assert self.errno == errno.EIO, f"{what}: {os.strerror(self.errno)}, not EIO"
        assert self.seconds <= TIMEOUT + SLACK, f"{what} took {self.seconds:.1f}s"
        return self


def right(mnt: Path, files: dict[str, bytes], name: str, offset: int = 0, size: int = 1 << 20) -> None:
    r = Read(mnt / name, offset, size).check(files)
    assert r.errno is None and not r.short, f"{name} [{offset}+{size}] failed after the fault cleared"


def mount_through(mounts, proxy: FaultProxy, *extra: str) -> Path:
    # --amplify 0: each read asks for its own chunks, so that a fault reaches every read
    mnt, _ = mounts.mount(f"127.0.0.1:{proxy.port}/f:1", "--no-prefetch", "--timeout", str(TIMEOUT),
                          "--amplify", "0", *extra)
    return mnt


PERSISTENT = ["refused", "reset", "stall", "drip", "503", "429", "short", "content-range", "altered"]


@pytest.mark.parametrize("kind", PERSISTENT)
def test_a_fault_fails_reads_with_eio_in_time_and_reads_recover(kind, fault_image, proxy, mounts):
    _, files = fault_image
    mnt = mount_through(mounts, proxy)
    names = sorted(files)
    right(mnt, files, names[0], CHUNK, 100)  # the mount works through the proxy
    proxy.inject(kind)
    during = [Read(mnt / names[1]),                    # the whole file: several chunks
              Read(mnt / names[2], CHUNK + 5, 4096),   # inside one chunk
              Read(mnt / names[3], 2 * CHUNK - 10, 20)]  # across two
    for r in during:
        r.check(files)
    assert proxy.injected[kind] > 0
    if kind in ("stall", "refused", "content-range", "short", "503"):
        # no chunk can come through this fault: every read must have failed
        assert all(r.errno == errno.EIO for r in during), [r.errno for r in during]
    proxy.clear()
    # (a read within a second of a failed one may be the kernel's re-read of it, and gets
    # only a short try: tests/test_fetch_chunks.py checks that; here, fresh reads)
    time.sleep(1.5)
    for r in during:  # the same reads now succeed, and a file not read before
        right(mnt, files, r.path.name, r.offset, r.size)
    right(mnt, files, names[4])
    assert "read failed (EIO)" in mounts.log() or all(r.errno is None for r in during)
    for r in during:
        print(f"{kind}: {r.path.name} [{r.offset}+{r.size}] "
              f"{'EIO' if r.errno else 'short' if r.short else 'ok'} in {r.seconds:.2f}s")


@pytest.mark.parametrize("burst", [["503", "502", "500"], ["429", "429"], ["reset", "short", "reset"]])
def test_a_short_burst_of_errors_is_retried_and_reads_succeed(burst, fault_image, proxy, mounts):
    _, files = fault_image
    mnt = mount_through(mounts, proxy)
    proxy.script(burst)
    names = sorted(files)
    right(mnt, files, names[5], 0, 4096)
    assert sum(proxy.injected.values()) == sum(k != "ok" for k in burst)
    assert "read failed (EIO)" not in mounts.log()  # retried within the one read
    right(mnt, files, names[6])


def test_a_lying_peer_fails_no_read_and_is_reported(fault_image, origin, mounts, tmp_path):
    """A peer whose answers are altered on the way: every read still gets the right
    bytes (from the origin), and the peer is named as bad."""
    root, files = fault_image
    token = tmp_path / "token"
    token.write_text("fault-test-cluster-token-0123456789\n")
    peer_cache = tmp_path / "peer-cache"
    install(root, "f", peer_cache)
    port = free_port()
    log = open(tmp_path / "peer.log", "wb")  # noqa: SIM115
    peer = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(peer_cache),
                             "--listen", f"127.0.0.1:{port}", "--token-file", str(token)],
                            cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_until(lambda: listening(port), 30, "lazyfs peer listening", alive=peer)
        with FaultProxy(port) as liar, FaultProxy(origin.port) as front:
            peers = tmp_path / "peers"
            peers.write_text(liar.url + "\n")
            mnt = mount_through(mounts, front, "--peers-file", str(peers), "--token-file", str(token))
            names = sorted(files)
            right(mnt, files, names[0], 0, 100)  # an honest peer first
            liar.inject("altered")
            for name in names[1:4]:
                right(mnt, files, name)
            assert liar.injected["altered"] > 0
            assert liar.url in mounts.status(mnt)["peers"]["bad_peers"]
            assert f"peer {liar.url} sent wrong bytes" in mounts.log()
            liar.clear()
            right(mnt, files, names[4])
    finally:
        stop_process(peer)
        log.close()


def test_many_reads_at_once_in_a_stall_all_end_within_their_deadline(fault_image, proxy, mounts):
    """More reads at once than the kernel lets a FUSE mount have in flight by default (12
    background requests; each read's readahead is one or more of them): a read queued in
    the kernel behind stalled ones would start its deadline only when the mount saw it,
    and take nearly two. The mount raises that limit (``mountinfo.set_max_background``)."""
    _, files = fault_image
    mnt = mount_through(mounts, proxy)
    names = sorted(files)
    right(mnt, files, names[0], CHUNK, 100)
    proxy.inject("stall")
    during = [Read(mnt / name, offset) for name in names for offset in (0, 2 * CHUNK)]
    for r in during:
        r.check(files)
    assert all(r.errno == errno.EIO for r in during), [r.errno for r in during]
    print("slowest read in the stall:", max(r.seconds for r in during))
