"""Test and demo images for lazyfs, and the checker that compares a mounted tree with them.

Everything here is deterministic (fixed mtimes, sorted entries, seeded pseudo-random data), so
the same call writes the same bytes on every machine and the digests are stable.

Images
  build_rich_image(out)          docker-archive, two layers (second gzip-compressed), covering
                                 every file type, odd metadata, xattrs, whiteouts, opaque dirs.
  build_big_sparse_image(out)    rootfs tar (GNU tar, PAX sparse 1.0) with a 5 GiB file that is
                                 almost all holes; the tar is about 20 KiB.
  build_python_image(out)        docker-archive with this machine's python3, its libraries and
                                 stdlib, and /bin/sh: a real program to start from a mount.
  build_many_files_image(out)    rootfs tar with n small files, for metadata-walk benchmarks.

Checking
  Expected                       what one path of the merged tree must look like.
  compare_tree(root, expected)   walks a real directory (a mount) and lists every difference.
  materialize(image, dest)       extracts an image with whiteout semantics onto a real
                                 filesystem (needs root), so compare_tree can be proven and a
                                 program can be run with chroot without lazyfs at all.

Tar details a converter must honour (all produced here on purpose):
  - nanosecond mtimes live only in the PAX ``mtime`` record ("1700000000.123456789");
    tarfile's ``TarInfo.mtime`` is a float and loses them: parse ``pax_headers["mtime"]``
    (see ``pax_time_ns``);
  - xattrs are PAX ``SCHILY.xattr.<name>`` records; values are raw bytes, tarfile hands them
    back as str decoded with surrogateescape (``value.encode("utf-8", "surrogateescape")``);
  - a file name that is not UTF-8 is written with ``hdrcharset=BINARY``;
  - layer 2 of the rich image is gzip-compressed although it is called ``layer.tar``, as
    ``docker load`` accepts: detect compression from the magic bytes, not the name.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BIG_SPARSE_SIZE",
    "Expected",
    "RichImage",
    "build_big_sparse_image",
    "build_many_files_image",
    "build_python_image",
    "build_python_rootfs_dir",
    "many_files_expected",
    "build_rich_image",
    "compare_tree",
    "extract_docker_archive",
    "extract_rootfs_tar",
    "materialize",
    "pax_time_ns",
    "sha256_file",
]

NS = 1_000_000_000
#: mtime of everything in layer 1 unless said otherwise (2023-11-14T22:13:20Z).
L1_MTIME_NS = 1_700_000_000 * NS
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

#: xattrs compare_tree looks at; anything else (selinux labels, ACLs, ...) is the kernel's.
_COMPARED_XATTR_PREFIXES = (b"user.",)
_COMPARED_XATTR_NAMES = (b"security.capability",)

_KIND_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


@dataclass(frozen=True, kw_only=True)
class Expected:
    """What one path of the merged tree must look like (the fields of ``os.lstat`` and more).

    kind: 'file', 'dir', 'symlink', 'chr', 'blk' or 'fifo'. Hard-linked files are 'file'
      with the same ``link_group``.
    mode: the full st_mode, type bits included (``stat.S_IFREG | 0o4755``).
    size: st_size; ignored for directories (filesystem dependent), len(target) for symlinks.
    mtime_ns: st_mtime_ns.
    nlink: st_nlink, or None to not check it. Files: number of names of the inode in the
      merged tree; directories: 2 + number of subdirectories (what ext4 and tmpfs report).
    rdev: st_rdev for 'chr' and 'blk' (``os.makedev(major, minor)``), else 0.
    target: the symlink target, bytes, for 'symlink'.
    sha256: hex digest of the content, for 'file'.
    xattrs: every ``user.*`` and ``security.capability`` attribute, name -> value.
    link_group: files sharing a group id must share st_ino; files outside it must not.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int | None
    rdev: int = 0
    target: bytes | None = None
    sha256: str | None = None
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)
    link_group: str | None = None


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
# The model: layer entries, written to tar and merged into Expected by independent code paths.


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """One tar entry to write. kind adds 'hardlink' (target = path of the linked file)."""

    path: bytes
    kind: str
    perm: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = L1_MTIME_NS
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)


