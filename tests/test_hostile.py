"""Hostile images end to end: devices, bombs, sparse files, lying sizes, duplicates,
malformed JSON, and an index whose digest matches but whose content is hostile."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from blockindex.checks import CHECK_RULES
from blockindex.convert import convert
from blockindex.errors import ImageError
from blockindex.format import InodeT
from blockindex.oci import Layout, canonical_json
from blockindex.reader import IndexReader
from cache.images import ImageStore
from lazyfs.serve import make_server

from .conftest import ROOT, lazyfs
from .imagekit import Image, d, entry, make_tar, oci_layout
from .test_fuzz_tar import no_hang, sandbox

CS = 4096


def _convert_tar(tmp: Path, data: bytes) -> Image:
    (tmp / "l.tar").write_bytes(data)
    res = convert(f"tar:{tmp / 'l.tar'}", f"oci:{tmp / 'out'}", chunk_size=CS)
    return Image(tmp / "out", res.index_digest)


def _special_files(top: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                out.append(Path(dirpath, name))
    return out


# -- devices and fifos ------------------------------------------------------------------------


def _device_layer() -> bytes:
    return make_tar([
        d("dev"), entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
        entry("run/fifo", type=tarfile.FIFOTYPE, mode=0o600),
        # Absolute names: never created on the host, only kept in the index.
        entry("/tmp/lazyfs-hostile-dev", type=tarfile.CHRTYPE, devmajor=1, devminor=1),
    ])


def test_devices_and_fifos_are_metadata_and_nothing_is_created_on_the_host():
    before = os.path.lexists("/tmp/lazyfs-hostile-dev")
    with sandbox() as (src, out):
        img = _convert_tar(src, _device_layer())
        assert _special_files(src.parent) == []
        null, sda, fifo = img.path("dev/null"), img.path("dev/sda"), img.path("run/fifo")
        assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0)
        assert stat.S_ISFIFO(fifo.mode) and fifo.rdev == 0
    assert os.path.lexists("/tmp/lazyfs-hostile-dev") == before


@pytest.mark.mount
def test_devices_show_in_the_mount_with_their_numbers(tmp_path, mounts):
    (tmp_path / "l.tar").write_bytes(_device_layer())
    convert(f"tar:{tmp_path / 'l.tar'}", f"oci:{tmp_path / 'images' / 'dev'}:1")
    server = make_server(tmp_path / "images", "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/dev:1", "--no-prefetch")
        st = os.lstat(mnt / "dev" / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(os.lstat(mnt / "dev" / "sda").st_mode)
        assert os.lstat(mnt / "dev" / "sda").st_rdev == os.makedev(8, 0)
        assert stat.S_ISFIFO(os.lstat(mnt / "run" / "fifo").st_mode)
        with pytest.raises(OSError):  # the mount is nodev: the device cannot be opened
            os.open(mnt / "dev" / "null", os.O_RDONLY)
    finally:
        server.close()


# -- bombs and sparse files -----------------------------------------------------------------


def _gzip_bomb(path: Path, size: int) -> None:
    """A layer of one file of ``size`` zero bytes, gzip-compressed, written in pieces."""
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    block = bytes(1 << 20)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9,
                                                mtime=0) as gz:
        gz.write(ti.tobuf(tarfile.PAX_FORMAT))
        left = size
        while left:
            gz.write(block[: min(left, len(block))])
            left -= min(left, len(block))
        gz.write(bytes(-size % 512 + 1024))


def _disk_use(top: Path) -> int:
    return sum(os.lstat(os.path.join(p, n)).st_blocks * 512
               for p, _ds, fs in os.walk(top) for n in fs)


_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs a command as its child and prints the child's peak RSS in KiB. Between the test
and the command, because a process's ``ru_maxrss`` counts the memory of the one that
started it (``exec`` keeps the high-water mark of the image it replaces): this small
process's, not the test runner's."""


