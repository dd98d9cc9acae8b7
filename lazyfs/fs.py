"""The FUSE adapter: kernel requests in, answers from the image model out.

Each handler asks ``IndexReader`` or ``ImageContent`` one question and maps typed errors
to one errno (borg's ``fuse.py`` shape). Content is immutable, so entries and attributes
are cached by the kernel for a day and open files keep the page cache. Anything that
escapes a handler would end the whole mount (pyfuse3 ends ``main()`` with it), so every
handler is wrapped in ``_at_the_edge``: an error no handler expected (a bug, or an index
the check let through) answers that request with EIO and is logged, never ending the
mount.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from blockindex.errors import IndexFormatError
from blockindex.format import ROOT_INO, Inode, InodeT
from blockindex.reader import IndexReader
from fetcher.errors import FetchError

from .content import ImageContent
from .failures import ReadFailures
from .mountinfo import STATE_XATTR, STATUS_XATTR

log = logging.getLogger(__name__)


TIMEOUT = 86400.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def entry_attributes(node: Inode) -> pyfuse3.EntryAttributes:
    """What the kernel is told of an inode (every value a checked index holds fits)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = node.ino
    a.generation = 0
    a.entry_timeout = TIMEOUT
    a.attr_timeout = TIMEOUT
    a.st_mode = node.mode
    a.st_nlink = node.nlink
    a.st_uid = node.uid
    a.st_gid = node.gid
    a.st_rdev = node.rdev
    a.st_size = node.size
    a.st_blksize = 4096
    a.st_blocks = (node.size + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
    return a


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _erofs(*_args: Any) -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


def _at_the_edge(handler: Callable[Concatenate[LazyOperations, _P], Coroutine[Any, Any, _R]]
                 ) -> Callable[Concatenate[LazyOperations, _P], Coroutine[Any, Any, _R]]:
    """The handler, answering EIO for any ``Exception`` it did not map itself.

    ``FUSEError`` is the handler's answer and passes through; ``trio.Cancelled`` and
    the other ``BaseException``s (a shutdown, an interrupt) are not ``Exception`` and
    are never caught here."""
    name = handler.__name__

    @functools.wraps(handler)
    async def edge(self: LazyOperations, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place a bug meets the kernel
            self._unexpected(name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return edge


class LazyOperations(pyfuse3.Operations):
    """Read-only POSIX view of one image."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, index: IndexReader, content: ImageContent,
                 status: Callable[[], dict[str, Any]], *, image: str | None = None,
                 file_state: Callable[[int], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._file_state = file_state
        self._index = index
        self._content = content
        self._status = status
        self._failures = ReadFailures(index, image)
        self._statfs = self._make_statfs()
        self._bugs: collections.Counter[tuple[str, str]] = collections.Counter()

    def _unexpected(self, handler: str, exc: Exception) -> None:
        """Log an error no handler expected: one record per failed request, the first
        of each kind (handler and exception type) with its traceback, so that ``ls -l``
        of 200,000 entries whose every lookup fails does not write 200,000 tracebacks."""
        kind = (handler, type(exc).__name__)
        self._bugs[kind] += 1
        log.error("%s failed (EIO), an unexpected error (%d of this kind so far): %s: %s",
                  handler, self._bugs[kind], kind[1], exc, exc_info=self._bugs[kind] == 1)

    # -- attributes ---------------------------------------------------------------------

    def _attr(self, ino: int) -> Inode:
        try:
            return self._index.attr(InodeT(ino))
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except IndexFormatError as exc:
            log.error("inode %d: %s", ino, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_at_the_edge
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(self._attr(inode))

    @_at_the_edge
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return entry_attributes(self._attr(parent_inode))
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)  # the kernel resolves '..' itself
        node = self._ask(self._index.lookup, InodeT(parent_inode), name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry_attributes(node)

    def _ask(self, question: Callable[..., Any], *args: Any) -> Any:
        """``question(*args)`` of the index; EIO (logged) if the index is corrupt."""
        try:
            return question(*args)
        except IndexFormatError as exc:
            log.error("%s: %s", question.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_at_the_edge
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # inodes are rows in the index; nothing to release

    @_at_the_edge
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self._ask(self._index.readlink, InodeT(inode))  # type: ignore[no-any-return]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    # -- directories --------------------------------------------------------------------

    @_at_the_edge
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._attr(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_at_the_edge
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            for pos, name, node in self._index.children(InodeT(fh), start_id):
                if not pyfuse3.readdir_reply(token, name, entry_attributes(node), pos + 1):
                    return
        except IndexFormatError as exc:
            log.error("directory inode %d: %s", fh, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_at_the_edge
    async def releasedir(self, fh: int) -> None:
        pass

    # -- files --------------------------------------------------------------------------

    @_at_the_edge
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._attr(inode)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_at_the_edge
    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return await self._content.read(InodeT(fh), off, size)  # type: ignore[return-value]
        except (FetchError, IndexFormatError, KeyError) as exc:
            self._failures.read_failed(fh, off, size, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_at_the_edge
    async def release(self, fh: int) -> None:
        pass

    # -- extended attributes ------------------------------------------------------------

    @_at_the_edge
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == STATUS_XATTR and inode == ROOT_INO:
            return json.dumps(self._status(), sort_keys=True).encode()
        if name == STATE_XATTR and self._file_state is not None:
            try:
                return json.dumps(self._file_state(inode), sort_keys=True).encode()
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except (IndexFormatError, OSError) as exc:
                log.error("state of inode %d: %s", inode, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        value = self._ask(self._index.getxattr, InodeT(inode), name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_at_the_edge
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return sorted(self._ask(self._index.xattrs, InodeT(inode)))

    # -- the filesystem -----------------------------------------------------------------

    def _make_statfs(self) -> pyfuse3.StatvfsData:
        totals = self._index.totals()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (totals["file_bytes"] + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = totals["inodes"]
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_at_the_edge
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return self._statfs

    # Everything that would change the image answers EROFS.
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs  # type: ignore[assignment]
    create = write = setxattr = removexattr = _erofs  # type: ignore[assignment]