def _path_key(path: bytes) -> list[bytes]:
    return path.split(b"/")


def _pax_time(ns: int) -> str:
    secs, frac = divmod(ns, NS)
    return f"{secs}.{frac:09d}" if frac else str(secs)


def pax_time_ns(value: str) -> int:
    """Parse a PAX time record ("1700000000.123456789") to integer nanoseconds, exactly."""
    whole, _, frac = value.partition(".")
    if whole.startswith("-"):
        raise ValueError(f"negative PAX time not supported: {value!r}")
    return int(whole) * NS + int((frac + "000000000")[:9] or "0")


def _tarinfo(e: _Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.path.decode("utf-8", "surrogateescape"))
    ti.mode = e.perm
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = e.mtime_ns // NS
    if e.mtime_ns % NS:
        ti.pax_headers["mtime"] = _pax_time(e.mtime_ns)
    for name, value in e.xattrs.items():
        key = "SCHILY.xattr." + name.decode("utf-8", "surrogateescape")
        ti.pax_headers[key] = value.decode("utf-8", "surrogateescape")
    if e.kind == "file":
        ti.type, ti.size = tarfile.REGTYPE, len(e.data)
    elif e.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        ti.type, ti.linkname = tarfile.SYMTYPE, e.target.decode("utf-8", "surrogateescape")
    elif e.kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, e.target.decode("utf-8", "surrogateescape")
    elif e.kind in ("chr", "blk"):
        ti.type = tarfile.CHRTYPE if e.kind == "chr" else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = e.rdev
    elif e.kind == "fifo":
        ti.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"unknown entry kind {e.kind!r}")
    return ti


def _write_tar(entries: Iterable[_Entry]) -> bytes:
    """A PAX tar of entries, sorted so that parents come before children."""
    ordered = sorted(entries, key=lambda e: _path_key(e.path))
    seen: set[bytes] = set()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for e in ordered:
            if e.kind == "hardlink" and e.target not in seen:
                raise ValueError(f"hard link {e.path!r} precedes its target {e.target!r}")
            seen.add(e.path)
            ti = _tarinfo(e)
            tf.addfile(ti, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def _merge(layers: list[list[_Entry]]) -> dict[bytes, Expected]:
    """Apply layers in order with OCI whiteout rules and return the merged tree."""
    tree: dict[bytes, _Entry] = {}
    root_of: dict[bytes, _Entry] = {}  # hard link name -> the regular entry holding its data

    def drop(path: bytes, *, keep_self: bool = False) -> None:
        prefix = path + b"/" if path else b""
        for p in [p for p in tree if p.startswith(prefix) or (p == path and not keep_self)]:
            del tree[p]
            root_of.pop(p, None)

    for layer in layers:
        for e in layer:  # whiteouts only hide what lower layers put there
            parent, _, base = e.path.rpartition(b"/")
            if base == OPAQUE_MARKER:
                drop(parent, keep_self=True)
            elif base.startswith(WHITEOUT_PREFIX):
                drop((parent + b"/" if parent else b"") + base[len(WHITEOUT_PREFIX):])
        by_path = {e.path: e for e in layer}
        for e in layer:
            if e.path.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX):
                continue
            old = tree.get(e.path)
            if old is not None and not (old.kind == "dir" and e.kind == "dir"):
                drop(e.path)
            tree[e.path] = e
            root_of.pop(e.path, None)
            if e.kind == "hardlink":
                tgt = by_path.get(e.target)
                if tgt is None or tgt.kind != "file":
                    raise ValueError(f"hard link {e.path!r} must point at a file in its layer")
                root_of[e.path] = tgt

    data_of = {p: root_of.get(p, e) for p, e in tree.items() if e.kind in ("file", "hardlink")}
    names_of: dict[int, list[bytes]] = {}
    for p, e in data_of.items():
        names_of.setdefault(id(e), []).append(p)
    subdirs: dict[bytes, int] = {}
    for p, e in tree.items():
        if e.kind == "dir":
            subdirs[p.rpartition(b"/")[0]] = subdirs.get(p.rpartition(b"/")[0], 0) + 1

    out: dict[bytes, Expected] = {}
    for p, e in tree.items():
        if p in data_of:
            d = data_of[p]
            names = sorted(names_of[id(d)])
            out[p] = Expected(
                kind="file", mode=stat.S_IFREG | d.perm, uid=d.uid, gid=d.gid,
                size=len(d.data), mtime_ns=d.mtime_ns, nlink=len(names),
                sha256=hashlib.sha256(d.data).hexdigest(), xattrs=dict(d.xattrs),
                link_group=names[0].decode("utf-8", "surrogateescape") if len(names) > 1
                else None)
            continue
        out[p] = Expected(
            kind=e.kind, mode=_KIND_BITS[e.kind] | e.perm, uid=e.uid, gid=e.gid,
            size=len(e.target) if e.kind == "symlink" else 0, mtime_ns=e.mtime_ns,
            nlink=2 + subdirs.get(p, 0) if e.kind == "dir" else 1,
            rdev=os.makedev(*e.rdev) if e.kind in ("chr", "blk") else 0,
            target=e.target if e.kind == "symlink" else None, xattrs=dict(e.xattrs))
    return out


