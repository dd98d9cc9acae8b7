"""Chunk, compress, pack and index: from a merged Tree to blobs and one index file.

Conversion makes one pass over each layer. While a layer is read, every regular file is
cut into chunks; each chunk is named by the BLAKE3 digest of its bytes, compressed once
(identical chunks are stored once, across files and layers) and appended to a spool file
inside the output layout. Chunks of zeros are not stored: they read as holes. Once the tree
is final, ``write_image`` walks it in a fixed order, numbers the inodes, copies the chunks
from the spool into blobs and writes the index.

Blobs follow the source layers, not the final tree: each chunk goes into a blob of the
layer that first provided it, in that layer's order, and a blob is cut before it would
pass ``blob_limit``. So a base layer shared by many images packs into the same blobs every
time, whatever the layers above it do, and a registry stores them once. The index lists
only the chunks the final tree uses; a chunk a later layer deleted stays in its blob,
unreferenced. The spool costs disk space about the size of the output, but
no layer is decompressed twice and memory holds digests, never file contents.

Measured on 1 MiB buffers: ``data == zeros`` takes 19 us on a zero chunk and under 1 us on
a random one, against 900 us for ``data.count(0)`` and 5 ms for ``strip``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from .codec import chunk_digest, encode
from .errors import PrefetchListError
from .format import (
    CODEC_LZ4,
    MEDIA_TYPE_CHUNKS,
    MEDIA_TYPE_INDEX,
    ROOT_INO,
    ChunkDigest,
)
from .oci import Layout
from .tree import Node, Tree
from .writer import IndexWriter

BLOB_LIMIT = 64 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class SpooledChunk:
    offset: int  # in the spool file
    stored_size: int
    size: int
    codec: int
    layer: int  # the source layer that first provided it


class Spool(Protocol):
    """Where ``ingest`` puts file data as it streams past: a ``ChunkSpool`` keeps the
    chunks, a side index's spool only where they lie (``sideindex.SideSpool``)."""

    chunk_size: int
    layer: int

    def add_chunk(self, data: bytes) -> ChunkDigest | None: ...

    def add_stream(self, f: IO[bytes], size: int, at: int | None = None
                   ) -> tuple[tuple[int, ChunkDigest], ...]: ...


class ChunkSpool:
    """Unique compressed chunks, appended to one temp file as layers are read; each
    compressed with ``codec`` (``codec.encode``: raw where that does not pay)."""

    def __init__(self, path: Path, chunk_size: int, codec: int = CODEC_LZ4) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.codec = codec
        self._file = open(path, "w+b")  # noqa: SIM115 - closed by close()
        self._end = 0
        self._zeros = bytes(chunk_size)
        self.chunks: dict[ChunkDigest, SpooledChunk] = {}  # in the order they arrived
        self.layer = 0
        """The source layer being read; set by the caller before each layer."""

    def close(self) -> None:
        self._file.close()

    def add_chunk(self, data: bytes) -> ChunkDigest | None:
        """Store one chunk (unless it is zeros or already here); its digest or None."""
        if data == self._zeros[: len(data)]:
            return None
        digest = chunk_digest(data)
        if digest not in self.chunks:
            codec, packed = encode(data, codec=self.codec)
            self._file.write(packed)
            self.chunks[digest] = SpooledChunk(self._end, len(packed), len(data), codec, self.layer)
            self._end += len(packed)
        return digest

    def add_stream(self, f: IO[bytes], size: int,
                   at: int | None = None) -> tuple[tuple[int, ChunkDigest], ...]:
        """Chunk ``size`` bytes read from ``f``: (chunk number, digest) of the chunks that
        are not zeros; EOFError if ``f`` ends early. ``at``, where the bytes start in the
        layer's tar, is for spools that record it (``sideindex.SideSpool``)."""
        out: list[tuple[int, ChunkDigest]] = []
        for idx, pos in enumerate(range(0, size, self.chunk_size)):
            digest = self.add_chunk(read_exactly(f, min(self.chunk_size, size - pos)))
            if digest is not None:
                out.append((idx, digest))
        return tuple(out)

    def read(self, chunk: SpooledChunk) -> bytes:
        return os.pread(self._file.fileno(), chunk.stored_size, chunk.offset)

    def flush(self) -> None:
        self._file.flush()


