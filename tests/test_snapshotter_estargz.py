"""An eStargz image (written from a root filesystem directory, skopeo-pushed to Debian's
docker-registry) goes into containerd lazily through the lazyfs snapshotter, with no side
index: ``lazyfs pull`` takes it, the layer is read only for its footer and TOC before the
container starts, and ``ctr run`` reads its files, right, through the mount."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from testkit import containerdkit as kit
from testkit import imagegen
from testkit.estargz import entries_of_dir, push_estargz, write_estargz
from testkit.registryd import Registry, needs_registry

from .conftest import lazyfs
from .test_snapshotter import CONTAINERD, Node, _python_cache, skip_without_containerd
from .test_snapshotter_sideindex import PROGRAM

pytestmark = [needs_registry, pytest.mark.mount, CONTAINERD]


@pytest.fixture(scope="module")
def node():
    skip_without_containerd()
    tmp = Path(tempfile.mkdtemp(prefix="lze-"))  # short: unix socket paths are limited
    procs = kit.Procs()
    registry = None
    try:
        rootfs = imagegen.build_python_rootfs_dir(tmp / "rootfs", cache_dir=_python_cache())
        layer = write_estargz(entries_of_dir(rootfs), chunk_size=1 << 20)
        registry = Registry(tmp, name="origin")
        push_estargz(registry, tmp, [layer], "python:1")
        n = Node(tmp, tmp / "c.sock", tmp / "s.sock", tmp / "lazyfs", procs, None,  # type: ignore[arg-type]
                 registry, f"{registry.host}/python:1",
                 {"layers": [{"digest": "sha256:" + hashlib.sha256(layer.blob).hexdigest(),
                              "size": len(layer.blob)}]})
        n.start()
        yield n
    finally:
        kit.teardown(tmp, procs)
        if registry is not None:
            registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _layer_reads(node: Node) -> list[tuple[int, int]]:
    """(status, bytes) of each GET of the layer the registry answered."""
    layer = node.manifest["layers"][0]["digest"]
    log = node.server.log()  # type: ignore[attr-defined]
    pattern = rf'"GET \S+/blobs/{layer} HTTP/[\d.]+" (\d+) (\d+)'
    return [(int(m[1]), int(m[2])) for m in re.finditer(pattern, log)]


def test_an_estargz_image_pulls_lazily_and_runs_right(node):
    done = lazyfs("pull", "--address", str(node.sock), "--snapshotter-address", str(node.snap_sock), node.ref)
    assert "lazily" in done.stdout
    out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", node.ref, "t-esgz",
                   "/usr/bin/python3", "-c", PROGRAM)
    lines = out.stdout.split("\n")[:3]
    for path, digest in (line.split() for line in lines):
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path
    # the footer, the TOC and what the container read came by range, never the layer whole
    reads = _layer_reads(node)
    assert len(reads) > 2 and {status for status, _ in reads} == {206}
    assert max(n for _, n in reads) < node.manifest["layers"][0]["size"] // 2
    assert any(" - fuse.lazyfs " in line and f" {node.snap_root / 'mounts'}/" in line
               for line in Path("/proc/self/mountinfo").read_text().splitlines())