def _run_measured(argv: list[str]) -> tuple[int, int, str]:
    """Run a command; its exit code, its own peak RSS in bytes, its stderr."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=ROOT, capture_output=True,
                          text=True)
    return done.returncode, int(done.stdout.split()[-1]) * 1024, done.stderr


def test_gzip_bomb_converts_into_holes_with_bounded_disk_and_memory(tmp_path):
    """1 GiB of zeros in about 1 MiB of gzip (LAZYFS_BOMB_GIB scales it): every chunk is
    zeros, so the output stores nothing and memory holds one list entry per chunk."""
    size = int(float(os.environ.get("LAZYFS_BOMB_GIB", "1")) * (1 << 30))
    bomb = tmp_path / "bomb.tar.gz"
    _gzip_bomb(bomb, size)
    assert bomb.stat().st_size < size // 500
    with no_hang(600):
        code, rss, err = _run_measured([sys.executable, "-m", "lazyfs", "convert", f"tar:{bomb}",
                                        f"oci:{tmp_path / 'out'}"])
    assert code == 0, err
    assert _disk_use(tmp_path / "out") < 1 << 20
    assert rss < 400 << 20, f"peak RSS {rss >> 20} MiB for a {size >> 20} MiB bomb"
    layout = Layout(tmp_path / "out")
    manifest = json.loads(layout.read_blob(layout.resolve("latest")["digest"]))
    img = Image(tmp_path / "out", manifest["layers"][0]["digest"])
    node = img.path("zeros")
    assert node.size == size
    assert img.r.totals()["chunks"] == 0
    assert all(s.chunk is None for s in img.r.chunks(node.ino, size - 10, 10))


def _sparse_member(name: str, realsize: int, segments: list[tuple[int, bytes]]) -> bytes:
    """A PAX 1.0 GNU sparse member, as ``tar --sparse --format=posix`` writes it: the map
    (count, then offset and length of each data segment) heads the member's data."""
    lines = [str(len(segments))] + [f"{off}\n{len(data)}" for off, data in segments]
    head = ("\n".join(lines) + "\n").encode()
    head += bytes(-len(head) % 512)
    body = head + b"".join(data for _, data in segments)
    ti = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    ti.size = len(body)
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                      "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(body))
    return buf.getvalue()


def test_sparse_file_claiming_a_terabyte_is_converted_from_its_map(tmp_path):
    size = 1 << 40
    data = os.urandom(5000)
    tar = _sparse_member("big", size, [(1 << 30, data), (size - 3, b"end")])
    with no_hang(300):
        img = _convert_tar(tmp_path, tar)
    node = img.path("big")
    assert node.size == size
    assert img.read_range("big", (1 << 30) - 10, 5020) == bytes(10) + data + bytes(10)
    assert img.read_range("big", size - 3, 3) == b"end"
    assert img.read_range("big", 1 << 35, 100) == bytes(100)
    assert img.r.totals()["chunks"] == 3  # the data spans two chunks; the end is one
    (tmp_path / "more").mkdir()
    with pytest.raises(ImageError, match="absurd size"):
        _convert_tar(tmp_path / "more", _sparse_member("big", size + 1, [(0, b"x")]))


# -- headers that lie, duplicates -------------------------------------------------------------


def test_size_that_lies_is_refused_as_truncated(tmp_path):
    ti = tarfile.TarInfo("f")
    ti.size = 100_000
    raw = ti.tobuf(tarfile.PAX_FORMAT) + b"only this much" + bytes(512 - 14)
    for data in (raw, raw + bytes(1024), gzip.compress(raw, mtime=0)):
        with pytest.raises(ImageError, match="corrupt or truncated"):
            _convert_tar(tmp_path, data)


def test_duplicate_entries_the_later_one_wins(tmp_path):
    lower = make_tar([
        entry("f", b"first"), entry("f", b"second"),               # twice in one layer
        d("x", mode=0o700), entry("x/kept", b"k"), d("x", mode=0o755),  # dir over dir
        entry("y", b"file"), d("y"), entry("y/in", b"i"),          # a dir replaces a file
        d("z"), entry("z/gone", b"g"), entry("z", b"now a file"),  # a file replaces a dir
    ])
    upper = make_tar([entry("f", b"third"), d("x", mode=0o711)])
    lay, mdesc = oci_layout(tmp_path / "src", [lower, upper])
    lay.tag(mdesc, "latest")
    res = convert(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'out'}", chunk_size=CS)
    img = Image(tmp_path / "out", res.index_digest)
    assert img.read("f") == b"third"
    assert img.path("x").mode == stat.S_IFDIR | 0o711 and img.names("x") == [b"kept"]
    assert img.names("y") == [b"in"]
    assert img.read("z") == b"now a file"
    assert img.names() == [b"f", b"x", b"y", b"z"]


