"""The ceiling for a real image: a directory tree copied into memory and served by pyfuse3.

``bench/memfs.py --from-dir DIR`` serves this instead of its synthetic ``/file`` and
``/many``: every directory, regular file (its bytes held in memory), symlink and device
node under ``DIR``, with their modes, owners, sizes and times; hard links share an inode.
It answers with the same mount options, timeouts and ``keep_cache`` as memfs (and lazyfs),
so a tree read through it is what pyfuse3 allows for that tree with no lazyfs work at all.
Extended attributes are not copied (``tar -c`` without ``--xattrs`` does not ask).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pyfuse3

TIMEOUT = 86400.0


class TreeOperations(pyfuse3.Operations):
    """Read-only; inode numbers handed out in walk order, the root's is pyfuse3's."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, root: Path) -> None:
        super().__init__()
        self._stat: dict[int, os.stat_result] = {}
        self._data: dict[int, memoryview] = {}
        self._target: dict[int, bytes] = {}
        self._children: dict[int, list[tuple[bytes, int]]] = {}
        self._entries: dict[tuple[int, bytes], int] = {}
        self._by_host: dict[tuple[int, int], int] = {}
        self._load(os.fsencode(root), pyfuse3.ROOT_INODE)

    def _load(self, path: bytes, ino: int) -> None:
        self._stat[ino] = os.lstat(path)
        children: list[tuple[bytes, int]] = []
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            child = self._by_host.get(key) if not stat.S_ISDIR(st.st_mode) else None
            if child is None:
                child = pyfuse3.ROOT_INODE + 1 + len(self._stat)
                self._by_host[key] = child
                if stat.S_ISDIR(st.st_mode):
                    self._load(entry.path, child)
                else:
                    self._stat[child] = st
                    if stat.S_ISREG(st.st_mode):
                        with open(entry.path, "rb") as f:
                            self._data[child] = memoryview(f.read())
                    elif stat.S_ISLNK(st.st_mode):
                        self._target[child] = os.readlink(entry.path)
            children.append((entry.name, child))
            self._entries[(ino, entry.name)] = child
        self._children[ino] = children

    @property
    def file_bytes(self) -> int:
        return sum(len(d) for d in self._data.values())

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        st = self._stat.get(ino)
        if st is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_rdev, a.st_size, a.st_blksize = st.st_rdev, st.st_size, 4096
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.st_blocks = (st.st_size + 511) // 512
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attr(parent_inode)
        ino = self._entries.get((parent_inode, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = self._target.get(inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in self._children:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._children[fh]
        for pos in range(start_id, len(children)):
            name, ino = children[pos]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), pos + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode not in self._data:
            raise pyfuse3.FUSEError(errno.EIO)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self._data[fh][off:off + size]  # type: ignore[return-value]

    async def release(self, fh: int) -> None:
        pass
