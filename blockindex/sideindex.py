"""Build a side index: the block index of an ordinary image, read from its own layers.

    build_side_index(layout_dir, manifest_digest, out_path, spacing=512 << 10)

Nothing is converted or stored again: each layer blob is read once, in order. While its
tar streams past, ``ingest`` merges its entries into the tree as ``convert`` does
(whiteouts, opaque directories, hard links) and cuts each regular file into the usual
fixed-size chunks, each named by the BLAKE3 digest of its bytes; ``SideSpool`` keeps only
where each chunk starts in the layer's uncompressed tar. For a gzip layer, indexed_gzip
(zlib's zran method; Python's zlib cannot report deflate block boundaries) records a
checkpoint at the first block boundary every ``spacing`` bytes of output, with the 32 KiB
window before it; its exported index (the GZIDX format, parsed by ``parse_gzidx``) gives
the rows of ``checkpoints``. The index then lists the layers as its blobs, each chunk as
``CODEC_GZIP_SPAN`` at its tar offset (``CODEC_RAW`` in an uncompressed layer), and the
tree as ``build.write_tree`` writes every index.

A zstd layer is refused: its frames are not seekable in general. So is a GNU sparse member
(its data is not one run of the tar). Chunks a later layer deleted are not listed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import mmap
import queue
import struct
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from .build import read_exactly, write_tree
from .codec import chunk_digest
from .errors import ImageError, IndexFormatError, UnsupportedImageError
from .format import CODEC_GZIP_SPAN, CODEC_RAW, ChunkDigest
from .gzspan import sparse_window
from .ingest import apply_tar
from .oci import Layout, check_digest
from .sources import GZIP_MAGIC, ZSTD_MAGIC
from .tree import MAX_ENTRIES, Tree
from .writer import IndexWriter

DEFAULT_SPACING = 512 << 10
"""Output bytes between checkpoints: at 512K a cold start of the benchmark's Debian image takes
1.26x the lazyfs image's time and 1.23x its bytes, for an index of 1.9% of the layers
(2M: 1.76x, 1.95x, 1.05%; ``bench/sideindex_bench.py``)."""
WINDOW_LEVEL = 6
"""zlib's level for a checkpoint's sparse window: 9 saves 3% in ten times the time (2 ms a
window, a second of a build at 512K)."""
MIN_SPACING = 64 << 10
MAX_SPACING = 1 << 30
_GZIDX_HEADER = struct.Struct("<5sBBQQIII")
_GZIDX_POINT = struct.Struct("<QQBB")


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A deflate block boundary (GZIDX's point): the block starts ``bits`` bits before
    byte ``coffset`` of the compressed blob (0: at it), at ``uoffset`` of the output."""

    coffset: int
    uoffset: int
    bits: int
    window: bytes  # the output before it, up to 32 KiB; empty at a member's start


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SideIndexResult:
    """What a side index holds."""

    image_bytes: int  # sum of the sizes of the regular files (each inode once)
    files: int
    chunks: int
    checkpoints: int
    layers: int
    layer_bytes: int  # sum of the sizes of the layer blobs
    index_bytes: int  # as pushed (``pack_side_index``)
    sqlite_bytes: int  # the SQLite file itself


SQLITE_MAGIC = b"SQLite format 3\x00"
PACK_LEVEL = 9
"""zstd's level for a pushed side index: 19 saves 4% more in ten times the time."""


def pack_side_index(sqlite: bytes) -> bytes:
    """What is pushed of a side index: its SQLite file in one zstd frame (half its size on
    the benchmark's image: names and tree rows compress; digests and windows do not)."""
    return zstandard.ZstdCompressor(level=PACK_LEVEL).compress(sqlite)


def unpack_side_index(blob: bytes, limit: int) -> bytes:
    """The SQLite file a pushed side index holds: the content of its zstd frame (at most
    ``limit`` bytes), or the blob itself when it is an SQLite file (as side indexes were
    pushed before); IndexFormatError for anything else."""
    if blob.startswith(SQLITE_MAGIC):
        return blob
    if not blob.startswith(ZSTD_MAGIC):
        raise IndexFormatError("the side index is neither an SQLite file nor zstd-compressed")
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            plain = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise IndexFormatError(f"the side index does not decompress ({exc})") from None
    if len(plain) > limit:
        raise IndexFormatError(f"the side index decompresses to more than {limit} bytes")
    if not plain.startswith(SQLITE_MAGIC):
        raise IndexFormatError("the side index does not decompress to an SQLite file")
    return plain


