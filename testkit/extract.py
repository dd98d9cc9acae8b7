"""Extraction of an image onto a real filesystem with whiteout semantics (needs root):
so that ``compare_tree`` can be proven on a tree the kernel made, an image's expected tree
checked against a real extraction, and a program run with chroot without lazyfs at all.

This is the test suite's second reference implementation of OCI whiteouts (the first,
``layermerge.py``, merges the entries a tar is written from). It is an oracle for the
converter: it reads tars with tarfile and applies them with the kernel's own files, sharing
no code with ``blockindex`` (``tree.py``'s merge, ``ingest.py``), so a mistake there cannot
also hide here. Meant for the generated images: beyond refusing ``..`` it takes no
precautions against a hostile tar.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from .layermerge import OPAQUE_MARKER, WHITEOUT_PREFIX
from .tarwriter import NS, pax_time_ns

if TYPE_CHECKING:
    from .imagegen import RichImage


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
    path = Path(image) if isinstance(image, str | os.PathLike) else image.path
    with tarfile.open(path) as tf:
        is_archive = "manifest.json" in tf.getnames()
    if is_archive:
        extract_docker_archive(path, dest)
    else:
        extract_rootfs_tar(path, dest)