def read_exactly(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            raise EOFError(f"data ends {n - got} bytes early")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class BuildStats:
    index_desc: dict
    blob_descs: list[dict]
    image_bytes: int
    files: int
    chunks: int
    format_version: str  # of the index: the lowest that has every codec its chunks use


def walk(tree: Tree) -> Iterator[tuple[Node, list[tuple[bytes, Node]]]]:
    """Depth-first pre-order over directories, children in name-byte order:
    ``(dir_node, sorted_children)``. This order fixes inode numbers and blob layout."""
    stack = [tree.root]
    while stack:
        d = stack.pop()
        assert d.children is not None
        kids = sorted(d.children.items())
        yield d, kids
        stack.extend(n for _, n in reversed(kids) if n.is_dir)


def write_image(
    tree: Tree,
    spool: ChunkSpool,
    layout: Layout,
    tmpdir: Path,
    *,
    chunk_size: int,
    blob_limit: int = BLOB_LIMIT,
    prefetch_files: Sequence[bytes] = (),
) -> BuildStats:
    """Number the inodes, pack the chunks the tree uses into blobs, write the index
    (``write_tree``; ``prefetch_files`` as it says).

    Blobs and the index land in ``layout``; temp files go to ``tmpdir`` (inside it)."""
    spool.flush()
    # The rows go to a work file beside the output, not memory (see IndexWriter).
    w = IndexWriter(chunk_size, spill=tmpdir / "index.work")
    packer = _Packer(spool, layout, tmpdir, w, blob_limit)
    try:
        image_bytes, files, ids = write_tree(tree, w, packer.pack, prefetch_files)
        index_path = tmpdir / "index.sqlite"
        w.write(index_path)
        format_version = w.format_version
    finally:
        packer.abort()
        w.close()
    index_desc = _store_file(layout, index_path, MEDIA_TYPE_INDEX)
    return BuildStats(index_desc, packer.descs, image_bytes, files, len(ids), format_version)


def write_tree(tree: Tree, w: IndexWriter, pack: Callable[[set[ChunkDigest]], dict[ChunkDigest, int]],
               prefetch_files: Sequence[bytes] = ()) -> tuple[int, int, dict[ChunkDigest, int]]:
    """Number the inodes, write the tree's rows; ``pack(used)`` writes the blob and chunk
    rows of the chunks the tree uses and gives each its chunk id. Returns the sum of the
    regular files' sizes, their number, and the chunk ids.

    ``prefetch_files`` (paths in the image, symlinks followed) are recorded in the index
    meta entry ``prefetch_files`` as JSON ``[[inode, path], ...]``: a mount fetches their
    chunks first. PrefetchListError if one is not a regular file of the image."""
    # Number the inodes in walk order (kept on the nodes: a map would cost more per
    # entry than the number) and write the directory entries as they come.
    tree.root.ino = ROOT_INO
    order: list[Node] = [tree.root]
    more_names: dict[int, int] = {}  # hard links: names of an inode past its first
    for d, kids in walk(tree):
        for pos, (name, node) in enumerate(kids):
            if node.ino == 0:
                order.append(node)
                node.ino = len(order)
            else:
                more_names[node.ino] = more_names.get(node.ino, 0) + 1
            w.add_dirent(d.ino, pos, name, node.ino)

    used = {d for node in order if node.is_reg for _, d in node.chunks}
    w.set_meta("created_by", "lazyfs")
    if prefetch_files:
        first: dict[int, str] = {}
        for path in prefetch_files:
            found = resolve(tree, path)
            if found is None or not found.is_reg:
                raise PrefetchListError(f"prefetch list: {path.decode(errors='replace')} is "
                                        "not a regular file of the image")
            first.setdefault(found.ino, path.decode(errors="surrogateescape").lstrip("/"))
        w.set_meta("prefetch_files", json.dumps([[ino, p] for ino, p in first.items()]))
    image_bytes = files = 0
    ids = pack(used)
    for ino, node in enumerate(order, start=ROOT_INO):
        if node.is_dir:
            assert node.children is not None
            nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
        else:
            nlink = 1 + more_names.get(ino, 0)
        size = node.size if node.is_reg else len(node.target or b"")
        w.add_inode(
            ino, mode=node.mode, uid=node.uid, gid=node.gid, size=size,
            mtime_ns=node.mtime_ns, nlink=nlink, rdev=node.rdev, target=node.target,
        )
        for name, value in sorted(node.xattrs.items()):
            w.add_xattr(ino, name, value)
        if node.is_reg:
            files += 1
            image_bytes += node.size
            for idx, digest in node.chunks:
                w.add_extent(ino, idx, ids[digest])
    return image_bytes, files, ids


class _Packer:
    """Copies every spooled chunk into blob files: one run of blobs per source layer, in
    the order the layer provided its chunks, each blob cut before it passes ``limit``.
    Only the chunks in ``used`` get an id in the index."""

    def __init__(
        self, spool: ChunkSpool, layout: Layout, tmpdir: Path, w: IndexWriter, limit: int
    ) -> None:
        self.spool, self.layout, self.tmpdir, self.w, self.limit = spool, layout, tmpdir, w, limit
        self.descs: list[dict] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._layer = -1

    def pack(self, used: set[ChunkDigest]) -> dict[ChunkDigest, int]:
        """Write the blobs; the index id of each used chunk."""
        ids: dict[ChunkDigest, int] = {}
        for digest, sc in self.spool.chunks.items():
            if self._file is not None and (
                sc.layer != self._layer or self._size + sc.stored_size > self.limit
            ):
                self._close_blob()
            if self._file is None:
                self._file = open(self.tmpdir / "blob.tmp", "wb")  # noqa: SIM115
                self._hash, self._size, self._layer = hashlib.sha256(), 0, sc.layer
            data = self.spool.read(sc)
            self._file.write(data)
            self._hash.update(data)
            if digest in used:
                cid = ids[digest] = len(ids) + 1
                self.w.add_chunk(
                    cid, digest, blob=len(self.descs) + 1, offset=self._size,
                    stored_size=sc.stored_size, size=sc.size, codec=sc.codec,
                )
            self._size += sc.stored_size
        if self._file is not None:
            self._close_blob()
        return ids

    def _close_blob(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        digest = "sha256:" + self._hash.hexdigest()
        self.layout.add_blob_file(self.tmpdir / "blob.tmp", digest)
        self.w.add_blob(len(self.descs) + 1, digest, self._size)
        self.descs.append({"mediaType": MEDIA_TYPE_CHUNKS, "digest": digest, "size": self._size})

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def resolve(tree: Tree, path: bytes, hops: int = 40) -> Node | None:
    """The node at ``path`` in the merged tree, following symlinks (absolute ones from the
    image root, as inside a container) up to ``hops`` times; None if there is none."""
    todo = [p for p in path.split(b"/") if p not in (b"", b".")]
    trail: list[Node] = [tree.root]
    while todo:
        part = todo.pop(0)
        if part == b"..":
            if len(trail) > 1:
                trail.pop()
            continue
        here = trail[-1]
        node = here.children.get(part) if here.children is not None else None
        if node is None:
            return None
        if stat.S_ISLNK(node.mode) and node.target is not None:
            hops -= 1
            if hops < 0:
                return None
            target = [p for p in node.target.split(b"/") if p not in (b"", b".")]
            if node.target.startswith(b"/"):
                trail = [tree.root]
            todo = target + todo
            continue
        trail.append(node)
    return trail[-1]


def _store_file(layout: Layout, path: Path, media_type: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    digest = "sha256:" + h.hexdigest()
    layout.add_blob_file(path, digest)
    return {"mediaType": media_type, "digest": digest, "size": size}