# --------------------------------------------------------------------------------------------
# docker-archive writing


def _write_docker_archive(out: Path, layer_tars: list[bytes], *, gzip_layers: set[int],
                          repo_tag: str, created: str = "2023-11-14T22:13:20Z") -> None:
    """Write the classic `docker save` layout: <v1id>/{VERSION,json,layer.tar}, <config>.json,
    manifest.json, repositories. Layers in gzip_layers are stored gzip-compressed (mtime 0)."""
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layer_tars]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": f"lazyfs imagegen layer {i + 1}"}
                    for i in range(len(layer_tars))],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"

    members: list[tuple[str, bytes]] = [(config_name, config_bytes)]
    layer_names: list[str] = []
    parent = ""
    for i, layer in enumerate(layer_tars):
        # docker's v1 ids chain the diff ids; any stable unique hex works for a reader.
        v1id = hashlib.sha256((parent + " " + diff_ids[i]).encode()).hexdigest()
        blob = gzip.compress(layer, compresslevel=6, mtime=0) if i in gzip_layers else layer
        v1json = {"id": v1id, "created": created, "os": "linux"}
        if parent:
            v1json["parent"] = parent
        members += [(f"{v1id}/", b""), (f"{v1id}/VERSION", b"1.0"),
                    (f"{v1id}/json", json.dumps(v1json, sort_keys=True).encode()),
                    (f"{v1id}/layer.tar", blob)]
        layer_names.append(f"{v1id}/layer.tar")
        parent = v1id
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    repo, _, tag = repo_tag.rpartition(":")
    members.append(("manifest.json", json.dumps(manifest).encode()))
    members.append(("repositories", json.dumps({repo: {tag: parent}}).encode()))

    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime = L1_MTIME_NS // NS
            if name.endswith("/"):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)


# --------------------------------------------------------------------------------------------
# 1. The rich image


def _rich_layers() -> list[list[_Entry]]:
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

    def e(path: bytes, kind: str, perm: int, **kw: object) -> _Entry:
        return _Entry(path=path, kind=kind, perm=perm, **kw)  # type: ignore[arg-type]

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
    layers = _rich_layers()
    tars = [_write_tar(layer) for layer in layers]
    _write_docker_archive(out, tars, gzip_layers={1}, repo_tag="rich:1")
    return RichImage(path=out, format="docker-archive", expected=_merge(layers))


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
# 4. Many small files


