"""The merged filesystem tree of an image, built in memory from layer entries.

Layers are applied in order, as docker and containerd apply them to a directory:

* an entry replaces whatever was at its path, except that a directory over a directory
  only updates the metadata and keeps the merged children;
* ``.wh.NAME`` deletes NAME as left by lower layers;
* ``.wh..wh..opq`` in a directory drops the children that lower layers put there;
* a hard link is a second name for the inode its target names *now*; if the target is
  later deleted or replaced, the link keeps the old inode and its content.

Nodes hold no file contents: a regular file carries the digests of its stored chunks
(computed while its layer is read; chunks of zeros are holes and take no entry), so memory
stays bounded by the number of stored chunks, not by bytes or by the size a file claims.
"""

from __future__ import annotations

import dataclasses
import stat
import types
from collections.abc import Mapping

from .errors import UnsafeImageError, UnsupportedImageError
from .format import ChunkDigest

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
NAME_MAX = 255

DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755
NO_XATTRS: Mapping[bytes, bytes] = types.MappingProxyType({})


@dataclasses.dataclass(eq=False, slots=True)
class Node:
    """One inode of the tree. Identity matters: hard links are one Node under two names."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    size: int = 0
    target: bytes | None = None  # symlink target
    # Nodes are never changed in place but replaced, so the empty defaults are shared:
    # a million entries would otherwise carry a million empty containers.
    xattrs: Mapping[bytes, bytes] = dataclasses.field(default_factory=lambda: NO_XATTRS)
    # Regular files: (chunk number, digest) of the chunks that are not all zeros, in order.
    chunks: tuple[tuple[int, ChunkDigest], ...] = ()
    # Directories: name -> node, and name -> the layer that put the name there.
    children: dict[bytes, Node] | None = None
    layer_of: dict[bytes, int] | None = None
    ino: int = 0  # the inode number, given when the index is written

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


def new_dir(mode: int = DEFAULT_DIR_MODE, **attrs: object) -> Node:
    node = Node(mode=mode, **attrs)  # type: ignore[arg-type]
    node.children, node.layer_of = {}, {}
    return node


def split_path(path: bytes, *, what: str = "entry") -> tuple[bytes, ...]:
    """The components of a tar path, made relative and normalised (``a/./b/../c`` is
    ``a/c``); UnsafeImageError if it climbs above the root."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise UnsafeImageError(f"{what} {path!r} climbs out of the image root")
            parts.pop()
            continue
        if len(part) > NAME_MAX:
            raise UnsupportedImageError(f"{what} {path!r}: a name longer than {NAME_MAX} bytes")
        parts.append(part)
    return tuple(parts)


MAX_ENTRIES = 1_000_000
"""Entries the merged tree may hold (``convert --max-entries``): the tree is in memory until
the index is written, at under 1.5 KiB an entry, so this bounds a convert's memory
(about 1.5 GB); the largest real images hold a few hundred thousand."""


class Tree:
    """The merge model. Call ``begin_layer`` before the entries of each layer."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.root = new_dir()
        self.layer = 0
        self.entries = 0
        """Names added so far (removals by whiteouts not subtracted)."""
        self.max_entries = max_entries

    def _count(self, parts: tuple[bytes, ...]) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise UnsafeImageError(
                f"the image has more than {self.max_entries:,} entries (at {b'/'.join(parts)!r}); "
                "convert --max-entries N allows more (each costs convert about 1.5 KiB of memory)")

    def begin_layer(self, layer: int) -> None:
        self.layer = layer

    # -- lookups ------------------------------------------------------------------------

    def get(self, parts: tuple[bytes, ...]) -> Node | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _parent(self, parts: tuple[bytes, ...]) -> Node:
        """The directory that holds ``parts``, creating missing ones as docker does."""
        node = self.root
        for i, part in enumerate(parts[:-1]):
            assert node.children is not None and node.layer_of is not None
            child = node.children.get(part)
            if child is None:
                self._count(parts[: i + 1])
                child = new_dir()
                node.children[part] = child
                node.layer_of[part] = self.layer
            elif not child.is_dir:
                path = b"/".join(parts[: i + 1])
                raise UnsafeImageError(
                    f"entry {b'/'.join(parts)!r} lies under non-directory {path!r}"
                )
            node = child
        return node

    # -- changes ------------------------------------------------------------------------

    def add(self, parts: tuple[bytes, ...], node: Node) -> Node:
        """Put ``node`` at ``parts``; returns the node now there (the old directory, updated,
        when a directory lands on a directory)."""
        if not parts:  # the root itself: only its metadata counts
            _copy_meta(node, self.root)
            return self.root
        name = parts[-1]
        parent = self._parent(parts)
        assert parent.children is not None and parent.layer_of is not None
        old = parent.children.get(name)
        if old is not None and old.is_dir and node.is_dir:
            _copy_meta(node, old)
            parent.layer_of[name] = self.layer
            return old
        if old is None:
            self._count(parts)
        if node.is_dir and node.children is None:
            node.children, node.layer_of = {}, {}
        parent.children[name] = node
        parent.layer_of[name] = self.layer
        return node

    def link(self, parts: tuple[bytes, ...], target: tuple[bytes, ...]) -> None:
        """A hard link: ``parts`` becomes another name of the inode at ``target``."""
        node = self.get(target)
        shown = b"/".join(target)
        if node is None:
            raise UnsafeImageError(
                f"hard link {b'/'.join(parts)!r} points at {shown!r}, which is not in the image"
            )
        if node.is_dir:
            raise UnsafeImageError(f"hard link {b'/'.join(parts)!r} points at directory {shown!r}")
        if parts == target:
            return
        self.add(parts, node)

    def whiteout(self, parts: tuple[bytes, ...]) -> None:
        """Handle a ``.wh.`` entry at ``parts`` (the path of the whiteout file itself)."""
        *dirparts, wh = parts
        parent = self.get(tuple(dirparts))
        if wh == OPAQUE_MARKER:
            if parent is None:
                parent = self.add(tuple(dirparts), new_dir()) if dirparts else self.root
            self._drop_lower(parent)
            return
        name = wh[len(WHITEOUT_PREFIX) :]
        if parent is None or parent.children is None or parent.layer_of is None:
            return
        if name in parent.children and parent.layer_of[name] < self.layer:
            del parent.children[name], parent.layer_of[name]

    def _drop_lower(self, node: Node) -> None:
        """Drop what lower layers put under directory ``node``, at every depth (a
        directory this layer re-declared is kept, but only with this layer's children)."""
        stack = [node]
        while stack:
            d = stack.pop()
            if d.children is None or d.layer_of is None:
                continue
            for name in list(d.children):
                if d.layer_of[name] < self.layer:
                    del d.children[name], d.layer_of[name]
                elif d.children[name].is_dir:
                    stack.append(d.children[name])


def is_whiteout(parts: tuple[bytes, ...]) -> bool:
    return bool(parts) and parts[-1].startswith(WHITEOUT_PREFIX)


def _copy_meta(src: Node, dst: Node) -> None:
    dst.mode, dst.uid, dst.gid, dst.mtime_ns = src.mode, src.uid, src.gid, src.mtime_ns
    dst.xattrs = src.xattrs
