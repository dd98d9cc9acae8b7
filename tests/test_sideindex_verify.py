"""A side index checked against the image's own layers, in a real registry: one that lies
(a checkpoint window altered and the digests of the chunks read from it recomputed, so
that its spans verify against themselves) serves its lie until the layer is read whole,
then fails its check: every read is EIO (its cached chunks too), ``lazyfs status`` says
why, and the node's later mounts pass it over. With ``--verify-layers`` the lie is never
served. An honest side index passes, and the fill reads each layer in one GET."""

from __future__ import annotations

import errno
import shutil
import sqlite3
import zlib
from pathlib import Path

import pytest
import trio

from blockindex.codec import chunk_digest
from blockindex.format import CODEC_GZIP_SPAN
from blockindex.gzspan import inflate_span
from blockindex.oci import sha256_digest
from blockindex.reader import IndexReader
from fetcher.imageref import ImageRef
from fetcher.options import RegistryOptions
from lazyfs.sideindex import _attach
from testkit import imagegen, treecompare
from testkit.registryd import Registry, needs_registry
from testkit.waiting import wait_until

from .conftest import lazyfs
from .test_sideindex_registry import _index, _layer_reads, _side_index, _small_files_image

pytestmark = [needs_registry, pytest.mark.mount]


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    return imagegen.build_rich_image(tmp_path_factory.mktemp("siderich") / "rich.tar")


def _lying_index(registry: Registry, honest: Path, out: Path) -> dict[bytes, bytes]:
    """A copy of the side index ``honest`` whose checkpoints' windows lie (every byte
    changed) and whose chunks read from them carry the digests of what they then inflate
    to: each such span verifies against itself. The names of the files whose bytes the
    lie changed, with those bytes."""
    shutil.copy(honest, out)
    db = sqlite3.connect(out)
    with db:
        windows = db.execute("SELECT id, window FROM checkpoints WHERE length(window) > 0").fetchall()
        for cid, window in windows:
            lie = bytes((b + 1) % 256 for b in zlib.decompress(window))
            db.execute("UPDATE checkpoints SET window = ? WHERE id = ?", (zlib.compress(lie), cid))
    index = IndexReader(out)
    changed: dict[bytes, bytes] = {}
    try:
        for c in index.all_chunks():
            assert c.codec == CODEC_GZIP_SPAN and c.span is not None
            layer = registry.blob_file(c.blob.digest).read_bytes()
            plain = inflate_span(layer[c.offset : c.offset + c.stored_size], c.span, c.size)
            lying = chunk_digest(plain)
            if lying != c.digest:
                with db:
                    db.execute("UPDATE chunks SET digest = ? WHERE digest = ?", (lying, c.digest))
                [(name,)] = db.execute("SELECT d.name FROM dirents d JOIN extents e ON e.ino = d.ino "
                                       "JOIN chunks c ON c.id = e.chunk WHERE c.digest = ?",
                                       (lying,)).fetchall()
                changed[bytes(name)] = plain
    finally:
        index.close()
        db.close()
    return changed


def _attach_lie(registry: Registry, mounts, tmp_path: Path
                ) -> tuple[dict[str, bytes], dict[bytes, bytes], str]:
    """The small image with an honest side index (64 KiB spacing: checkpoints with windows),
    then a lying one attached in its place; the files, the lie, and the lying index's
    digest."""
    files = _small_files_image(registry, tmp_path)
    lazyfs("index", f"docker://{registry.host}/small:1", "--chunk-size", "64K", "--spacing", "64K")
    mnt, _ = mounts.mount(f"{registry.host}/small:1", "--no-prefetch", name="honest", cache=tmp_path / "c0")
    manifest = mounts.status(mnt)["manifest"]
    mounts.unmount_all()
    [honest] = (tmp_path / "c0" / "indexes").iterdir()
    lie = _lying_index(registry, honest, tmp_path / "lie.sqlite")
    assert lie, "the altered windows changed no file"
    data = (tmp_path / "lie.sqlite").read_bytes()
    trio.run(_attach, ImageRef.parse(f"{registry.host}/small:1"), RegistryOptions(), None, manifest, data, {})
    return files, lie, sha256_digest(data)


def _read_fails(path: Path) -> None:
    with pytest.raises(OSError) as e:
        path.read_bytes()
    assert e.value.errno == errno.EIO