# -- malformed JSON in an OCI layout source ------------------------------------------------------


def _layout_cases() -> dict[str, object]:
    return {
        "index.json not JSON": b"{nope",
        "index.json nested too deep": b"[" * 100_000 + b"]" * 100_000,
        "manifests not a list": {"manifests": "abc"},
        "a manifest entry not an object": {"manifests": [1, "x"]},
        "manifest not JSON": ("manifest", b"{bad"),
        "manifest nested too deep": ("manifest", b"[" * 100_000 + b"]" * 100_000),
        "layers not objects": ("manifest", {"config": {}, "layers": [1]}),
        "annotations not an object": ("manifest", {"annotations": ["x"], "config": {},
                                                   "layers": []}),
        "platform not an object": ("manifest", {"manifests": [{"platform": "x", "digest": "a"},
                                                              {"platform": 5}]}),
    }


@pytest.mark.parametrize("case", sorted(_layout_cases()))
def test_malformed_layout_json_is_one_line_and_exit_3(tmp_path, case):
    value = _layout_cases()[case]
    lay, mdesc = oci_layout(tmp_path / "src", [make_tar([entry("f", b"x")])])
    if isinstance(value, tuple):
        body = value[1] if isinstance(value[1], bytes) else json.dumps(value[1]).encode()
        desc = lay.write_blob(body, "application/vnd.oci.image.manifest.v1+json")
        (tmp_path / "src" / "index.json").write_text(json.dumps({"manifests": [desc]}))
    else:
        body = value if isinstance(value, bytes) else json.dumps(value).encode()
        (tmp_path / "src" / "index.json").write_bytes(body)
    done = lazyfs("convert", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'out'}", check=False)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("lazyfs: error:") and done.stderr.count("\n") == 1, done.stderr


# -- what a mount fetches ---------------------------------------------------------------------


def _retag(layout: Layout, manifest: dict, tag: str = "1") -> None:
    desc = layout.write_blob(canonical_json(manifest), "application/vnd.oci.image.manifest.v1+json")
    layout.tag(desc, tag)


def _hostile_index(layout: Layout, tag: str, sql: str) -> str:
    """Replace the image's index with one changed by ``sql``, signed as its own: the
    manifest names the new index's digest and size, as a hostile author would. Returns
    that digest."""
    manifest = json.loads(layout.read_blob(layout.resolve(tag)["digest"]))
    old = layout.blob_path(manifest["layers"][0]["digest"])
    work = layout.root.parent / "work.sqlite"
    shutil.copy(old, work)
    db = sqlite3.connect(work)
    db.execute(sql)
    db.commit()
    db.close()
    desc = layout.write_blob(work.read_bytes(), manifest["layers"][0]["mediaType"])
    manifest["layers"][0] = desc
    _retag(layout, manifest, tag)
    return desc["digest"]


@pytest.mark.mount
@pytest.mark.parametrize("sql", [
    "UPDATE dirents SET name = x'2e2e' WHERE rowid IN (SELECT rowid FROM dirents LIMIT 1)",
    "INSERT INTO dirents VALUES (1, 999, x'6c6f6f70', 1)",
    "UPDATE chunks SET offset = 1 << 40 WHERE id = 1",
    "UPDATE blobs SET digest = 'sha256:../../../../etc/passwd' WHERE id = 1",
    f"UPDATE dirents SET pos = {(1 << 63) - 1} WHERE pos = 0",
    "DROP INDEX dirents_by_name",
], ids=["dotdot-name", "root-in-itself", "chunk-outside-blob", "blob-digest-path",
        "position-beyond-off_t", "no-name-index"])
def test_signed_hostile_index_is_refused_by_the_mount(served, mounts, sql):
    _image, root, server = served
    _hostile_index(Layout(root / "rich"), "1", sql.replace("rowid IN (SELECT rowid FROM "
                                                           "dirents LIMIT 1)", "pos = 0"))
    mnt, done = mounts.mount(f"127.0.0.1:{server.port}/rich:1", check=False)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("lazyfs: error:") and done.stderr.count("\n") == 1, done.stderr
    assert "index" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.ismount(mnt)
    assert list((mounts.tmp / "cache" / "checked").iterdir()) == []  # never marked as good


