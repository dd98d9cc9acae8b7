"""The test images are what every other layer is judged against, so they are tested too:
the tar bytes are what we claim (format, determinism, PAX records), the checker is proven on
a real filesystem, and the checker is shown to fail when it must."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import extract, imagegen, treecompare

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, chroot)")


@pytest.fixture
def xdir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on a filesystem with user xattrs (tmpfs may refuse them)."""
    try:
        os.setxattr(tmp_path, "user.probe", b"1")
    except OSError:
        d = Path(tempfile.mkdtemp(prefix="lazyfs-imagegen-", dir="/var/tmp"))
        yield d
        shutil.rmtree(d)
    else:
        os.removexattr(tmp_path, "user.probe")
        yield tmp_path


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> imagegen.RichImage:
    return imagegen.build_rich_image(tmp_path_factory.mktemp("rich") / "rich.tar")


@pytest.fixture
def rich_tree(rich: imagegen.RichImage, xdir: Path) -> Path:
    dest = xdir / "root"
    extract.materialize(rich, dest)
    return dest


# ---------------------------------------------------------------- the rich image's bytes


def test_rich_image_is_deterministic(tmp_path: Path) -> None:
    a = imagegen.build_rich_image(tmp_path / "a.tar")
    b = imagegen.build_rich_image(tmp_path / "b.tar")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.expected == b.expected


def test_rich_image_is_a_classic_docker_archive(rich: imagegen.RichImage) -> None:
    with tarfile.open(rich.path) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert len(manifest) == 1 and manifest[0]["RepoTags"] == ["rich:1"]
        config_bytes = outer.extractfile(manifest[0]["Config"]).read()  # type: ignore[union-attr]
        assert manifest[0]["Config"] == hashlib.sha256(config_bytes).hexdigest() + ".json"
        config = json.loads(config_bytes)
        layers = [outer.extractfile(n).read() for n in manifest[0]["Layers"]]  # type: ignore[union-attr]
    assert [n.endswith("/layer.tar") for n in manifest[0]["Layers"]] == [True, True]
    assert layers[0][:2] != b"\x1f\x8b" and layers[1][:2] == b"\x1f\x8b"  # layer 2 is gzip
    raw = [layers[0], gzip.decompress(layers[1])]
    assert config["rootfs"] == {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in raw]}


def _layer_members(rich: imagegen.RichImage, index: int) -> dict[bytes, tarfile.TarInfo]:
    with tarfile.open(rich.path) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        blob = outer.extractfile(manifest[0]["Layers"][index])
        with tarfile.open(fileobj=blob, mode="r:*", encoding="utf-8",
                          errors="surrogateescape") as tf:
            return {m.name.encode("utf-8", "surrogateescape"): m for m in tf.getmembers()}


def test_rich_layer_records(rich: imagegen.RichImage) -> None:
    l1, l2 = _layer_members(rich, 0), _layer_members(rich, 1)
    assert l1[b"data/nanotime.txt"].pax_headers["mtime"] == "1700000000.123456789"
    caps = l1[b"bin/caps-tool"].pax_headers["SCHILY.xattr.security.capability"]
    assert caps.encode("utf-8", "surrogateescape") == imagegen.CAP_NET_BIND_SERVICE_EP
    assert b"names/caf\xe9.txt" in l1
    assert len(max(l1, key=len).rpartition(b"/")[2]) == 255
    assert l1[b"hl/pair_b"].islnk() and l1[b"hl/pair_b"].linkname == "hl/pair_a"
    assert l1[b"dev/null"].ischr() and (l1[b"dev/null"].devmajor, l1[b"dev/null"].devminor) \
        == (1, 3)
    assert b"data/.wh.gone.txt" in l2 and b"opq/.wh..wh..opq" in l2
    names = list(l1)
    assert names == sorted(names, key=lambda p: p.split(b"/"))


def test_rich_expected_covers_the_cases(rich: imagegen.RichImage) -> None:
    e = rich.expected
    kinds = {x.kind for x in e.values()}
    assert kinds == {"file", "dir", "symlink", "chr", "blk", "fifo"}
    assert b"data/gone.txt" not in e and b"gonedir" not in e and b"hl/lonely_a" not in e
    assert b"opq/old.txt" not in e and b"opq/olddir" not in e and b"opq/new.txt" in e
    assert not any(p.rpartition(b"/")[2].startswith(b".wh.") for p in e)
    assert e[b"data"].mtime_ns == imagegen.L2_MTIME_NS  # dir metadata from the top layer
    assert e[b"data/replaced.txt"].sha256 == hashlib.sha256(
        b"new content from layer 2, longer than before\n").hexdigest()
    assert e[b"hl/pair_a"].link_group == e[b"hl/pair_b"].link_group is not None
    assert e[b"hl/tri_3"].nlink == 3
    assert e[b"hl/lonely_b"].nlink == 1 and e[b"hl/lonely_b"].link_group is None
    assert e[b"dirs/sticky"].mode == stat.S_IFDIR | 0o1777
    assert e[b"bin/setuid-tool"].mode == stat.S_IFREG | 0o4755
    assert e[b"dev/null"].rdev == os.makedev(1, 3)
    assert e[b"dirs"].nlink == 2 + 4
    assert e[b"data/nanotime.txt"].mtime_ns == 1_700_000_000_123_456_789
    assert {(x.uid, x.gid) for x in e.values()} >= {(0, 0), (1000, 1000), (65534, 65534)}


