"""The test and demo images: each builder writes an image and, where a mount of it is
checked, returns the tree it must show (``RichImage.expected``).

Everything here is deterministic (fixed mtimes, sorted entries, seeded pseudo-random data), so
the same call writes the same bytes on every machine and the digests are stable.

  build_rich_image(out)          docker-archive, two layers (second gzip-compressed), covering
                                 every file type, odd metadata, xattrs, whiteouts, opaque dirs.
  build_big_sparse_image(out)    rootfs tar (GNU tar, PAX sparse 1.0) with a 5 GiB file that is
                                 almost all holes; the tar is about 20 KiB.
  build_python_image(out)        docker-archive with this machine's python3, its libraries and
                                 stdlib, and /bin/sh: a real program to start from a mount.
  build_many_files_image(out)    rootfs tar with n small files, for metadata-walk benchmarks.

How they are written: ``tarwriter.py``; what a mount must show: ``treecompare.py``
(``Expected``, ``compare_tree``), from ``layermerge.py``'s merge of the entries;
``extract.py`` puts an image on a real filesystem, the reference both are checked against.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import extract, hostpython
from .layermerge import OPAQUE_MARKER, merge
from .tarwriter import L1_MTIME_NS, NS, Entry, ustar_header, write_docker_archive, write_tar
from .treecompare import Expected

#: mtime of layer 2 entries, so a converter that takes a directory's metadata from the wrong
#: layer is caught.
L2_MTIME_NS = 1_700_100_000 * NS
#: the nanosecond mtime the brief asks for; does not fit a float.
NANO_MTIME_NS = 1_700_000_000 * NS + 123_456_789

#: struct vfs_cap_data (VFS_CAP_REVISION_2, little endian) for cap_net_bind_service+ep:
#: magic_etc = 0x02000000 | VFS_CAP_FLAGS_EFFECTIVE(1); data[0].permitted = 1 << 10
#: (CAP_NET_BIND_SERVICE); data[0].inheritable = 0; data[1] = {0, 0}. 4 + 2 * 8 = 20 bytes.
#: Checked against `setcap cap_net_bind_service+ep`, which writes exactly these bytes.
CAP_NET_BIND_SERVICE_EP = (
    (0x02000001).to_bytes(4, "little")
    + (1 << 10).to_bytes(4, "little") + (0).to_bytes(4, "little")
    + (0).to_bytes(4, "little") + (0).to_bytes(4, "little")
)
assert CAP_NET_BIND_SERVICE_EP == b"\x01\x00\x00\x02\x00\x04" + b"\x00" * 14


@dataclass(frozen=True, kw_only=True)
class RichImage:
    """A generated image and the tree a correct mount of it shows.

    path: the image file.
    format: 'docker-archive' or 'rootfs-tar'.
    expected: merged tree, keyed by path relative to the root without a leading slash
      (b'data/small.txt'). The root itself is not listed: the images do not set its metadata.
    """

    path: Path
    format: str
    expected: dict[bytes, Expected]


# --------------------------------------------------------------------------------------------
# The rich image


def rich_layers() -> list[list[Entry]]:
    rng = random.Random(20231114)
    random_bin = rng.randbytes(5 * 2**20 + 123)  # incompressible, not chunk aligned
    shared_bin = rng.randbytes(3 * 2**19 + 7)  # 1.5 MiB, identical in both layers
    compressible = b"".join(b"line %08d: the quick brown fox jumps over the lazy dog\n" % i
                            for i in range(100_000))  # about 6 MiB
    middle = rng.randbytes(64 * 1024)
    sparse_ish = bytearray(4 * 2**20)
    sparse_ish[2 * 2**20 + 4097: 2 * 2**20 + 4097 + len(middle)] = middle

    F, D = "file", "dir"
    L1 = L1_MTIME_NS

    def e(path: bytes, kind: str, perm: int, **kw: object) -> Entry:
        return Entry(path=path, kind=kind, perm=perm, **kw)  # type: ignore[arg-type]

    layer1 = [
        e(b"bin", D, 0o755),
        e(b"bin/caps-tool", F, 0o755, data=b"#!/bin/sh\necho caps\n",
          xattrs={b"security.capability": CAP_NET_BIND_SERVICE_EP}),
        e(b"bin/setuid-tool", F, 0o4755, data=b"#!/bin/sh\necho suid\n"),
        e(b"bin/setgid-tool", F, 0o2755, gid=50, data=b"#!/bin/sh\necho sgid\n"),
        e(b"data", D, 0o755, mtime_ns=L1 + 1 * NS),
        e(b"data/empty", F, 0o644),
        e(b"data/small.txt", F, 0o644, uid=1000, gid=1000, data=b"hello lazyfs\n"),
        e(b"data/random.bin", F, 0o644, data=random_bin),
        e(b"data/compressible.txt", F, 0o644, data=compressible),
        e(b"data/sparse-ish.bin", F, 0o600, data=bytes(sparse_ish)),
        e(b"data/nanotime.txt", F, 0o644, mtime_ns=NANO_MTIME_NS, data=b"ns mtime\n"),
        e(b"data/xattrs.txt", F, 0o644, data=b"has xattrs\n",
          xattrs={b"user.foo": b"bar", b"user.binary": b"\x00\xff\xfe\x01 not utf-8",
                  b"user.empty": b""}),
        e(b"data/nobody.txt", F, 0o444, uid=65534, gid=65534, data=b"nobody\n"),
        e(b"data/root.txt", F, 0o400, uid=0, gid=0, data=b"root only\n"),
        e(b"data/replaced.txt", F, 0o644, data=b"old content from layer 1\n"),
        e(b"data/shared.bin", F, 0o644, data=shared_bin),
        e(b"data/gone.txt", F, 0o644, data=b"deleted by layer 2\n"),
        e(b"dev", D, 0o755),
        e(b"dev/null", "chr", 0o666, rdev=(1, 3)),
        e(b"dev/loop0", "blk", 0o660, gid=6, rdev=(7, 0)),
        e(b"dev/fifo", "fifo", 0o644),
        e(b"dirs", D, 0o755),
        e(b"dirs/a", D, 0o755),
        e(b"dirs/a/b", D, 0o700, uid=1000, gid=1000),
        e(b"dirs/a/b/c", D, 0o755, mtime_ns=L1 + 7),
        e(b"dirs/a/b/c/deep.txt", F, 0o644, data=b"deep\n"),
        e(b"dirs/sticky", D, 0o1777),
        e(b"dirs/setgid", D, 0o2775, gid=1000),
        e(b"dirs/setgid/inside.txt", F, 0o664, gid=1000, data=b"inside setgid\n"),
        e(b"dirs/xattr-dir", D, 0o755, xattrs={b"user.dirattr": b"on a directory"}),
        e(b"gonedir", D, 0o755),
        e(b"gonedir/sub", D, 0o755),
        e(b"gonedir/sub/file.txt", F, 0o644, data=b"whole directory whited out\n"),
        e(b"hl", D, 0o755),
        e(b"hl/pair_a", F, 0o640, uid=1000, gid=1000, data=b"one inode, two names\n"),
        e(b"hl/pair_b", "hardlink", 0o640, uid=1000, gid=1000, target=b"hl/pair_a"),
        e(b"hl/tri_1", F, 0o755, data=b"one inode, three names\n",
          xattrs={b"user.linked": b"yes"}),
        e(b"hl/tri_2", "hardlink", 0o755, target=b"hl/tri_1"),
        e(b"hl/tri_3", "hardlink", 0o755, target=b"hl/tri_1"),
        e(b"hl/lonely_a", F, 0o644, data=b"partner is whited out in layer 2\n"),
        e(b"hl/lonely_b", "hardlink", 0o644, target=b"hl/lonely_a"),
        e(b"links", D, 0o755),
        e(b"links/rel", "symlink", 0o777, target=b"../data/small.txt"),
        e(b"links/abs", "symlink", 0o777, target=b"/data/small.txt"),
        e(b"links/dangling", "symlink", 0o777, target=b"../does/not/exist"),
        e(b"links/to-dir", "symlink", 0o777, target=b"../dirs/a"),
        e(b"links/long", "symlink", 0o777, target=b"/" + b"long-target/" * 15 + b"end"),
        e(b"links/owned", "symlink", 0o777, uid=1000, gid=1000, target=b"rel"),
        e(b"names", D, 0o755),
        e(b"names/caf\xe9.txt", F, 0o644, data=b"latin-1 name\n"),
        e(b"names/" + b"n" * 251 + b".txt", F, 0o644, data=b"255-byte name\n"),
        e(b"names/\xc3\xbcnic\xc3\xb6de \xe2\x9c\x93.txt", F, 0o644, data=b"utf-8 name\n"),
        e(b"names/sp ace & 'quote\".txt", F, 0o644, data=b"shell hostile name\n"),
        e(b"opq", D, 0o755),
        e(b"opq/old.txt", F, 0o644, data=b"hidden by the opaque marker\n"),
        e(b"opq/olddir", D, 0o755),
        e(b"opq/olddir/old2.txt", F, 0o644, data=b"also hidden\n"),
    ]
    L2 = L2_MTIME_NS
    layer2 = [
        e(b".wh.gonedir", F, 0o600, mtime_ns=L2),
        e(b"data", D, 0o775, mtime_ns=L2),  # metadata must come from this layer
        e(b"data/.wh.gone.txt", F, 0o600, mtime_ns=L2),
        e(b"data/replaced.txt", F, 0o600, uid=1000, gid=1000, mtime_ns=L2 + 5,
          data=b"new content from layer 2, longer than before\n"),
        e(b"data/shared.bin", F, 0o644, mtime_ns=L2, data=shared_bin),
        e(b"data/new.txt", F, 0o644, mtime_ns=L2, data=b"added by layer 2\n"),
        e(b"hl", D, 0o755, mtime_ns=L2),
        e(b"hl/.wh.lonely_a", F, 0o600, mtime_ns=L2),
        e(b"opq", D, 0o750, mtime_ns=L2),
        e(b"opq/" + OPAQUE_MARKER, F, 0o600, mtime_ns=L2),
        e(b"opq/new.txt", F, 0o644, mtime_ns=L2, data=b"survives the opaque marker\n"),
    ]
    return [layer1, layer2]


def build_rich_image(out: Path) -> RichImage:
    """Write the two-layer docker-archive covering every case the converter and mount must
    handle (layer 2 gzip-compressed) and return it with the merged tree it must produce."""
    out = Path(out)
    layers = rich_layers()
    tars = [write_tar(layer) for layer in layers]
    write_docker_archive(out, tars, gzip_layers={1}, repo_tag="rich:1")
    return RichImage(path=out, format="docker-archive", expected=merge(layers))


# --------------------------------------------------------------------------------------------
# The big sparse image

#: 5 GiB, over every 32-bit size limit.
BIG_SPARSE_SIZE = 5 * 2**30
BIG_SPARSE_SECOND_OFFSET = 9 * 2**29  # 4.5 GiB
#: sha256 of sparse/big.img; computing it means hashing 5 GiB, so it is pinned here and
#: re-checked by a slow test.
BIG_SPARSE_SHA256 = "0f53d96540af84632559d691c5cc2eb9cf0ca58dc54c39f20f4984f4122ef0cd"


def _big_sparse_pieces() -> list[tuple[int, bytes]]:
    rng = random.Random(5)
    return [(0, rng.randbytes(4096 + 100)), (BIG_SPARSE_SECOND_OFFSET, rng.randbytes(3000))]


def build_big_sparse_image(out: Path) -> RichImage:
    """Write a rootfs tar holding sparse/big.img: 5 GiB of zeros except 4196 bytes at offset 0
    and 3000 bytes at 4.5 GiB. Python's tarfile cannot write sparse members, so the file is
    made sparse on disk (truncate) and archived by GNU tar as PAX sparse format 1.0
    (GNU.sparse.major=1, minor=0; tarfile and Go's archive/tar read it). The tar is about
    20 KiB; the file materialized on disk takes a few KiB (holes)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        d = Path(tmp) / "sparse"
        d.mkdir()
        big = d / "big.img"
        with open(big, "wb") as f:
            f.truncate(BIG_SPARSE_SIZE)
            for off, data in _big_sparse_pieces():
                f.seek(off)
                f.write(data)
        os.chmod(big, 0o644)
        os.chmod(d, 0o755)
        for p in (big, d):
            os.utime(p, ns=(L1_MTIME_NS, L1_MTIME_NS))
        subprocess.run(
            ["tar", "--create", "--file", str(out), "--directory", tmp, "--format=pax",
             "--sparse", "--sparse-version=1.0", "--sort=name", "--numeric-owner",
             "--owner=0", "--group=0",
             "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
             "sparse"], check=True)
    expected = {
        b"sparse": Expected(kind="dir", mode=stat.S_IFDIR | 0o755, uid=0, gid=0, size=0,
                            mtime_ns=L1_MTIME_NS, nlink=2),
        b"sparse/big.img": Expected(kind="file", mode=stat.S_IFREG | 0o644, uid=0, gid=0,
                                    size=BIG_SPARSE_SIZE, mtime_ns=L1_MTIME_NS, nlink=1,
                                    sha256=BIG_SPARSE_SHA256),
    }
    return RichImage(path=out, format="rootfs-tar", expected=expected)


def big_sparse_sha256() -> str:
    """Compute what BIG_SPARSE_SHA256 pins (hashes 5 GiB: seconds)."""
    h = hashlib.sha256()
    pos = 0
    zeros = bytes(2**20)
    for off, data in [*_big_sparse_pieces(), (BIG_SPARSE_SIZE, b"")]:
        while pos < off:
            n = min(len(zeros), off - pos)
            h.update(zeros[:n] if n < len(zeros) else zeros)
            pos += n
        h.update(data)
        pos += len(data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Many small files


def build_many_files_image(out: Path, n: int = 50000, per_dir: int = 100) -> Path:
    """Write a rootfs tar with n small files, per_dir to a directory (many/dNNNN/fNNNNNN),
    for metadata-walk benchmarks. 1 KiB of tar per file (51 MB for 50,000), under a second."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    mtime = L1_MTIME_NS // NS
    with open(tmp, "wb") as f:
        f.write(ustar_header("many/", size=0, mode=0o755, mtime=mtime, typeflag=b"5"))
        for i in range(n):
            if i % per_dir == 0:
                f.write(ustar_header(f"many/d{i // per_dir:04d}/", size=0, mode=0o755,
                                     mtime=mtime, typeflag=b"5"))
            data = b"file %d\n" % i
            f.write(ustar_header(f"many/d{i // per_dir:04d}/f{i:06d}", size=len(data),
                                 mode=0o644, mtime=mtime, typeflag=b"0"))
            f.write(data.ljust(512, b"\0"))
        f.write(b"\0" * 1024)  # end-of-archive marker
        f.write(b"\0" * (-f.tell() % tarfile.RECORDSIZE))  # whole records, as tar writes
    os.replace(tmp, out)
    return out


def many_files_expected(n: int = 50000, per_dir: int = 100) -> dict[bytes, Expected]:
    """The tree build_many_files_image(out, n, per_dir) must mount as."""
    mt = L1_MTIME_NS
    ndirs = -(-n // per_dir)
    out = {b"many": Expected(kind="dir", mode=stat.S_IFDIR | 0o755, uid=0, gid=0, size=0,
                             mtime_ns=mt, nlink=2 + ndirs)}
    for d in range(ndirs):
        out[b"many/d%04d" % d] = Expected(kind="dir", mode=stat.S_IFDIR | 0o755, uid=0, gid=0,
                                          size=0, mtime_ns=mt, nlink=2)
    for i in range(n):
        data = b"file %d\n" % i
        out[b"many/d%04d/f%06d" % (i // per_dir, i)] = Expected(
            kind="file", mode=stat.S_IFREG | 0o644, uid=0, gid=0, size=len(data), mtime_ns=mt,
            nlink=1, sha256=hashlib.sha256(data).hexdigest())
    return out


# --------------------------------------------------------------------------------------------
# The python image


def build_python_image(out: Path, cache_dir: Path | None = None, *,
                       with_pyc: bool = False) -> Path:
    """Write a two-layer docker-archive ('python:1') holding this machine's python3 with its
    shared libraries, dynamic loader, stdlib (without tests, idlelib, tkinter, __pycache__)
    and lib-dynload, /bin/sh with its libraries, and a minimal /etc/passwd. Layer 1 holds the
    libraries and sh, layer 2 python. Host files keep their absolute paths and merged-/usr
    symlinks. With cache_dir, a previous result for unchanged inputs (paths, sizes, mtimes)
    is copied instead of rebuilt. with_pyc adds unchecked-hash __pycache__/*.pyc as real
    images have (without them every start on a read-only mount recompiles what it imports);
    it adds about 10 MB and a few seconds to a cold build."""
    out = Path(out)
    layers, synthetic = hostpython.python_layers()
    cached: Path | None = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = hostpython.python_cache_key(layers, synthetic) + ("-pyc" if with_pyc else "")
        cached = cache_dir / f"python-image-{key}.tar"
        if cached.exists():
            shutil.copyfile(cached, out)
            return out
    if with_pyc:
        hostpython.add_pycs(layers[1], synthetic)
    tars = [hostpython.host_layer_tar(layer, synthetic) for layer in layers]
    write_docker_archive(out, tars, gzip_layers=set(), repo_tag="python:1")
    if cached is not None:
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
        shutil.copyfile(out, tmp)
        os.replace(tmp, cached)
    return out


def build_python_rootfs_dir(dest: Path, cache_dir: Path | None = None) -> Path:
    """Materialize the python image into dest (needs root): a directory to chroot into."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        img = build_python_image(Path(tmp) / "python.tar", cache_dir=cache_dir)
        extract.extract_docker_archive(img, dest)
    return dest
