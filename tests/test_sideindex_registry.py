"""An ordinary gzip image in a real registry (Debian's docker-registry, fed by skopeo):
``lazyfs index`` attaches a side index, ``lazyfs mount`` starts the unmodified image
lazily through it, file for file as docker would unpack it; an altered span is EIO and
never cached; an image without a side index is one line and exit 3."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blockindex.format import CODEC_GZIP_SPAN, MEDIA_TYPE_SIDE_INDEX
from blockindex.reader import IndexReader
from testkit import imagegen, treecompare
from testkit.registryd import Registry, needs_registry

from .conftest import lazyfs

pytestmark = [needs_registry, pytest.mark.mount]


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    return imagegen.build_rich_image(tmp_path_factory.mktemp("siderich") / "rich.tar")


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path)
    yield r
    r.stop()


def _index(registry: Registry, rich) -> str:
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    done = lazyfs("index", f"docker://{registry.host}/app:1", "--chunk-size", "64K", "--spacing", "64K")
    assert "side index sha256:" in done.stdout
    return done.stdout


def _side_index(cache: Path) -> IndexReader:
    [path] = (cache / "indexes").iterdir()
    return IndexReader(path)


def _blob_file(registry: Registry, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return registry.dir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


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
    blob = _blob_file(registry, chunk.blob.digest)
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
