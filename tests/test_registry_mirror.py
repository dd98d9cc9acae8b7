"""An nginx caching proxy in front of a real registry, used as a --mirror: once one node
has read the image through it, another node reads it with no blob read at the registry."""

from __future__ import annotations

import shutil

import pytest

from testkit import imagegen, treecompare
from testkit.nginxd import Nginx, mirror_locations
from testkit.registryd import Registry, needs_registry

from .conftest import lazyfs

pytestmark = [needs_registry, pytest.mark.mount,
              pytest.mark.skipif(not shutil.which("nginx"), reason="needs nginx")]


@pytest.fixture
def nginx_mirror(tmp_path):
    def start(upstream: str) -> str:
        mirror = Nginx(tmp_path / f"nginx{len(started)}", mirror_locations(upstream))
        started.append(mirror)
        return mirror.url

    started: list[Nginx] = []
    yield start
    for mirror in started:
        mirror.stop()


def test_second_node_reads_only_from_the_mirror(tmp_path, mounts, nginx_mirror):
    image = imagegen.build_rich_image(tmp_path / "rich.tar")
    registry = Registry(tmp_path)
    try:
        registry.skopeo_copy(f"docker-archive:{image.path}", "app:1")
        lazyfs("convert", f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy",
               "--chunk-size", "64K")
        mirror = nginx_mirror(registry.host)
        ref = f"{registry.host}/app:1-lazy"
        mnt, _ = mounts.mount(ref, "--mirror", mirror, name="node1", cache=tmp_path / "cache1")
        mounts.wait_complete(mnt)
        assert treecompare.compare_tree(mnt, image.expected) == []
        reads = len(registry.blob_reads())
        # another node: its own empty cache, the same mirror
        mnt2, _ = mounts.mount(ref, "--mirror", mirror, name="node2", cache=tmp_path / "cache2")
        mounts.wait_complete(mnt2)
        assert treecompare.compare_tree(mnt2, image.expected) == []
        assert len(registry.blob_reads()) == reads
        # a dead mirror: the registry serves, and the mount still works
        mnt3, _ = mounts.mount(ref, "--mirror", "http://127.0.0.1:1", "--no-prefetch", name="node3",
                               cache=tmp_path / "cache3")
        assert treecompare.compare_tree(mnt3, image.expected) == []
        assert len(registry.blob_reads()) > reads
    finally:
        registry.stop()
