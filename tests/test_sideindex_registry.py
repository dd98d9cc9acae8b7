"""An ordinary gzip image in a real registry (Debian's docker-registry, fed by skopeo):
``lazyfs index`` attaches a side index, ``lazyfs mount`` starts the unmodified image
lazily through it, file for file as docker would unpack it; an altered span is EIO and
never cached; the files of one span are fetched with it once, and a neighbour altered in
the registry fails only itself; an image without a side index is one line and exit 3."""

from __future__ import annotations

import errno
import gzip
import json
import random
import re
from pathlib import Path

import pytest

from blockindex.format import CODEC_GZIP_SPAN, MEDIA_TYPE_SIDE_INDEX
from blockindex.oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Layout, sha256_digest
from blockindex.reader import IndexReader
from testkit import imagegen, treecompare
from testkit.registryd import Registry, needs_registry
from testkit.tarwriter import Entry, write_tar

from .conftest import lazyfs

pytestmark = [needs_registry, pytest.mark.mount]


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    return imagegen.build_rich_image(tmp_path_factory.mktemp("siderich") / "rich.tar")


def _index(registry: Registry, rich) -> str:
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    done = lazyfs("index", f"docker://{registry.host}/app:1", "--chunk-size", "64K", "--spacing", "64K")
    assert "side index sha256:" in done.stdout
    return done.stdout


def _side_index(cache: Path) -> IndexReader:
    [path] = (cache / "indexes").iterdir()
    return IndexReader(path)


def test_indexed_image_mounts_lazily_as_it_is(registry, rich, mounts):
    _index(registry, rich)
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch")
    assert treecompare.compare_tree(mnt, rich.expected) == []
    index = _side_index(mounts.tmp / "cache")
    index.check()
    assert index.meta["format"] == "3"
    # the layers are gzip: big files span several checkpoints, read from the layers themselves
    layers = {b.digest for b in index.blobs()}
    spans = [c for c in index.all_chunks() if c.codec == CODEC_GZIP_SPAN]
    assert spans and {c.blob.digest for c in spans} <= layers
    (points,) = index._one("SELECT count(*) FROM checkpoints")
    assert points > 2 * len(layers)


def test_image_without_a_side_index_is_one_line_and_exit_3(registry, rich, mounts):
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    mnt, done = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", check=False)
    assert done.returncode == 3, done.stderr
    assert "has no side index" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert MEDIA_TYPE_SIDE_INDEX not in done.stderr


def test_an_altered_span_is_eio_and_not_cached(registry, rich, mounts, tmp_path):
    _index(registry, rich)
    # learn where data/random.bin's third chunk lies from the side index (a first mount)
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", name="first", cache=tmp_path / "c1")
    index = _side_index(tmp_path / "c1")
    ino = index.lookup(index.lookup(1, b"data").ino, b"random.bin").ino
    chunk = index.chunks_of(ino)[2]
    assert chunk.codec == CODEC_GZIP_SPAN
    mounts.unmount_all()
    blob = registry.blob_file(chunk.blob.digest)
    data = bytearray(blob.read_bytes())
    # random bytes are stored blocks: this byte is the chunk's own (past its checkpoint's
    # window of output, inside its range), so it comes out wrong rather than not at all
    data[chunk.offset + chunk.stored_size // 2] ^= 0x55
    blob.write_bytes(data)
    mnt, _ = mounts.mount(f"{registry.host}/app:1", "--no-prefetch", name="second", cache=tmp_path / "c2")
    with pytest.raises(OSError) as e:
        (mnt / "data" / "random.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "data" / "small.txt").read_bytes() == b"hello lazyfs\n"
    cached = tmp_path / "c2" / "chunks" / chunk.hexdigest[:2] / chunk.hexdigest
    assert not cached.exists()
    assert mounts.status(mnt)["fetch"]["integrity_failures"] >= 1


def _small_files_image(registry: Registry, tmp: Path) -> dict[str, bytes]:
    """Push a one-layer gzip image of small files side by side in one directory (text, then
    random bytes: deflate's stored blocks, whose bytes come out wrong rather than not at
    all when altered), a few hundred KiB: one span at the default spacing. From an OCI
    layout, so that skopeo pushes the layer as Python's gzip wrote it."""
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefgh") for _ in range(6)) for _ in range(300)]
    files = {f"f{i:02d}.txt": b" ".join(rng.choice(words) for _ in range(3000)) for i in range(8)}
    files["g.bin"] = rng.randbytes(40_000)
    files["h.txt"] = b"after the random bytes\n" * 500
    entries = [Entry(path=b"app", kind="dir", perm=0o755)]
    entries += [Entry(path=f"app/{n}".encode(), kind="file", perm=0o644, data=d) for n, d in files.items()]
    tar = write_tar(entries)
    layout = Layout(tmp / "small")
    layout.init()
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]}}
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": layout.write_blob(json.dumps(config).encode(), MEDIA_TYPE_OCI_CONFIG),
                "layers": [layout.write_blob(gzip.compress(tar, mtime=0),
                                             "application/vnd.oci.image.layer.v1.tar+gzip")]}
    layout.tag(layout.write_blob(json.dumps(manifest).encode(), MEDIA_TYPE_OCI_MANIFEST), "1")
    registry.skopeo_copy(f"oci:{layout.root}:1", "small:1")
    lazyfs("index", f"docker://{registry.host}/small:1", "--chunk-size", "64K")
    return files