# The last entry of the first directory below the root with two or more: its successor
# position, 2**63, is no off_t (pyfuse3.readdir_reply raised OverflowError).
_LAST_AT_2_63 = (
    f"UPDATE dirents SET pos = {(1 << 63) - 1} WHERE (parent, pos) = (SELECT parent, max(pos) "
    "FROM dirents WHERE parent = (SELECT parent FROM dirents WHERE parent != 1 GROUP BY parent "
    "HAVING count(*) > 1 ORDER BY parent LIMIT 1))")


@pytest.mark.mount
def test_an_index_checked_under_older_rules_is_checked_again(served, mounts):
    _image, root, server = served
    digest = _hostile_index(Layout(root / "rich"), "1", _LAST_AT_2_63)
    # what a node that checked this index before positions were bounded has kept
    (mounts.tmp / "cache").mkdir(mode=0o700)  # a cache, as lazyfs makes it (private)
    (mounts.tmp / "cache" / "checked").mkdir()
    (mounts.tmp / "cache" / "checked" / digest.removeprefix("sha256:")).write_bytes(b"")
    mnt, done = mounts.mount(f"127.0.0.1:{server.port}/rich:1", check=False)
    assert done.returncode == 3, done.stderr
    assert "bad position" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.mount
def test_a_failing_request_is_eio_and_the_mount_serves_on(served, mounts):
    """The same index mounted with the check skipped (a node marked it checked under the
    current rules, so the check has a gap): listing that directory answers EIO, logged
    once with a traceback, and the mount serves everything else."""
    image, root, server = served
    layout = Layout(root / "rich")
    digest = _hostile_index(layout, "1", _LAST_AT_2_63)
    reader = IndexReader(layout.blob_path(digest))
    (parent,) = reader._one(f"SELECT parent FROM dirents WHERE pos = {(1 << 63) - 1}")
    bad = reader.path_of(InodeT(parent)).decode().lstrip("/")
    reader.close()
    ImageStore(mounts.tmp / "cache").mark_index_checked(digest, CHECK_RULES)
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--no-prefetch")
    for _ in range(2):
        with pytest.raises(OSError) as info:
            os.listdir(mnt / bad)
        assert info.value.errno == errno.EIO
    files = sorted(p for p, e in image.expected.items() if e.kind == "file" and e.size < 1 << 20
                   and not p.startswith(bad.encode() + b"/"))[:20]
    assert files
    for p in files:
        with open(os.path.join(os.fsencode(mnt), p), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == image.expected[p].sha256
    assert sorted(os.listdir(os.fsencode(mnt))) == sorted({p.split(b"/")[0] for p in image.expected})
    assert os.path.ismount(mnt)
    log = (mounts.tmp / "mnt.log").read_text()
    assert "readdir failed (EIO)" in log and log.count("Traceback") == 1, log


@pytest.mark.mount
def test_an_index_is_checked_once_per_node(served, mounts):
    _image, root, server = served
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--no-prefetch")
    layout = Layout(root / "rich")
    index_hex = json.loads(layout.read_blob(layout.resolve("1")["digest"]))["layers"][0][
        "digest"].removeprefix("sha256:")
    assert [p.name for p in (mounts.tmp / "cache" / "checked").iterdir()] == [index_hex]
    assert os.listdir(mnt)


@pytest.mark.mount
@pytest.mark.parametrize("change", ["not-json", "deep", "annotations-list", "layers-str",
                                    "bad-index-digest", "bad-index-size"])
def test_malformed_manifest_is_refused_by_the_mount(served, mounts, change):
    _image, root, server = served
    layout = Layout(root / "rich")
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    if change in ("not-json", "deep"):
        body = b"{nope" if change == "not-json" else b"[" * 100_000 + b"]" * 100_000
        layout.tag(layout.write_blob(body, "application/vnd.oci.image.manifest.v1+json"), "1")
    else:
        if change == "annotations-list":
            manifest["annotations"] = ["io.lazyfs.image"]
        elif change == "layers-str":
            manifest["layers"] = "abc"
        elif change == "bad-index-digest":
            manifest["layers"][0]["digest"] = "sha256:../../etc/passwd"
        else:
            manifest["layers"][0]["size"] = "big"
        _retag(layout, manifest)
    mnt, done = mounts.mount(f"127.0.0.1:{server.port}/rich:1", check=False)
    assert done.returncode in (3, 4), done.stderr
    assert done.stderr.startswith("lazyfs: error:") and done.stderr.count("\n") == 1, done.stderr
    assert not os.path.ismount(mnt)


# -- many entries -----------------------------------------------------------------------------

PER_ENTRY_LIMIT = 1536  # bytes of peak RSS per entry; measured about 900 (README, convert)


def _write_many(path: Path, n: int, per_dir: int = 1000) -> None:
    """A layer of ``n`` entries: directories of ``per_dir`` small files with contents of
    their own (one stored chunk each). Headers go straight to the file, since tarfile's
    writer keeps every member in memory."""
    with open(path, "wb") as f:
        made = d = 0
        while made < n:
            ti = tarfile.TarInfo(f"d{d:05d}")
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            f.write(ti.tobuf(tarfile.USTAR_FORMAT))
            made += 1
            for i in range(min(per_dir, n - made)):
                data = b"%d/%d\n" % (d, i)
                ti = tarfile.TarInfo(f"d{d:05d}/f{i:05d}")
                ti.size = len(data)
                f.write(ti.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512))
                made += 1
            d += 1
        f.write(bytes(1024))