def parse_gzidx(data: bytes) -> list[Checkpoint]:
    """The points of an index indexed_gzip exported (``zran.h``: a 35-byte header, 18
    bytes per point, then the windows of the points that have one); ImageError if it is
    not one."""
    try:
        magic, version, _, _, _, _, window_size, n = _GZIDX_HEADER.unpack_from(data, 0)
    except struct.error as exc:
        raise ImageError(f"not a gzip index ({exc})") from None
    if magic != b"GZIDX" or version > 1:
        raise ImageError(f"not a gzip index of a known version ({magic!r} {version})")
    at = _GZIDX_HEADER.size + n * _GZIDX_POINT.size
    points: list[Checkpoint] = []
    for i in range(n):
        coffset, uoffset, bits, has_window = _GZIDX_POINT.unpack_from(data, _GZIDX_HEADER.size + i * 18)
        window = b""
        if has_window or version == 0:
            window = data[at : at + window_size]
            at += window_size
        points.append(Checkpoint(coffset, uoffset, bits, window))
    if at != len(data):
        raise ImageError("a gzip index of the wrong length")
    return points


class SideSpool:
    """Where each chunk lies: ``ingest``'s spool for a side index. A chunk of zeros is a
    hole, as in a converted image; one seen before keeps its first place."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.layer = 0
        self._zeros = bytes(chunk_size)
        self.chunks: dict[ChunkDigest, tuple[int, int, int]] = {}
        """(layer, offset in its tar, size) per digest, in the order they came."""

    def add_chunk(self, data: bytes, at: int | None = None) -> ChunkDigest | None:
        if data == self._zeros[: len(data)]:
            return None
        if at is None:
            raise UnsupportedImageError("a GNU sparse file, which a side index cannot point into "
                                        "(convert the image instead)")
        digest = chunk_digest(data)
        self.chunks.setdefault(digest, (self.layer, at, len(data)))
        return digest

    def add_stream(self, f: IO[bytes], size: int, at: int | None = None
                   ) -> tuple[tuple[int, ChunkDigest], ...]:
        out: list[tuple[int, ChunkDigest]] = []
        for idx, pos in enumerate(range(0, size, self.chunk_size)):
            data = read_exactly(f, min(self.chunk_size, size - pos))
            digest = self.add_chunk(data, None if at is None else at + pos)
            if digest is not None:
                out.append((idx, digest))
        return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True)
class _Layer:
    digest: str
    size: int
    gzip: bool
    checkpoints: list[Checkpoint]


def build_side_index(layout_dir: Path, manifest_digest: str, out_path: Path, *,
                     chunk_size: int, spacing: int = DEFAULT_SPACING,
                     max_entries: int = MAX_ENTRIES,
                     prefetch_files: Sequence[bytes] = (), packed_path: Path | None = None
                     ) -> SideIndexResult:
    """Write the side index of the image whose manifest ``manifest_digest`` is in the OCI
    layout ``layout_dir`` (with its blobs) to ``out_path``, and what is pushed of it
    (``pack_side_index``) to ``packed_path`` when given. ImageError (or its
    Unsafe/UnsupportedImageError) for an image it cannot index."""
    if not MIN_SPACING <= spacing <= MAX_SPACING:
        raise ValueError(f"checkpoint spacing {spacing}: expected {MIN_SPACING} to {MAX_SPACING} bytes")
    layout = Layout(layout_dir)
    manifest = json.loads(layout.read_blob(check_digest(manifest_digest)))
    descs = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(descs, list) or not all(isinstance(d, dict) for d in descs):
        raise ImageError(f"manifest {manifest_digest} has no layers")
    tree = Tree(max_entries)
    spool = SideSpool(chunk_size)
    layers: list[_Layer] = []
    for number, desc in enumerate(descs):
        digest = check_digest(str(desc.get("digest", "")))
        spool.layer = number
        layers.append(_index_layer(layout.blob_path(digest), digest, tree, spool, number, spacing))
    with tempfile.TemporaryDirectory(prefix=".side-", dir=out_path.parent) as tmp:
        w = IndexWriter(chunk_size, spill=Path(tmp) / "index.work", side=True)
        try:
            w.set_meta("spacing", str(spacing))

            def pack(used: set[ChunkDigest]) -> dict[ChunkDigest, int]:
                return _pack(w, layers, spool, used)

            image_bytes, files, ids = write_tree(tree, w, pack, prefetch_files)
            w.write(out_path)
        finally:
            w.close()
    sqlite = out_path.read_bytes()
    packed = pack_side_index(sqlite)
    if packed_path is not None:
        packed_path.write_bytes(packed)
    return SideIndexResult(
        image_bytes=image_bytes, files=files, chunks=len(ids),
        checkpoints=sum(len(layer.checkpoints) for layer in layers), layers=len(layers),
        layer_bytes=sum(layer.size for layer in layers), index_bytes=len(packed), sqlite_bytes=len(sqlite))


def _index_layer(path: Path, digest: str, tree: Tree, spool: SideSpool, number: int,
                 spacing: int) -> _Layer:
    name = f"layer {digest}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror})") from exc
    if magic.startswith(ZSTD_MAGIC):
        raise UnsupportedImageError(f"{name} is zstd-compressed: a side index needs gzip or "
                                    "uncompressed layers (convert the image instead)")
    if not magic.startswith(GZIP_MAGIC):
        with open(path, "rb") as f:
            apply_tar(tree, spool, f, name, number)
        return _Layer(digest, size, False, [])
    import indexed_gzip  # here only: 7 MB that no mount and no other command needs

    try:
        with indexed_gzip.IndexedGzipFile(str(path), spacing=spacing) as gz:
            with _ReadAhead(gz) as ahead:
                apply_tar(tree, spool, cast(BinaryIO, ahead), name, number)  # read() is all it uses
                ahead.read_to_end()  # past the tar's end, if anything is
                output = ahead.total
            points = _exported(gz)
            # A read through leaves the index without its last points now and then (the
            # last megabyte of two of the benchmark's three layers); build_full_index
            # inflates the whole layer again to make them (0.6 s of 61 MB), so only then
            if not points or output - max(p.uoffset for p in points) > spacing:
                gz.build_full_index()
                points = _exported(gz)
    except (indexed_gzip.ZranError, ValueError, OSError) as exc:
        raise ImageError(f"{name}: corrupt gzip ({exc})") from exc
    # The point indexed_gzip makes at the very end of the stream has nothing after it; of
    # two at one output offset (a member's end and the next one's start) the later is kept.
    by_offset = {p.uoffset: p for p in points if p.coffset < size}
    points = sorted(by_offset.values(), key=lambda p: p.uoffset)
    return _Layer(digest, size, True, _sparse_windows(path, size, points))


def _exported(gz: Any) -> list[Checkpoint]:
    exported = io.BytesIO()
    gz.export_index(fileobj=exported)
    return parse_gzidx(exported.getvalue())


class _ReadAhead(io.RawIOBase):
    """``f`` read ahead in a thread, ``block`` bytes at a time and at most ``depth`` blocks
    ahead. indexed_gzip inflates without the GIL, so a layer inflates on one core while its
    tar is parsed and its chunks hashed on another. Closing it stops the thread and waits
    for it, so that ``f`` is the caller's alone again; what the thread raised is raised by
    the read that would have returned its bytes."""

    def __init__(self, f: IO[bytes], *, block: int = 4 << 20, depth: int = 4) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._piece = memoryview(b"")
        self._ended = False
        self.total = 0
        """Bytes read so far."""
        self._thread = threading.Thread(target=self._run, args=(f, block), name="inflate-ahead", daemon=True)
        self._thread.start()

    def _run(self, f: IO[bytes], block: int) -> None:
        while not self._stop.is_set():
            try:
                item: bytes | BaseException = f.read(block)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._piece:
            if self._ended:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if not item:
                self._ended = True
                return 0
            self._piece = memoryview(item)
        n = min(len(buffer), len(self._piece))
        buffer[:n] = self._piece[:n]
        self._piece = self._piece[n:]
        self.total += n
        return n

    def read_to_end(self) -> None:
        """Read (and drop) the rest of ``f``."""
        while self.readinto(bytearray(1 << 20)):
            pass

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # let a put it is blocked in go through
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        super().close()


_SPARSE_INPUT = 128 << 10
"""Compressed bytes after a checkpoint read to find which of its window's bytes are used:
32 KiB of output take about as much input or less (a stored block is its output and 5
bytes), so this is plenty but for odd streams, whose windows are then kept whole."""


def _sparse_windows(path: Path, size: int, points: list[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints with their windows' unused bytes zeroed (``gzspan.sparse_window``):
    a window compresses from about 14 KiB to a few hundred bytes, the larger part of a
    side index before."""
    out = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for p in points:
            if p.window:
                first = p.coffset - 1 if p.bits else p.coffset  # as the index reader cuts a span
                end = min(first + _SPARSE_INPUT, size)
                window = sparse_window(data[first:end], (8 - p.bits) % 8, p.window, to_end=end == size)
                p = dataclasses.replace(p, window=window)
            out.append(p)
    return out


def _pack(w: IndexWriter, layers: list[_Layer], spool: SideSpool,
          used: set[ChunkDigest]) -> dict[ChunkDigest, int]:
    """The blob, checkpoint and chunk rows: blob ``n + 1`` is layer ``n``."""
    point_id = 0
    for number, layer in enumerate(layers):
        w.add_blob(number + 1, layer.digest, layer.size)
        for p in layer.checkpoints:
            point_id += 1
            w.add_checkpoint(point_id, blob=number + 1, uoffset=p.uoffset, coffset=p.coffset,
                             bits=p.bits, window=zlib.compress(p.window, WINDOW_LEVEL) if p.window else b"")
    ids: dict[ChunkDigest, int] = {}
    for digest, (number, at, size) in spool.chunks.items():
        if digest in used:
            cid = ids[digest] = len(ids) + 1
            codec = CODEC_GZIP_SPAN if layers[number].gzip else CODEC_RAW
            w.add_chunk(cid, digest, blob=number + 1, offset=at, stored_size=size, size=size, codec=codec)
    return ids