def _layer_reads(registry: Registry, layer: str, since: int) -> list[int]:
    """The bytes of each GET of the blob ``layer`` the registry answered since log offset
    ``since``."""
    log = registry.log()[since:]
    return [int(m[1]) for m in re.finditer(rf'"GET \S+/blobs/{layer} HTTP/[\d.]+" 20\d (\d+)', log)]


def test_the_files_of_one_span_are_fetched_with_it_once(registry, mounts, tmp_path):
    files = _small_files_image(registry, tmp_path)
    before = len(registry.log())
    mnt, _ = mounts.mount(f"{registry.host}/small:1", "--no-prefetch")
    [layer] = {c.blob.digest for c in _side_index(mounts.tmp / "cache").all_chunks()}
    assert (mnt / "app" / "f03.txt").read_bytes() == files["f03.txt"]
    first = _layer_reads(registry, layer, before)
    assert len(first) == 1
    # its neighbours after and before it in the span, read later, come from the node cache
    for name in ("f04.txt", "h.txt", "f00.txt"):
        assert (mnt / "app" / name).read_bytes() == files[name]
    assert _layer_reads(registry, layer, before) == first
    st = mounts.status(mnt)
    assert st["fetch"]["requests"] == 1 and st["fetch"]["integrity_failures"] == 0


def test_a_neighbour_altered_in_the_registry_fails_only_itself(registry, mounts, tmp_path):
    files = _small_files_image(registry, tmp_path)
    mnt, _ = mounts.mount(f"{registry.host}/small:1", "--no-prefetch", name="first", cache=tmp_path / "c1")
    index = _side_index(tmp_path / "c1")
    app = index.lookup(1, b"app").ino
    [bad] = index.chunks_of(index.lookup(app, b"g.bin").ino)
    mounts.unmount_all()
    blob = registry.blob_file(bad.blob.digest)
    data = bytearray(blob.read_bytes())
    at = data.index(files["g.bin"][20_000:20_032])  # a stored byte of g.bin, in the blob
    data[at] ^= 0x55
    blob.write_bytes(data)
    before = len(registry.log())
    mnt, _ = mounts.mount(f"{registry.host}/small:1", "--no-prefetch", name="second", cache=tmp_path / "c2")
    # the span's one fetch brings every good file of it; the bad one is fetched again when read
    assert (mnt / "app" / "f01.txt").read_bytes() == files["f01.txt"]
    assert (mnt / "app" / "h.txt").read_bytes() == files["h.txt"]
    assert len(_layer_reads(registry, bad.blob.digest, before)) == 1
    with pytest.raises(OSError) as e:
        (mnt / "app" / "g.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "app" / "f07.txt").read_bytes() == files["f07.txt"]
    assert not (tmp_path / "c2" / "chunks" / bad.hexdigest[:2] / bad.hexdigest).exists()
    assert mounts.status(mnt)["fetch"]["integrity_failures"] >= 1
