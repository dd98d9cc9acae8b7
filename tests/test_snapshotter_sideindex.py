"""An ordinary gzip image (skopeo-pushed to Debian's docker-registry) with a side index
goes into containerd lazily through the lazyfs snapshotter, as a lazyfs image does: ``lazyfs
pull`` downloads no layer, and ``ctr run`` reads its files, right, through the mount. The
same image without a side index is refused by ``lazyfs pull`` (one line, exit 3) and pulled
whole by ``ctr image pull`` through the same snapshotter."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from testkit import containerdkit as kit
from testkit import imagegen
from testkit.registryd import Registry, needs_registry

from .conftest import lazyfs
from .test_snapshotter import CONTAINERD, Node, _python_cache, skip_without_containerd

pytestmark = [needs_registry, pytest.mark.mount, CONTAINERD]

PROGRAM = ("import hashlib, json, os, sys\n"
           "for p in (os.path.realpath(sys.executable), os.__file__, json.__file__):\n"
           "    print(p, hashlib.sha256(open(p, 'rb').read()).hexdigest())")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    skip_without_containerd()
    tmp = Path(tempfile.mkdtemp(prefix="lzi-"))  # short: unix socket paths are limited
    procs = kit.Procs()
    registry = None
    try:
        image = imagegen.build_python_image(tmp / "python.tar", cache_dir=_python_cache())
        registry = Registry(tmp, name="origin")
        registry.skopeo_copy(f"docker-archive:{image}", "python:1")  # gzip layers, as pushed usually
        registry.skopeo_copy(f"docker-archive:{image}", "plain:1")
        lazyfs("index", f"docker://{registry.host}/python:1", "--spacing", "256K")
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/python:1"],
            capture_output=True, text=True, check=True, timeout=60).stdout)
        n = Node(tmp, tmp / "c.sock", tmp / "s.sock", tmp / "lazyfs", procs, None,  # type: ignore[arg-type]
                 registry, f"{registry.host}/python:1", manifest)
        n.start()
        yield n
    finally:
        kit.teardown(tmp, procs)
        if registry is not None:
            registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _layer_reads(node: Node, repo: str) -> list[str]:
    layers = {layer["digest"] for layer in node.manifest["layers"]}
    return [uri for uri in node.server.blob_reads()  # type: ignore[attr-defined]
            if f"/{repo}/" in uri and any(uri.endswith(d) for d in layers)]


def test_a_side_indexed_image_pulls_lazily_and_runs_right(node):
    indexed = len(_layer_reads(node, "python"))  # lazyfs index read each layer once
    done = lazyfs("pull", "--address", str(node.sock), "--snapshotter-address", str(node.snap_sock), node.ref)
    assert "lazily" in done.stdout
    assert len(_layer_reads(node, "python")) == indexed, "a layer was downloaded before the container started"
    out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", node.ref, "t-side",
                   "/usr/bin/python3", "-c", PROGRAM)
    # the image holds this machine's files at their own paths: the container reads them right
    lines = out.stdout.split("\n")[:3]
    for path, digest in (line.split() for line in lines):
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path
    assert len(_layer_reads(node, "python")) > indexed, "the container read its files through the lazy mount"
    # the image is mounted by lazyfs (through its side index), not unpacked
    assert any(" - fuse.lazyfs " in line and f" {node.snap_root / 'mounts'}/" in line
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_an_image_without_a_side_index_is_pulled_whole(node):
    plain = node.ref.replace("/python:1", "/plain:1")
    done = lazyfs("pull", "--address", str(node.sock), "--snapshotter-address", str(node.snap_sock), plain,
                  check=False)
    assert done.returncode == 3 and "has no side index" in done.stderr and done.stderr.count("\n") == 1, \
        done.stderr
    node.ctr("image", "pull", "--plain-http", "--snapshotter", "lazyfs", plain, timeout=300)
    out = node.ctr("run", "--rm", "--snapshotter", "lazyfs", plain, "t-plain",
                   "/usr/bin/python3", "-c", "print(3)")
    assert out.stdout.strip() == "3"
    assert _layer_reads(node, "plain"), "ctr image pull downloaded the layers"