def test_many_entries_cost_a_bounded_amount_of_memory_each(tmp_path):
    """Peak RSS of a convert at two sizes (LAZYFS_MANY_ENTRIES sets the larger, e.g.
    1000000): the merged tree stays in memory until the index is written, so memory grows
    with entries; what is bounded, and asserted, is the cost of each one."""
    small, big = 50_000, int(os.environ.get("LAZYFS_MANY_ENTRIES", "150000"))
    rss = {}
    for n in (small, big):
        _write_many(tmp_path / f"{n}.tar", n)
        with no_hang(1800):
            code, rss[n], err = _run_measured([
                sys.executable, "-m", "lazyfs", "convert", f"tar:{tmp_path / f'{n}.tar'}",
                f"oci:{tmp_path / str(n)}"])
        assert code == 0, err
        (tmp_path / f"{n}.tar").unlink()
        layout = Layout(tmp_path / str(n))
        manifest = json.loads(layout.read_blob(layout.resolve("latest")["digest"]))
        img = Image(tmp_path / str(n), manifest["layers"][0]["digest"])
        assert img.r.totals()["inodes"] == n + 1
        img.r.close()
        shutil.rmtree(tmp_path / str(n))
    per_entry = (rss[big] - rss[small]) / (big - small)
    print(f"peak RSS {rss[small] >> 20} MiB for {small} entries, {rss[big] >> 20} MiB for "
          f"{big}: {per_entry:.0f} bytes per entry")
    assert per_entry < PER_ENTRY_LIMIT


def test_an_image_with_more_entries_than_the_limit_is_refused_in_one_line(tmp_path):
    """The merged tree's size is capped (``--max-entries``, a million by default), so that
    memory is bounded whatever an image holds; the limit is the user's to raise."""
    _write_many(tmp_path / "many.tar", 250, per_dir=100)  # 3 directories and 247 files
    done = lazyfs("convert", f"tar:{tmp_path / 'many.tar'}", f"oci:{tmp_path / 'out'}",
                  "--max-entries", "200", check=False)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("lazyfs: error:") and done.stderr.count("\n") == 1, done.stderr
    assert "more than 200 entries" in done.stderr and "--max-entries" in done.stderr
    lazyfs("convert", f"tar:{tmp_path / 'many.tar'}", f"oci:{tmp_path / 'out'}", "--max-entries", "250")
    for bad in ("0", "-5", "lots"):
        done = lazyfs("convert", f"tar:{tmp_path / 'many.tar'}", f"oci:{tmp_path / 'o2'}",
                      "--max-entries", bad, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    # a whited-out name does not give its place back: entries are counted as they come
    with pytest.raises(ImageError, match="more than 2 entries"):
        from blockindex.tree import Tree, new_dir

        tree = Tree(max_entries=2)
        tree.add((b"a",), new_dir())
        tree.begin_layer(1)
        tree.whiteout((b".wh.a",))
        assert tree.get((b"a",)) is None
        tree.add((b"b",), new_dir())
        tree.add((b"c",), new_dir())