def test_a_lying_side_index_is_caught_once_its_layer_is_read_whole(registry, mounts, tmp_path):
    files, lie, lying = _attach_lie(registry, mounts, tmp_path)
    name, bytes_of_lie = next(iter(lie.items()))
    honest_name = next(n for n in files if n.encode() not in lie)
    ref = f"{registry.host}/small:1"
    # unchecked (nothing reads the layer whole): the lie is served, and cached
    mnt, _ = mounts.mount(ref, "--no-prefetch", name="first", cache=tmp_path / "c1")
    assert mounts.status(mnt)["index"] == lying
    assert (mnt / "app" / name.decode()).read_bytes() == bytes_of_lie != files[name.decode()]
    assert mounts.status(mnt)["layers"]["state"] == "unchecked"
    mounts.unmount_all()
    # the fill reads the layer whole: the check fails, and nothing is read through the index
    mnt, _ = mounts.mount(ref, name="second", cache=tmp_path / "c1")
    st = wait_until(lambda: (s := mounts.status(mnt))["layers"]["state"] == "failed" and s, 60,
                    "the layer check failing", detail=lambda: mounts.status(mnt)["layers"])
    assert "is not the bytes its digest names" in st["layers"]["problem"]
    assert lying in st["layers"]["problem"]
    _read_fails(mnt / "app" / name.decode())  # cached on this node by the first mount
    _read_fails(mnt / "app" / honest_name)  # nothing through a lying index
    st = mounts.status(mnt)
    assert st["prefetch"]["state"] == "stopped" and st["reads"]["failed_reads"] >= 2
    shown = lazyfs("status", str(mnt)).stdout
    assert "layers    FAILED" in shown and "is not the bytes its digest names" in shown
    log = mounts.log("second")
    assert log.count("does not match the image's layers") == 1, log
    mounts.unmount_all()
    # the node remembers: a later mount refuses the lying index (it superseded the honest one)
    mnt, done = mounts.mount(ref, "--no-prefetch", name="third", cache=tmp_path / "c1", check=False)
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
    assert f"side index {lying} failed its layer check on this node" in done.stderr
    # until an honest one is attached again
    lazyfs("index", f"docker://{ref}", "--chunk-size", "64K", "--spacing", "64K")
    mnt, _ = mounts.mount(ref, "--no-prefetch", name="fourth", cache=tmp_path / "c1")
    assert mounts.status(mnt)["index"] != lying
    assert (mnt / "app" / name.decode()).read_bytes() == files[name.decode()]


def test_with_verify_layers_the_lie_is_never_served(registry, mounts, tmp_path):
    files, lie, lying = _attach_lie(registry, mounts, tmp_path)
    name = next(iter(lie)).decode()
    mnt, _ = mounts.mount(f"{registry.host}/small:1", "--no-prefetch", "--verify-layers",
                          cache=tmp_path / "c1")
    _read_fails(mnt / "app" / name)  # it waited for the check, which failed
    st = mounts.status(mnt)["layers"]
    assert st["state"] == "failed" and st["strict"] and lying in st["problem"]
    _read_fails(mnt / "app" / "h.txt")
    assert (mnt / "app").is_dir() and sorted(p.name for p in (mnt / "app").iterdir()) == sorted(files)


def test_an_honest_side_index_passes_and_the_fill_reads_each_layer_once(registry, rich, mounts, tmp_path):
    _index(registry, rich)
    before = len(registry.log())
    mnt, _ = mounts.mount(f"{registry.host}/app:1", cache=tmp_path / "c1")
    st = wait_until(lambda: (s := mounts.status(mnt))["layers"]["state"] == "verified" and s, 60,
                    "the layer check passing", detail=lambda: mounts.status(mnt)["layers"])
    st = mounts.wait_complete(mnt)
    assert st["layers"]["checked_layers"] == st["layers"]["layers_to_check"] >= 2
    index = _side_index(tmp_path / "c1")
    for blob in {c.blob for c in index.all_chunks()}:  # one whole GET each, no span fetched again
        assert _layer_reads(registry, blob.digest, before) == [blob.size]
    assert treecompare.compare_tree(mnt, rich.expected) == []
    assert "layers    verified" in lazyfs("status", str(mnt)).stdout
    mounts.unmount_all()
    # strict, in a cache of its own: reads wait for the check, then get the image's bytes
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", "--verify-layers", name="strict",
                          cache=tmp_path / "c2")
    assert treecompare.compare_tree(mnt, rich.expected) == []
    st = mounts.status(mnt)["layers"]
    assert st["state"] == "verified" and st["strict"] and not st["recorded"]
    mounts.unmount_all()
    # the node's verdict stands for its next mount: no layer is read again to check it
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", "--verify-layers", name="again",
                          cache=tmp_path / "c2")
    assert mounts.status(mnt)["layers"] == {**st, "recorded": True, "checked_layers": 0, "layers_to_check": 0}