def _ustar_header(name: str, *, size: int, mode: int, mtime: int, typeflag: bytes) -> bytes:
    """One POSIX ustar header block for a short ASCII name, uid/gid 0 (what tarfile writes,
    ten times faster: tarfile's TarInfo.tobuf dominates generating 50,000 entries)."""
    def octal(value: int, width: int) -> bytes:
        return b"%0*o\0" % (width - 1, value)

    hdr = b"".join([
        name.encode("ascii").ljust(100, b"\0"), octal(mode, 8), octal(0, 8), octal(0, 8),
        octal(size, 12), octal(mtime, 12), b" " * 8, typeflag, b"\0" * 100,
        b"ustar\x0000", b"\0" * 32, b"\0" * 32, octal(0, 8), octal(0, 8), b"\0" * 155,
        b"\0" * 12])
    checksum = b"%06o\0 " % sum(hdr)
    return hdr[:148] + checksum + hdr[156:]


def build_many_files_image(out: Path, n: int = 50000, per_dir: int = 100) -> Path:
    """Write a rootfs tar with n small files, per_dir to a directory (many/dNNNN/fNNNNNN),
    for metadata-walk benchmarks. 1 KiB of tar per file (51 MB for 50,000), under a second."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    mtime = L1_MTIME_NS // NS
    with open(tmp, "wb") as f:
        f.write(_ustar_header("many/", size=0, mode=0o755, mtime=mtime, typeflag=b"5"))
        for i in range(n):
            if i % per_dir == 0:
                f.write(_ustar_header(f"many/d{i // per_dir:04d}/", size=0, mode=0o755,
                                      mtime=mtime, typeflag=b"5"))
            data = b"file %d\n" % i
            f.write(_ustar_header(f"many/d{i // per_dir:04d}/f{i:06d}", size=len(data),
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
# 3. The python image


@dataclass(frozen=True)
class _HostEntry:
    kind: str  # 'file', 'dir', 'symlink'
    perm: int
    target: str = ""  # symlink target


def _add_host_path(path: str, out: dict[str, _HostEntry]) -> None:
    """Add path, every directory above it and every symlink on the way (reproduced as
    symlinks, then followed), so the same absolute path resolves the same way in the image."""
    parts = [p for p in os.path.normpath(path).split("/") if p]
    cur = ""
    for i, part in enumerate(parts):
        cur = f"{cur}/{part}"
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(cur)
            out[cur] = _HostEntry("symlink", 0o777, target)
            rest = parts[i + 1:]
            nxt = os.path.normpath(os.path.join(os.path.dirname(cur), target, *rest))
            _add_host_path(nxt, out)
            return
        if stat.S_ISDIR(st.st_mode):
            if cur not in out:
                out[cur] = _HostEntry("dir", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode) and i == len(parts) - 1:
            out[cur] = _HostEntry("file", stat.S_IMODE(st.st_mode))
        else:
            raise ValueError(f"cannot put {cur} in an image (mode {st.st_mode:o})")


def _find_python() -> str:
    """The python3 to ship: Debian's /usr/bin/python3 when it is a real ELF, else ours."""
    for cand in ("/usr/bin/python3", sys.executable):
        real = os.path.realpath(cand)
        try:
            with open(real, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return cand
        except OSError:
            continue
    raise RuntimeError("no python3 ELF binary found")


_STDLIB_SKIP_DIRS = {"__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo",
                     "site-packages", "dist-packages"}
_DYNLOAD_SKIP_PREFIXES = ("_test", "_xxtest", "xxlimited", "_ctypes_test")


def _ldd(paths: list[str]) -> set[str]:
    """Every shared library (and the dynamic loader) the given ELF files need."""
    res = subprocess.run(["ldd", *paths], capture_output=True, text=True)
    libs: set[str] = set()
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            right = line.split("=>", 1)[1].strip()
            if right.startswith("/"):
                libs.add(right.split(" (", 1)[0])
        elif line.startswith("/") and " (0x" in line:
            libs.add(line.split(" (", 1)[0])
    return libs


_COMPILE_PYC = """
import importlib.util, py_compile, sys
for src in sys.stdin.read().split("\\0"):
    if src:
        try:
            py_compile.compile(src, cfile=sys.argv[1] + importlib.util.cache_from_source(src),
                               dfile=src, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError:
            pass  # e.g. lib2to3 grammar fixtures: the real stdlib ships no pyc for them either
"""


def _add_pycs(layer: dict[str, _HostEntry], synthetic: dict[str, bytes]) -> None:
    """Add unchecked-hash .pyc files for the layer's .py files (valid whatever the mtimes;
    deterministic), compiled by the image's own python so the magic number matches."""
    py = _find_python()
    sources = sorted(p for p, he in layer.items() if he.kind == "file" and p.endswith(".py"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([py, "-S", "-c", _COMPILE_PYC, tmp], input="\0".join(sources),
                       text=True, check=True)
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                host = os.path.join(dirpath, name)
                path = host[len(tmp):]
                synthetic[path] = Path(host).read_bytes()
                parent = os.path.dirname(path)
                layer.setdefault(parent, _HostEntry("dir", 0o755))
                layer[path] = _HostEntry("file", 0o644)


def _python_layers() -> tuple[list[dict[str, _HostEntry]], dict[str, bytes]]:
    """(layer 1 = libraries + sh + /etc, layer 2 = python + stdlib), synthetic files."""
    py = _find_python()
    probe = subprocess.run(
        [py, "-S", "-c", "import os, sys; print(os.path.dirname(os.__file__)); "
         "print(next(p for p in sys.path if p.endswith('lib-dynload')))"],
        capture_output=True, text=True, check=True).stdout.split("\n")
    stdlib, dynload = probe[0], probe[1]

    layer2: dict[str, _HostEntry] = {}
    _add_host_path(py, layer2)
    elves = [os.path.realpath(py)]
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        if dirpath == dynload:
            filenames = [f for f in filenames if not f.startswith(_DYNLOAD_SKIP_PREFIXES)]
        _add_host_path(dirpath, layer2)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            _add_host_path(p, layer2)
            if dirpath == dynload and name.endswith(".so"):
                elves.append(p)

    layer1: dict[str, _HostEntry] = {}
    sh = "/bin/sh"
    _add_host_path(sh, layer1)
    elves.append(os.path.realpath(sh))
    for lib in sorted(_ldd(elves)):
        _add_host_path(lib, layer1)
    synthetic = {
        "/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
                       b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "/etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    }
    for p in synthetic:
        layer1["/etc"] = _HostEntry("dir", 0o755)
        layer1[p] = _HostEntry("file", 0o644)
    layer1["/tmp"] = _HostEntry("dir", 0o1777)
    layer1["/root"] = _HostEntry("dir", 0o700)
    return [layer1, layer2], synthetic


def _host_layer_tar(entries: dict[str, _HostEntry], synthetic: dict[str, bytes]) -> bytes:
    mtime = L1_MTIME_NS // NS
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(entries, key=lambda p: p.split("/")):
            he = entries[path]
            ti = tarfile.TarInfo(path.lstrip("/"))
            ti.mode, ti.mtime = he.perm, mtime
            if he.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif he.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, he.target
                tf.addfile(ti)
            else:
                data = synthetic[path] if path in synthetic else Path(path).read_bytes()
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


_PYTHON_IMAGE_VERSION = "1"


def _python_cache_key(layers: list[dict[str, _HostEntry]], synthetic: dict[str, bytes]) -> str:
    h = hashlib.sha256(_PYTHON_IMAGE_VERSION.encode())
    for layer in layers:
        for path in sorted(layer):
            he = layer[path]
            sig = ""
            if he.kind == "file" and path not in synthetic:
                st = os.stat(path)
                sig = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            h.update(f"{path}\0{he}\0{sig}\n".encode())
        h.update(b"--layer--\n")
    for path in sorted(synthetic):
        h.update(path.encode() + b"\0" + synthetic[path])
    return h.hexdigest()[:32]


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
    layers, synthetic = _python_layers()
    cached: Path | None = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = _python_cache_key(layers, synthetic) + ("-pyc" if with_pyc else "")
        cached = cache_dir / f"python-image-{key}.tar"
        if cached.exists():
            shutil.copyfile(cached, out)
            return out
    if with_pyc:
        _add_pycs(layers[1], synthetic)
    tars = [_host_layer_tar(layer, synthetic) for layer in layers]
    _write_docker_archive(out, tars, gzip_layers=set(), repo_tag="python:1")
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
        extract_docker_archive(img, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Extraction with whiteout semantics (the reference the converter is checked against)


def _member_path(m: tarfile.TarInfo) -> bytes:
    p = m.name.encode("utf-8", "surrogateescape")
    while p.startswith(b"./"):
        p = p[2:]
    p = p.strip(b"/")
    if p in (b"", b".") or b".." in p.split(b"/"):
        raise ValueError(f"refusing tar entry {m.name!r}")
    return p


def _member_mtime_ns(m: tarfile.TarInfo) -> int:
    if "mtime" in m.pax_headers:
        return pax_time_ns(m.pax_headers["mtime"])
    return int(m.mtime) * NS


def _member_xattrs(m: tarfile.TarInfo) -> dict[bytes, bytes]:
    return {k[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape"):
            v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _apply_layer(tf: tarfile.TarFile, root: bytes, dir_times: dict[bytes, int]) -> None:
    members = tf.getmembers()
    for m in members:  # whiteouts first: they only hide what lower layers put there
        rel = _member_path(m)
        parent, _, base = rel.rpartition(b"/")
        pdir = root + b"/" + parent if parent else root
        if base == OPAQUE_MARKER:
            if os.path.isdir(pdir):
                for child in os.listdir(pdir):
                    _remove(pdir + b"/" + child)
                    _forget(dir_times, (parent + b"/" if parent else b"") + child)
        elif base.startswith(WHITEOUT_PREFIX):
            gone = (parent + b"/" if parent else b"") + base[len(WHITEOUT_PREFIX):]
            _remove(root + b"/" + gone)
            _forget(dir_times, gone)
    for m in members:
        rel = _member_path(m)
        if rel.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX):
            continue
        full = root + b"/" + rel
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.lexists(full) and not (m.isdir() and os.path.isdir(full)
                                          and not os.path.islink(full)):
            _remove(full)
            _forget(dir_times, rel)
        if m.islnk():
            os.link(root + b"/" + _member_path_str(m.linkname), full, follow_symlinks=False)
            continue
        if m.isdir():
            if not os.path.isdir(full):
                os.mkdir(full, 0o700)
        elif m.isreg():
            _extract_file(tf, m, full)
        elif m.issym():
            os.symlink(m.linkname.encode("utf-8", "surrogateescape"), full)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(full, 0o600)
        else:
            raise ValueError(f"unsupported tar entry type {m.type!r} for {m.name!r}")
        # order matters: chown clears setuid bits and security.capability
        os.lchown(full, m.uid, m.gid)
        if not m.issym():
            os.chmod(full, m.mode & 0o7777)
        for name, value in _member_xattrs(m).items():
            os.setxattr(full, name, value, follow_symlinks=False)
        mt = _member_mtime_ns(m)
        if m.isdir():
            dir_times[rel] = mt
        else:
            os.utime(full, ns=(mt, mt), follow_symlinks=False)


def _member_path_str(name: str) -> bytes:
    return _member_path(tarfile.TarInfo(name))


def _forget(dir_times: dict[bytes, int], rel: bytes) -> None:
    for p in [p for p in dir_times if p == rel or p.startswith(rel + b"/")]:
        del dir_times[p]


def _extract_file(tf: tarfile.TarFile, m: tarfile.TarInfo, full: bytes) -> None:
    src = tf.extractfile(m)
    assert src is not None
    with src, open(full, "wb") as dst:
        if m.sparse:  # keep holes: a 5 GiB sparse member must not take 5 GiB of disk
            for off, size in m.sparse:
                src.seek(off)
                dst.seek(off)
                dst.write(src.read(size))
            dst.truncate(m.size)
        else:
            shutil.copyfileobj(src, dst, 2**20)


def _finish_dirs(root: bytes, dir_times: dict[bytes, int]) -> None:
    for rel in sorted(dir_times, key=lambda p: -p.count(b"/")):  # children first
        os.utime(root + b"/" + rel, ns=(dir_times[rel], dir_times[rel]), follow_symlinks=False)


def extract_docker_archive(archive: Path, dest: Path) -> None:
    """Apply every layer of a docker-archive onto dest with whiteout semantics (needs root
    for devices and ownership). Layers may be plain or gzip-compressed, whatever their name."""
    root = os.fsencode(dest)
    os.makedirs(root, exist_ok=True)
    dir_times: dict[bytes, int] = {}
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for layer_name in manifest[0]["Layers"]:
            blob = outer.extractfile(layer_name)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r:*", encoding="utf-8",
                              errors="surrogateescape") as tf:
                _apply_layer(tf, root, dir_times)
    _finish_dirs(root, dir_times)


def extract_rootfs_tar(tar: Path, dest: Path) -> None:
    """Extract a single rootfs tar (possibly compressed) onto dest, keeping sparse holes."""
    root = os.fsencode(dest)
    os.makedirs(root, exist_ok=True)
    dir_times: dict[bytes, int] = {}
    with tarfile.open(tar, mode="r:*", encoding="utf-8", errors="surrogateescape") as tf:
        _apply_layer(tf, root, dir_times)
    _finish_dirs(root, dir_times)


def materialize(image: RichImage | Path, dest: Path) -> None:
    """Extract a generated image (docker-archive or rootfs tar) onto a real filesystem.

    dest must support user xattrs and security.capability when the image has them (ext4,
    xfs, btrfs do; tmpfs does not accept user.* on older kernels): use /var/tmp, not /tmp."""
    path = image.path if isinstance(image, RichImage) else Path(image)
    with tarfile.open(path) as tf:
        is_archive = "manifest.json" in tf.getnames()
    if is_archive:
        extract_docker_archive(path, dest)
    else:
        extract_rootfs_tar(path, dest)


# --------------------------------------------------------------------------------------------
# 2. The checker


def sha256_file(path: bytes | str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _kind_of(mode: int) -> str:
    for kind, bits in _KIND_BITS.items():
        if stat.S_IFMT(mode) == bits:
            return kind
    return f"unknown({stat.S_IFMT(mode):o})"


def _compared_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # ENOTSUP and friends: no xattrs at all
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        bname = os.fsencode(name)
        if bname.startswith(_COMPARED_XATTR_PREFIXES) or bname in _COMPARED_XATTR_NAMES:
            out[bname] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _walk(root: bytes) -> dict[bytes, os.stat_result]:
    found: dict[bytes, os.stat_result] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        for name in os.listdir(root + b"/" + rel if rel else root):
            child = rel + b"/" + name if rel else name
            st = os.lstat(root + b"/" + child)
            found[child] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
    return found


def _show(path: bytes) -> str:
    return repr(path)[2:-1] or "/"


def compare_tree(root: Path, expected: Mapping[bytes, Expected]) -> list[str]:
    """Walk the tree at root (with lstat, never following symlinks) and return one readable
    line per difference from expected; an empty list means equal.

    Checked: missing and extra paths; type and permission bits (st_mode), st_uid, st_gid,
    st_size (not for directories), st_mtime_ns, st_nlink (unless Expected.nlink is None),
    st_rdev of devices, symlink targets, user.* and security.capability xattrs, the sha256 of
    every regular file's content, and that hard-link groups share st_ino while all other
    files have their own."""
    rootb = os.fsencode(root)
    diffs: list[str] = []
    actual = _walk(rootb)
    if b"" in expected:
        actual[b""] = os.lstat(rootb)
    for p in sorted(set(expected) - set(actual)):
        diffs.append(f"{_show(p)}: missing")
    for p in sorted(set(actual) - set(expected)):
        diffs.append(f"{_show(p)}: unexpected {_kind_of(actual[p].st_mode)}")

    inode_names: dict[int, list[bytes]] = {}
    for p in sorted(set(expected) & set(actual)):
        exp, st = expected[p], actual[p]
        full = rootb + b"/" + p if p else rootb
        where = _show(p)
        if st.st_mode != exp.mode:
            diffs.append(f"{where}: st_mode {st.st_mode:o} ({_kind_of(st.st_mode)}), "
                         f"expected {exp.mode:o} ({exp.kind})")
        if _kind_of(st.st_mode) != exp.kind:
            continue  # nothing else is comparable
        for fld, want in (("st_uid", exp.uid), ("st_gid", exp.gid),
                          ("st_mtime_ns", exp.mtime_ns)):
            if getattr(st, fld) != want:
                diffs.append(f"{where}: {fld} {getattr(st, fld)}, expected {want}")
        if exp.kind != "dir" and st.st_size != exp.size:
            diffs.append(f"{where}: st_size {st.st_size}, expected {exp.size}")
        if exp.nlink is not None and st.st_nlink != exp.nlink:
            diffs.append(f"{where}: st_nlink {st.st_nlink}, expected {exp.nlink}")
        if exp.kind in ("chr", "blk") and st.st_rdev != exp.rdev:
            diffs.append(f"{where}: st_rdev {os.major(st.st_rdev)},{os.minor(st.st_rdev)}, "
                         f"expected {os.major(exp.rdev)},{os.minor(exp.rdev)}")
        if exp.kind == "symlink":
            target = os.readlink(full)
            if target != exp.target:
                diffs.append(f"{where}: symlink target {target!r}, expected {exp.target!r}")
        got_x = _compared_xattrs(full)
        want_x = dict(exp.xattrs)
        for name in sorted(set(got_x) | set(want_x)):
            if name not in got_x:
                diffs.append(f"{where}: xattr {_show(name)} missing")
            elif name not in want_x:
                diffs.append(f"{where}: unexpected xattr {_show(name)}={got_x[name]!r}")
            elif got_x[name] != want_x[name]:
                diffs.append(f"{where}: xattr {_show(name)}={got_x[name]!r}, "
                             f"expected {want_x[name]!r}")
        if exp.kind == "file":
            inode_names.setdefault(st.st_ino, []).append(p)
            if exp.sha256 is not None:
                try:
                    digest = sha256_file(full)
                except OSError as exc:
                    diffs.append(f"{where}: cannot read: {exc}")
                else:
                    if digest != exp.sha256:
                        diffs.append(f"{where}: content sha256 {digest}, "
                                     f"expected {exp.sha256}")

    # hard links: one group <-> one inode
    group_inodes: dict[str, set[int]] = {}
    for ino, names in inode_names.items():
        for n in names:
            g = expected[n].link_group
            if g is not None:
                group_inodes.setdefault(g, set()).add(ino)
        groups = {expected[n].link_group for n in names}
        if len(names) > 1 and (None in groups or len(groups) > 1):
            diffs.append("share an inode but are not one hard-link group: "
                         + ", ".join(_show(n) for n in names))
    for g, inos in sorted(group_inodes.items()):
        if len(inos) > 1:
            diffs.append(f"hard-link group {g}: members have {len(inos)} different inodes")
    return diffs


def replace_expected(expected: Mapping[bytes, Expected], path: bytes,
                     **changes: object) -> dict[bytes, Expected]:
    """A copy of expected with one entry changed (for tests of the checker)."""
    out = dict(expected)
    out[path] = dataclasses.replace(out[path], **changes)  # type: ignore[arg-type]
    return out
