"""The ceiling: a trivial pyfuse3 filesystem that serves everything from memory.

It does what lazyfs does minus the work of being lazyfs, so the benchmark can say how
close lazyfs comes to what pyfuse3 itself allows on this machine, measured in the same run:

- one process, one trio loop, the same mount options (``ro``, ``default_permissions``),
  the same readahead (``lazyfs.mountinfo.set_readahead``, 1 MiB), the same day-long entry
  and attribute timeouts and ``keep_cache``;
- ``/file``: ``--file-size`` bytes of pseudo-random data held in one buffer, read replies
  are memoryview slices of it (no copy in Python);
- ``/many/dNNNN/fNNNNNN``: ``--tree`` files, ``--per-dir`` to a directory, the same shape,
  names and sizes as ``testkit.imagegen.build_many_files_image``;
- or, with ``--from-dir DIR``, a copy of a real tree instead (``bench/memtree.py``): an
  image's rootfs, to read the same files lazyfs serves;
- with ``--loop lazyfs``, the request loop lazyfs mounts run (``lazyfs/fuseloop.py``)
  instead of pyfuse3's own: the pair shows what that loop saves.

    python3 bench/memfs.py MOUNTPOINT --file-size 268435456 --tree 50000
    python3 bench/memfs.py MOUNTPOINT --from-dir ROOTFS

It prints ``ready`` on stdout once mounted; unmount it with ``fusermount3 -u -z``.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memtree import TreeOperations  # noqa: E402
from lazyfs import fuseloop, mountinfo  # noqa: E402
from lazyfs.mount import MountOptions  # noqa: E402

TIMEOUT = 86400.0
MTIME_NS = 1_700_000_000 * 1_000_000_000
ROOT_INO = pyfuse3.ROOT_INODE
FILE_INO = ROOT_INO + 1
MANY_INO = ROOT_INO + 2
FIRST_DIR_INO = ROOT_INO + 3


class MemOperations(pyfuse3.Operations):
    """Read-only: ``/file`` and the ``/many`` tree, inode numbers computed, not stored."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, data: bytes, n_files: int, per_dir: int) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._n = n_files
        self._per_dir = per_dir
        self._ndirs = -(-n_files // per_dir)
        self._first_file_ino = FIRST_DIR_INO + self._ndirs

    # -- the model ------------------------------------------------------------------------

    def _file_index(self, ino: int) -> int | None:
        i = ino - self._first_file_ino
        return i if 0 <= i < self._n else None

    def _dir_index(self, ino: int) -> int | None:
        d = ino - FIRST_DIR_INO
        return d if 0 <= d < self._ndirs else None

    def _content(self, i: int) -> bytes:
        return b"file %d\n" % i

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = MTIME_NS
        a.st_blksize = 4096
        if ino == ROOT_INO:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 3
        elif ino == MANY_INO:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2 + self._ndirs
        elif ino == FILE_INO:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, len(self._data)
        elif self._dir_index(ino) is not None:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        elif (i := self._file_index(ino)) is not None:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, len(self._content(i))
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    def _children(self, ino: int) -> list[tuple[bytes, int]]:
        if ino == ROOT_INO:
            return [(b"file", FILE_INO), (b"many", MANY_INO)]
        if ino == MANY_INO:
            return [(b"d%04d" % d, FIRST_DIR_INO + d) for d in range(self._ndirs)]
        d = self._dir_index(ino)
        if d is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        end = min(self._n, (d + 1) * self._per_dir)
        return [(b"f%06d" % i, self._first_file_ino + i) for i in range(d * self._per_dir, end)]

    def _lookup(self, parent: int, name: bytes) -> int:
        try:
            if parent == ROOT_INO:
                return {b"file": FILE_INO, b"many": MANY_INO}[name]
            if parent == MANY_INO and name[:1] == b"d":
                n = int(name[1:])
                if self._dir_index(FIRST_DIR_INO + n) is not None and name == b"d%04d" % n:
                    return FIRST_DIR_INO + n
            d = self._dir_index(parent)
            if d is not None and name[:1] == b"f":
                i = int(name[1:])
                if i // self._per_dir == d and i < self._n and name == b"f%06d" % i:
                    return self._first_file_ino + i
        except (KeyError, ValueError):
            pass
        raise pyfuse3.FUSEError(errno.ENOENT)

    # -- FUSE -----------------------------------------------------------------------------

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attr(parent_inode)
        return self._attr(self._lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._attr(inode).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._children(fh)
        for pos in range(start_id, len(children)):
            name, ino = children[pos]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), pos + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == FILE_INO:
            return self._data[off:off + size]  # type: ignore[return-value]
        i = self._file_index(fh)
        if i is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return self._content(i)[off:off + size]

    async def release(self, fh: int) -> None:
        pass


def pseudo_random(size: int, seed: int = 1) -> bytes:
    """``size`` incompressible bytes, the same for the same seed (randbytes is limited to
    2 GiB bits at once, so it is drawn in 16 MiB pieces)."""
    rng = random.Random(seed)
    piece = 16 << 20
    return b"".join(rng.randbytes(min(piece, size - off)) for off in range(0, size, piece))


async def serve(ops: pyfuse3.Operations, mountpoint: Path, loop: str = "pyfuse3") -> None:
    """Mount and serve, in the order lazyfs.mount.serve does it: init inside the trio
    run, then the readahead, then the main loop."""
    target = os.path.realpath(mountpoint)  # noqa: ASYNC240 (before mounting: nothing to wait on)
    pyfuse3.init(ops, str(mountpoint),
                 {"fsname=memfs", "subtype=memfs", "ro", "default_permissions"})
    try:
        entry = mountinfo.find(target, resolved=True)
        readahead = MountOptions(ref="", mountpoint=mountpoint, cache_dir=mountpoint).readahead_kib
        if entry is None or not mountinfo.set_readahead(entry, readahead):
            print("memfs: could not set readahead", file=sys.stderr)
        print("ready", flush=True)
        if loop == "lazyfs":
            fuseloop.install()
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--file-size", type=int, default=0, help="bytes in /file")
    parser.add_argument("--tree", type=int, default=0, help="files under /many")
    parser.add_argument("--per-dir", type=int, default=100, help="files per directory")
    parser.add_argument("--from-dir", type=Path, help="serve a copy of this tree instead")
    parser.add_argument("--loop", choices=("pyfuse3", "lazyfs"), default="pyfuse3",
                        help="pyfuse3's own request loop, or the one lazyfs mounts run (lazyfs/fuseloop.py)")
    args = parser.parse_args()
    ops: pyfuse3.Operations
    if args.from_dir is not None:
        ops = TreeOperations(args.from_dir)
    else:
        ops = MemOperations(pseudo_random(args.file_size), args.tree, args.per_dir)
    trio.run(serve, ops, args.mountpoint, args.loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