# ---------------------------------------------------------------- the checker


@needs_root
def test_compare_tree_accepts_the_materialized_image(
        rich: imagegen.RichImage, rich_tree: Path) -> None:
    assert treecompare.compare_tree(rich_tree, rich.expected) == []
    assert os.stat(rich_tree / "bin/setuid-tool").st_mode & stat.S_ISUID


def _one(diffs: list[str], *words: str) -> None:
    assert diffs, "the checker did not notice"
    assert any(all(w in d for w in words) for d in diffs), diffs


@needs_root
def test_compare_tree_notices_differences(rich: imagegen.RichImage, rich_tree: Path) -> None:
    e = rich.expected
    compare = treecompare.compare_tree

    # one byte of content, size unchanged
    p = rich_tree / "data/random.bin"
    with open(p, "r+b") as f:
        f.seek(3 * 2**20)
        b = f.read(1)
        f.seek(3 * 2**20)
        f.write(bytes([b[0] ^ 1]))
    os.utime(p, ns=(e[b"data/random.bin"].mtime_ns,) * 2)
    _one(compare(rich_tree, e), "data/random.bin", "sha256")
    assert len(compare(rich_tree, e)) == 1
    assert compare(rich_tree, treecompare.replace_expected(e, b"data/random.bin", sha256=None)) \
        == []

    # a mode, an owner, an mtime, a symlink, an xattr, a removed file, an extra file
    os.chmod(rich_tree / "bin/setuid-tool", 0o755)
    _one(compare(rich_tree, e), "bin/setuid-tool", "st_mode")
    os.lchown(rich_tree / "data/small.txt", 1000, 1001)
    _one(compare(rich_tree, e), "data/small.txt", "st_gid")
    os.utime(rich_tree / "data/nanotime.txt", ns=(0, imagegen.NANO_MTIME_NS - 1))
    _one(compare(rich_tree, e), "data/nanotime.txt", "st_mtime_ns")
    os.unlink(rich_tree / "links/rel")
    os.symlink("../data/small.txtx", rich_tree / "links/rel")
    _one(compare(rich_tree, e), "links/rel", "target")
    os.setxattr(rich_tree / "data/xattrs.txt", "user.foo", b"baz")
    _one(compare(rich_tree, e), "data/xattrs.txt", "user.foo")
    os.removexattr(rich_tree / "bin/caps-tool", "security.capability")
    _one(compare(rich_tree, e), "bin/caps-tool", "security.capability", "missing")
    os.setxattr(rich_tree / "data/empty", "user.new", b"x")
    _one(compare(rich_tree, e), "data/empty", "unexpected xattr")
    os.unlink(rich_tree / "names/caf\udce9.txt")
    _one(compare(rich_tree, e), "names/caf\\xe9.txt", "missing")
    (rich_tree / "data/gone.txt").write_bytes(b"back")
    _one(compare(rich_tree, e), "data/gone.txt", "unexpected")


@needs_root
def test_compare_tree_checks_inodes_and_devices(
        rich: imagegen.RichImage, rich_tree: Path) -> None:
    e = rich.expected
    # a hard link broken into two files: contents equal, inodes differ, nlink drops
    b = rich_tree / "hl/pair_b"
    data = b.read_bytes()
    b.unlink()
    b.write_bytes(data)
    os.chown(b, 1000, 1000)
    os.chmod(b, 0o640)
    os.utime(b, ns=(e[b"hl/pair_b"].mtime_ns,) * 2)
    diffs = treecompare.compare_tree(rich_tree, e)
    _one(diffs, "hard-link group", "different inodes")
    _one(diffs, "hl/pair_a", "st_nlink")
    # two distinct files that are secretly one inode
    (rich_tree / "data/root.txt").unlink()
    os.link(rich_tree / "data/nobody.txt", rich_tree / "data/root.txt")
    _one(treecompare.compare_tree(rich_tree, e), "share an inode", "data/root.txt")
    # a device with the wrong numbers, a fifo turned into a file
    os.unlink(rich_tree / "dev/null")
    os.mknod(rich_tree / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.utime(rich_tree / "dev/null", ns=(e[b"dev/null"].mtime_ns,) * 2)
    _one(treecompare.compare_tree(rich_tree, e), "dev/null", "st_rdev")
    os.unlink(rich_tree / "dev/fifo")
    (rich_tree / "dev/fifo").touch()
    _one(treecompare.compare_tree(rich_tree, e), "dev/fifo", "st_mode", "fifo")


@needs_root
def test_directory_nlink_is_optional(rich: imagegen.RichImage, rich_tree: Path) -> None:
    (rich_tree / "dirs/sticky/newdir").mkdir()
    e = dict(rich.expected)
    diffs = treecompare.compare_tree(rich_tree, e)
    _one(diffs, "dirs/sticky", "st_nlink")
    _one(diffs, "dirs/sticky/newdir", "unexpected dir")
    e = treecompare.replace_expected(e, b"dirs/sticky", nlink=None)
    assert [d for d in treecompare.compare_tree(rich_tree, e) if "nlink" in d] == []


# ---------------------------------------------------------------- other images


def test_many_files_image(tmp_path: Path) -> None:
    out = imagegen.build_many_files_image(tmp_path / "many.tar", n=50_000)
    names = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True,
                           check=True).stdout.splitlines()  # GNU tar accepts our headers
    assert sum(1 for n in names if "/f" in n) == 50_000
    assert len([n for n in names if n.count("/") == 2 and n.endswith("/")]) == 500
    assert out.stat().st_size % tarfile.RECORDSIZE == 0


