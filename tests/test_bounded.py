"""What a mount holds in memory does not depend on what a server announces or sends: a
registry's 200 to a range request with a Content-Length of gigabytes, an honest registry
that ignores Range with 64 MiB blobs read 64 at once, a peer that announces a huge chunk,
an index sent far past its declared size. Real mounts against the lying servers of
``hostiled.py``; the mount's peak RSS (VmHWM) is read before unmounting."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testkit.waiting import listening, wait_until

from .cachekit import make_image, manifest_of
from .hostiled import HostilePeer, HostileRegistry
from .test_hostile import _run_measured

pytestmark = pytest.mark.mount

RSS_LIMIT = 200 << 20
"""A mount's peak RSS, whatever its servers say (an idle mount takes about 40 MiB)."""
FILES = {f"f{i:02}.bin": 1 << 20 for i in range(64)}
"""64 MiB of incompressible files: one 64 MiB blob (``BLOB_LIMIT``) and a small one."""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded") / "images"
    return root, make_image(root, "big", FILES, seed=11)


@pytest.fixture
def registry(image):
    with HostileRegistry(image[0]) as r:
        yield r


def peak_rss(mounts, mnt: Path) -> int:
    pid = mounts.status(mnt)["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def read_all(mnt: Path, files: dict[str, bytes], names: list[str], threads: int = 1) -> None:
    def one(name: str) -> None:
        assert (mnt / name).read_bytes() == files[name], f"{name}: wrong bytes"

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, names))


def mount(mounts, registry: HostileRegistry, *extra: str) -> Path:
    mnt, _ = mounts.mount(f"127.0.0.1:{registry.port}/big:1", "--no-prefetch", "--timeout", "30",
                          *extra)
    return mnt


@pytest.mark.parametrize("announce", [3 << 30, 100 * 10**9], ids=["3GiB", "100GB"])
def test_a_200_announcing_gigabytes_to_a_range_request_costs_only_the_range(
        announce, image, registry, mounts):
    """The blob's bytes, then zeros, announced as ``announce`` bytes: each read takes the
    bytes up to its range's end and drops the connection."""
    _, files = image
    registry.ranges, registry.announce = "announce", announce
    mnt = mount(mounts, registry)
    read_all(mnt, files, sorted(files)[::8])
    rss = peak_rss(mounts, mnt)
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    assert "unexpected error" not in mounts.log()


def test_an_honest_registry_ignoring_range_with_64_reads_at_once(image, registry, mounts):
    _, files = image
    registry.ranges = "ignore"
    mnt = mount(mounts, registry)
    read_all(mnt, files, sorted(files), threads=64)
    rss = peak_rss(mounts, mnt)
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


@pytest.mark.parametrize("announce", [3 << 30, 100 * 10**9], ids=["3GiB", "100GB"])
def test_a_peer_announcing_a_huge_chunk_fails_no_read(announce, image, registry, mounts, tmp_path):
    """Reads come from the healthy registry; the peer is a failed source, not a failed read."""
    _, files = image
    token = tmp_path / "token"
    token.write_text("bounded-test-cluster-token-0123456789\n")
    with HostilePeer(announce) as peer:
        wait_until(lambda: listening(peer.port), 30, "the hostile peer listening")
        peers = tmp_path / "peers"
        peers.write_text(peer.url + "\n")
        mnt = mount(mounts, registry, "--peers-file", str(peers), "--token-file", str(token))
        read_all(mnt, files, sorted(files)[::8])
        assert peer.asked > 0
        rss = peak_rss(mounts, mnt)
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    assert "unexpected error" not in mounts.log()


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "until-close"])
def test_an_index_sent_past_its_declared_size_is_refused(with_length, image, registry, tmp_path):
    """The manifest declares the index's true (small) size; the registry sends 1 GiB."""
    root, _ = image
    _, _, manifest = manifest_of(root, "big")
    index = manifest["layers"][0]
    assert index["size"] < 1 << 20
    registry.oversize = (index["digest"], 1 << 30, with_length)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code, rss, err = _run_measured([
        sys.executable, "-m", "lazyfs", "mount", "--foreground", f"127.0.0.1:{registry.port}/big:1",
        str(mnt), "--cache", str(tmp_path / "cache"), "--timeout", "30"])
    assert code == 6, err
    assert err.startswith("lazyfs: error:") and err.count("\n") == 1, err
    assert f"the {index['size']} bytes its descriptor declares" in err, err
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    # nothing of it kept (the empty lock files of cache.onefetch stay)
    assert not [p for p in (tmp_path / "cache" / "indexes").iterdir()
                if not p.name.startswith((".lock.", ".origin."))]

