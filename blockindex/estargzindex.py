"""Build the block index of an eStargz image from its layers' tables of contents.

    build_estargz_index([EstargzLayer(digest, size, toc_layer), ...], out_path)

Nothing of the files is read: the TOCs say it all (``estargz.py``). Their entries are
merged into the tree as a layer's tar entries are (``tree.py``: whiteouts, opaque
directories, hard links), and each chunk of a regular file becomes a ``CODEC_GZIP_MEMBER``
chunk of the index: its layer blob, its member's range in it, its size, named by its sha256
(format 4; ``format.py``). The landmark files at a layer's root are not shown (as
stargz-snapshotter hides them), and the files before a ``.prefetch.landmark`` (the
layer's prioritised files) become the index's ``prefetch_files``.

An index reads a file as fixed-size chunks, so the image's chunks must be too: every chunk
but a file's last has the one size (a power of two, as eStargz writers cut them; 4 MiB by
default), which becomes the index's chunk size. An image whose chunks vary is refused
(``UnsupportedImageError``).
"""

from __future__ import annotations

import dataclasses
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .build import resolve, write_tree
from .errors import ImageError, UnsafeImageError, UnsupportedImageError
from .estargz import LANDMARKS, TocEntry, TocLayer
from .format import CODEC_GZIP_MEMBER, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ChunkDigest
from .tree import MAX_ENTRIES, Node, Tree, is_whiteout, split_path
from .writer import IndexWriter

_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@dataclasses.dataclass(frozen=True, slots=True)
class EstargzLayer:
    digest: str  # of the layer blob
    size: int
    toc: TocLayer


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EstargzIndexResult:
    chunk_size: int
    files: int
    chunks: int
    image_bytes: int


def chunk_size_of(layers: Sequence[EstargzLayer]) -> int:
    """The one size of every chunk that is not its file's last (without any: the smallest
    power of two that holds the largest file); UnsupportedImageError if there is none."""
    inner = {c.size for layer in layers for e in layer.toc.entries for c in e.chunks[:-1]}
    last = max((e.chunks[-1].size for layer in layers for e in layer.toc.entries if e.chunks), default=0)
    if len(inner) > 1:
        shown = ", ".join(map(str, sorted(inner)[:4]))
        raise UnsupportedImageError(f"eStargz chunks of {len(inner)} sizes ({shown}...): a lazy mount "
                                    "needs one chunk size")
    size = inner.pop() if inner else max(MIN_CHUNK_SIZE, 1 << max(last - 1, 0).bit_length())
    if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or last > size:
        raise UnsupportedImageError(f"eStargz chunks of {size} bytes (a lazy mount needs a power "
                                    f"of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE})")
    return size


def build_estargz_index(layers: Sequence[EstargzLayer], out_path: Path, *,
                        max_entries: int = MAX_ENTRIES) -> EstargzIndexResult:
    """Write the index of the image whose layers (lowest first) are ``layers`` to
    ``out_path``; ImageError (or Unsafe/UnsupportedImageError) for one it cannot index."""
    chunk_size = chunk_size_of(layers)
    tree = Tree(max_entries)
    where: dict[ChunkDigest, tuple[int, int, int, int]] = {}
    """Per chunk, the first place it is found: (blob id, offset, stored size, size)."""
    prefetch: list[bytes] = []
    for number, layer in enumerate(layers):
        tree.begin_layer(number)
        for entry in layer.toc.entries:
            try:
                _apply(tree, entry, chunk_size, number + 1, where)
            except ImageError as exc:
                raise type(exc)(f"layer {layer.digest}: {exc}") from exc
        prefetch += layer.toc.prefetch
    kept = [p for p in dict.fromkeys(prefetch) if (n := resolve(tree, p)) is not None and n.is_reg]
    with tempfile.TemporaryDirectory(prefix=".estargz-", dir=out_path.parent) as tmp:
        w = IndexWriter(chunk_size, spill=Path(tmp) / "index.work")
        try:
            def pack(used: set[ChunkDigest]) -> dict[ChunkDigest, int]:
                for number, layer in enumerate(layers):
                    w.add_blob(number + 1, layer.digest, layer.size)
                ids: dict[ChunkDigest, int] = {}
                for digest, (blob, offset, stored, size) in where.items():
                    if digest in used:
                        ids[digest] = len(ids) + 1
                        w.add_chunk(ids[digest], digest, blob=blob, offset=offset, stored_size=stored,
                                    size=size, codec=CODEC_GZIP_MEMBER)
                return ids

            image_bytes, files, ids = write_tree(tree, w, pack, kept)
            w.write(out_path)
        finally:
            w.close()
    return EstargzIndexResult(chunk_size=chunk_size, files=files, chunks=len(ids), image_bytes=image_bytes)


def _apply(tree: Tree, e: TocEntry, chunk_size: int, blob: int,
           where: dict[ChunkDigest, tuple[int, int, int, int]]) -> None:
    """Put one TOC entry into the tree (as ``ingest`` puts a tar member)."""
    parts = split_path(e.name)
    if is_whiteout(parts):
        tree.whiteout(parts)
        return
    if len(parts) == 1 and parts[0] in LANDMARKS and e.kind == "reg":
        return
    if e.kind == "hardlink":
        if not parts:
            raise UnsafeImageError(f"hard link {e.name!r} names the root")
        tree.link(parts, split_path(e.link, what="hard link target"))
        return
    if not parts and e.kind != "dir":
        raise UnsafeImageError(f"entry {e.name!r} names the root but is not a directory")
    node = Node(mode=_TYPE_BITS[e.kind] | e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns,
                rdev=e.rdev, xattrs=e.xattrs)
    if e.kind == "symlink":
        node.target = e.link
    elif e.kind == "reg":
        node.size = e.size
        chunks = []
        for c in e.chunks:
            digest = ChunkDigest(c.digest)
            first = where.setdefault(digest, (blob, c.offset, c.end - c.offset, c.size))
            if first[3] != c.size:
                raise ImageError(f"eStargz file {e.name!r}: one chunkDigest for chunks of "
                                 f"{first[3]} and {c.size} bytes")
            chunks.append((c.chunk_offset // chunk_size, digest))
        node.chunks = tuple(chunks)
    tree.add(parts, node)