@needs_root
def test_many_files_expected_matches(tmp_path: Path) -> None:
    out = imagegen.build_many_files_image(tmp_path / "many.tar", n=1050, per_dir=100)
    extract.materialize(out, tmp_path / "root")
    expected = imagegen.many_files_expected(1050, per_dir=100)
    assert len(expected) == 1 + 11 + 1050
    assert treecompare.compare_tree(tmp_path / "root", expected) == []


@needs_root
@pytest.mark.slow
def test_big_sparse_image(tmp_path: Path, xdir: Path) -> None:
    img = imagegen.build_big_sparse_image(tmp_path / "big.tar")
    assert img.path.stat().st_size < 64 * 1024
    with tarfile.open(img.path) as tf:
        m = tf.getmember("sparse/big.img")
        assert m.size == imagegen.BIG_SPARSE_SIZE and m.sparse
    dest = xdir / "big"
    extract.materialize(img, dest)
    big = dest / "sparse/big.img"
    assert big.stat().st_blocks * 512 < 2**20  # holes stayed holes
    # hashes the 5 GiB file, which pins BIG_SPARSE_SHA256 (big_sparse_sha256 recomputes it)
    assert treecompare.compare_tree(dest, img.expected) == []


@pytest.fixture(scope="session")
def python_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imagegen.build_python_image(tmp_path_factory.mktemp("py") / "python.tar",
                                       cache_dir=_python_cache())


def _python_cache() -> Path:
    return Path(os.environ.get("LAZYFS_IMAGEGEN_CACHE", "/var/tmp/lazyfs-imagegen-cache"))


def test_python_image_is_deterministic_and_cached(python_image: Path, tmp_path: Path) -> None:
    fresh = imagegen.build_python_image(tmp_path / "fresh.tar")  # no cache: really built
    assert fresh.read_bytes() == python_image.read_bytes()
    again = imagegen.build_python_image(tmp_path / "again.tar", cache_dir=_python_cache())
    assert again.read_bytes() == python_image.read_bytes()


@needs_root
def test_python_rootfs_dir(tmp_path: Path) -> None:
    root = imagegen.build_python_rootfs_dir(tmp_path / "r", cache_dir=_python_cache())
    assert os.path.islink(root / "usr/bin/python3")
    assert (root / "bin/sh").exists()


@needs_root
def test_python_image_runs_in_a_chroot(python_image: Path, xdir: Path) -> None:
    root = xdir / "pyroot"
    extract.materialize(python_image, root)
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    res = subprocess.run(
        [chroot, str(root), "/usr/bin/python3", "-c",
         'import json, sqlite3, ssl; print(json.dumps("hello"), sqlite3.sqlite_version)'],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith('"hello" 3.')
    res = subprocess.run([chroot, str(root), "/bin/sh", "-c", "echo from sh"],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout == "from sh\n", res.stderr


@needs_root
@pytest.mark.slow
def test_python_image_with_pyc_uses_them(tmp_path: Path) -> None:
    img = imagegen.build_python_image(tmp_path / "pyc.tar", cache_dir=_python_cache(),
                                      with_pyc=True)
    root = tmp_path / "root"
    extract.materialize(img, root)
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    # -v logs "code object from '<pyc>'" only when a module was loaded from its .pyc
    res = subprocess.run(
        [chroot, str(root), "/usr/bin/python3", "-B", "-v", "-c", "import json, sqlite3, ssl"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "code object from '" in res.stderr
    assert [line for line in res.stderr.splitlines()
            if "code object from '" in line and "/json/__pycache__/__init__." in line]
