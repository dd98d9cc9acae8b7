"""Feed entries into the merge Tree: tar members of a layer, or a directory on disk.

Nothing is extracted: headers become Nodes, and regular file data goes straight from the
tar stream (or the file) into the spool (``build.Spool``), ``chunk_size`` bytes at a time.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import errno
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from .build import Spool, read_exactly
from .errors import ImageError, UnsafeImageError
from .format import ChunkDigest
from .tree import NO_XATTRS, Node, Tree, is_whiteout, split_path

MAX_FILE_SIZE = 1 << 40  # 1 TiB: a size above this is a lie or an attack, not an image
MAX_ID = (1 << 32) - 1  # uid and gid are 32-bit on Linux
MAX_MTIME_NS = (1 << 63) - 1  # what the index (a SQLite INTEGER) and stat can hold
MAX_MAJOR, MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1  # what Linux's dev_t encodes
MAX_TARGET = 4095  # PATH_MAX less its NUL: readlink cannot return a longer target
MAX_XATTR_NAME, MAX_XATTR_VALUE = 255, 65536  # Linux's XATTR_NAME_MAX, XATTR_SIZE_MAX

_TYPE_BITS = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def _b(text: str) -> bytes:
    """Raw bytes of a name tarfile decoded with utf-8 + surrogateescape."""
    return text.encode("utf-8", "surrogateescape")


def apply_tar(tree: Tree, spool: Spool, f: BinaryIO, name: str, layer: int) -> None:
    """Apply one uncompressed layer tar stream to ``tree`` as layer number ``layer``."""
    tree.begin_layer(layer)
    try:
        with tarfile.open(
            fileobj=f, mode="r|", encoding="utf-8", errors="surrogateescape"
        ) as tf:
            while (ti := tf.next()) is not None:
                _apply_member(tree, spool, tf, ti)
                # tarfile keeps every member it has read (about 0.5 KiB each), even in
                # stream mode where nothing can go back to them: drop them as we go.
                tf.members.clear()  # type: ignore[attr-defined]  # typeshed lacks TarFile.members
    except ImageError as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ImageError(f"{name}: corrupt or truncated tar ({exc})") from exc


def _apply_member(tree: Tree, spool: Spool, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
    raw_name = _b(ti.name)
    if b"\0" in raw_name:
        raise UnsafeImageError(f"entry {raw_name!r} has a NUL byte in its name")
    parts = split_path(raw_name)
    if is_whiteout(parts):
        tree.whiteout(parts)
        return
    if ti.islnk():
        if not parts:
            raise UnsafeImageError(f"hard link {raw_name!r} names the root")
        tree.link(parts, split_path(_b(ti.linkname), what="hard link target"))
        return
    if not parts and not ti.isdir():
        raise UnsafeImageError(f"entry {raw_name!r} names the root but is not a directory")
    if ti.size < 0 or ti.size > MAX_FILE_SIZE:
        raise UnsafeImageError(f"entry {raw_name!r} claims an absurd size {ti.size}")
    for what, value in (("uid", ti.uid), ("gid", ti.gid)):
        if not 0 <= value <= MAX_ID:
            raise UnsafeImageError(f"entry {raw_name!r} has an impossible {what} {value}")
    type_bits = _TYPE_BITS.get(ti.type, stat.S_IFREG)
    node = Node(
        mode=type_bits | (ti.mode & 0o7777),
        uid=ti.uid,
        gid=ti.gid,
        mtime_ns=_mtime_ns(ti),
        xattrs=_xattrs(ti),
    )
    if ti.issym():
        node.target = symlink_target(raw_name, _b(ti.linkname))
    elif ti.ischr() or ti.isblk():
        # Kept as metadata only: nothing is ever created on this host.
        if not (0 <= ti.devmajor <= MAX_MAJOR and 0 <= ti.devminor <= MAX_MINOR):
            raise UnsafeImageError(
                f"device {raw_name!r} has an impossible number {ti.devmajor}:{ti.devminor}")
        node.rdev = os.makedev(ti.devmajor, ti.devminor)
    elif type_bits == stat.S_IFREG:
        node.size = ti.size
        data = tf.extractfile(ti)
        assert data is not None
        if ti.sparse is not None:
            # typeshed has extractfile() return IO[bytes] (it is an ExFileObject, a
            # BufferedReader over the raw reader) and TarInfo.sparse as bytes (it is the
            # list of (offset, size) data segments)
            node.chunks = _add_sparse(spool, data.raw, ti.size, ti.sparse)  # type: ignore[attr-defined,arg-type]
        else:
            node.chunks = spool.add_stream(data, ti.size, ti.offset_data)
    tree.add(parts, node)


def symlink_target(name: bytes, target: bytes) -> bytes:
    if not target or b"\0" in target or len(target) > MAX_TARGET:
        raise UnsafeImageError(
            f"symlink {name!r}: a target that is empty, holds a NUL or is over {MAX_TARGET} bytes")
    return target


def _add_sparse(spool: Spool, raw: BinaryIO, size: int,
                segments: list[tuple[int, int]]) -> tuple[tuple[int, ChunkDigest], ...]:
    """Chunk a GNU sparse member from its map: only the chunks a data segment touches are
    read, so a file that claims a terabyte of holes costs what its data costs. ``raw`` is
    tarfile's unbuffered member reader, which seeks forward by reading (holes read as
    zeros, so a chunk partly in a hole still reads right); a map that would make it go
    back fails as a corrupt tar."""
    cs = spool.chunk_size
    touched: set[int] = set()
    for off, n in segments:
        off, end = max(off, 0), min(off + n, size)
        if end > off:
            touched.update(range(off // cs, (end - 1) // cs + 1))
    out: list[tuple[int, ChunkDigest]] = []
    for idx in sorted(touched):
        pos = idx * cs
        raw.seek(pos)
        digest = spool.add_chunk(read_exactly(raw, min(cs, size - pos)))
        if digest is not None:
            out.append((idx, digest))
    return tuple(out)


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    text = ti.pax_headers.get("mtime")
    if text is not None:
        try:
            value = decimal.Decimal(text).scaleb(9).to_integral_value(decimal.ROUND_FLOOR)
            ns = int(value)
        except (decimal.InvalidOperation, ValueError, OverflowError):  # NaN, Infinity
            raise ImageError(f"entry {ti.name!r}: malformed PAX mtime {text!r}") from None
    else:
        ns = int(ti.mtime) * 1_000_000_000
    if not -MAX_MTIME_NS <= ns <= MAX_MTIME_NS:
        shown = text if text is not None else str(ti.mtime)
        raise UnsafeImageError(f"entry {ti.name!r} has an impossible mtime {shown[:40]!r}")
    return ns


def _xattrs(ti: tarfile.TarInfo) -> Mapping[bytes, bytes]:
    if not ti.pax_headers:
        return NO_XATTRS
    out: dict[bytes, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[_b(key.removeprefix("SCHILY.xattr."))] = _b(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            # libarchive: the name is URL-encoded, the value base64 (padding optional).
            try:
                decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise ImageError(f"entry {ti.name!r}: malformed xattr {key!r}") from None
            out[unquote_to_bytes(key.removeprefix("LIBARCHIVE.xattr."))] = decoded
    for xname, xvalue in out.items():
        if not xname or b"\0" in xname or len(xname) > MAX_XATTR_NAME or len(xvalue) > MAX_XATTR_VALUE:
            raise UnsafeImageError(f"entry {ti.name!r}: an impossible xattr {xname[:64]!r}")
    return out or NO_XATTRS


# -- a root filesystem directory on disk ---------------------------------------------------


def scan_dir(tree: Tree, spool: Spool, root: Path) -> None:
    """Read the directory ``root`` (not following symlinks) into ``tree`` as one layer."""
    tree.begin_layer(0)
    broot = os.fsencode(root)
    links: dict[tuple[int, int], tuple[bytes, ...]] = {}
    try:
        st = os.lstat(broot)
        if not stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{root}: not a directory")
        tree.add((), _node_from_stat(st, _listxattrs(broot)))
        # Depth first, names in order, as ``tar`` walks a tree: the chunks arrive in
        # the order a tar of this directory would give them, so both pack the same blobs.
        stack: list[tuple[Iterator[os.DirEntry[bytes]], tuple[bytes, ...]]] = [
            (_sorted_entries(broot), ())
        ]
        while stack:
            it, dparts = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            path, parts = entry.path, (*dparts, entry.name)
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                continue  # a socket is not image content (tar cannot hold one either)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                first = links.get((st.st_dev, st.st_ino))
                if first is not None:
                    tree.link(parts, first)
                    continue
                links[(st.st_dev, st.st_ino)] = parts
            node = _node_from_stat(st, _listxattrs(path))
            if stat.S_ISLNK(st.st_mode):
                node.target = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                node.size = st.st_size
                node.chunks = _chunk_disk_file(spool, path, st.st_size)
            tree.add(parts, node)
            if stat.S_ISDIR(st.st_mode):
                stack.append((_sorted_entries(path), parts))
    except OSError as exc:
        where = os.fsdecode(exc.filename) if exc.filename else str(root)
        raise ImageError(f"{where}: cannot read ({exc.strerror or exc})") from exc


def _sorted_entries(path: bytes) -> Iterator[os.DirEntry[bytes]]:
    with os.scandir(path) as it:
        return iter(sorted(it, key=lambda e: e.name))


def _node_from_stat(st: os.stat_result, xattrs: dict[bytes, bytes]) -> Node:
    return Node(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
        xattrs=xattrs,
    )


def _listxattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {
        os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
    }


def _chunk_disk_file(spool: Spool, path: bytes,
                     size: int) -> tuple[tuple[int, ChunkDigest], ...]:
    """Chunk a file on disk, skipping ranges the filesystem reports as holes."""
    cs = spool.chunk_size
    out: list[tuple[int, ChunkDigest]] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        next_data = -1
        for pos in range(0, size, cs):
            want = min(cs, size - pos)
            if next_data < pos:
                try:
                    next_data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: only a hole from here on
                        raise
                    next_data = size
            if next_data >= pos + want:
                continue
            data = os.pread(fd, want, pos)
            if len(data) != want:
                raise ImageError(f"{os.fsdecode(path)}: file changed while it was read")
            digest = spool.add_chunk(data)
            if digest is not None:
                out.append((pos // cs, digest))
    finally:
        os.close(fd)
    return tuple(out)
