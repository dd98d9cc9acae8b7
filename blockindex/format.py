"""The on-disk format of a block index, shared by the writer and the reader.

An index is one SQLite database (the CernVM-FS catalog idea): lookups are O(log n)
without loading the tree, so a 100,000-file image mounts at once. It is pinned by the
sha256 digest of its bytes in the image manifest, and written with ``VACUUM INTO`` so the
same input gives a byte-identical file.

Regular file contents are cut into fixed-size chunks (``chunk_size`` in ``meta``): chunk
``idx`` of a file covers bytes ``[idx * chunk_size, min(size, (idx + 1) * chunk_size))``.
A chunk of zeros is not stored; its extent row is absent and it reads as a hole. Each
stored chunk is named by the BLAKE3 digest of its uncompressed bytes and lives at
``offset`` in blob ``blob``, compressed with ``codec``: ``CODEC_RAW``, ``CODEC_LZ4`` (an
lz4 block without size prefix) or ``CODEC_ZSTD`` (one zstd frame that records its content
size), each decompressed to ``size`` bytes.

The ``format`` meta entry says which codecs an index may use: format 1 has raw and lz4,
format 2 adds zstd. A converter writes the lowest format that has every codec it used, so
an lz4 image stays readable by every lazyfs, and a lazyfs that predates zstd refuses a
zstd image at open ("index format '2', expected '1'") instead of finding an unknown codec
in the middle of a read.

Format 3 is a *side index* (``sideindex.py``): the index of an ordinary image that nobody
converted, whose chunks are read from the image's own layers. It adds the table
``checkpoints`` and the codec ``CODEC_GZIP_SPAN``: such a chunk's ``offset`` is where it
starts in its layer's uncompressed tar (``blob`` is the gzip layer), ``stored_size`` equals
``size``, and its bytes are inflated from the last checkpoint at or before it (``gzspan.py``);
a chunk of an uncompressed layer is ``CODEC_RAW`` at its offset in the tar.

Format 4 is the index of an eStargz image (``estargz.py``), built on the node from the
layers' tables of contents and never published. Its one codec, ``CODEC_GZIP_MEMBER``: the
chunk's stored bytes are the gzip member(s) of an eStargz layer from the member that starts
with the chunk to the next member the TOC names; the chunk is the first ``size`` bytes they
inflate to, and its digest is the sha256 of those bytes (the TOC's ``chunkDigest``: an eStargz
chunk can be named only by what its TOC says of it before it is fetched), not BLAKE3.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple, NewType

if TYPE_CHECKING:
    from .gzspan import GzipSpan

FORMAT_VERSION = "1"
"""The format of an index of raw and lz4 chunks, the default; see ``format_for``."""
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20

CODEC_RAW = 0
CODEC_LZ4 = 1
CODEC_ZSTD = 2
CODEC_GZIP_SPAN = 3
CODEC_GZIP_MEMBER = 4
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_LZ4: "lz4", CODEC_ZSTD: "zstd", CODEC_GZIP_SPAN: "gzip-span",
               CODEC_GZIP_MEMBER: "gzip-member"}
SIDE_FORMAT_VERSION = "3"
ESTARGZ_FORMAT_VERSION = "4"
CODECS_OF_FORMAT: dict[str, frozenset[int]] = {
    "1": frozenset({CODEC_RAW, CODEC_LZ4}),
    "2": frozenset({CODEC_RAW, CODEC_LZ4, CODEC_ZSTD}),
    SIDE_FORMAT_VERSION: frozenset({CODEC_RAW, CODEC_GZIP_SPAN}),
    ESTARGZ_FORMAT_VERSION: frozenset({CODEC_GZIP_MEMBER}),
}
"""The codecs each index format version may use; the versions this lazyfs reads."""
CODECS = frozenset({CODEC_RAW, CODEC_LZ4, CODEC_ZSTD})
"""Every codec a payload can be decoded from by itself (cache entries and peers' answers
carry one of them); a gzip span needs its checkpoint too, which only the index has, and a
gzip member is checked by its sha256 (format 4)."""

ROOT_INO = 1


def format_for(codecs: set[int] | frozenset[int]) -> str:
    """The lowest format version of a converted image whose codecs include all of
    ``codecs`` (a side index is always ``SIDE_FORMAT_VERSION``, an eStargz index
    ``ESTARGZ_FORMAT_VERSION``)."""
    for version, allowed in sorted(CODECS_OF_FORMAT.items(), key=lambda kv: int(kv[0])):
        if version in (SIDE_FORMAT_VERSION, ESTARGZ_FORMAT_VERSION):
            continue
        if codecs <= allowed:
            return version
    raise ValueError(f"no index format has codecs {sorted(codecs)}")


InodeT = NewType("InodeT", int)
ChunkDigest = NewType("ChunkDigest", bytes)  # 32 raw bytes of BLAKE3 (sha256: CODEC_GZIP_MEMBER)

# Media types of the layers in the OCI manifest of a converted image. containerd (1.6,
# images.IsLayerType) treats only ``application/vnd.oci.image.layer.*`` (and Docker's layer
# types) as layers: only layers go to its unpacker, whose Prepare carries the remote-snapshot
# labels (``containerd.io/snapshot.ref``, the CRI image and layer labels) that let the
# snapshotter answer "already there"; anything else is downloaded whole as a plain blob. So
# ours live in that family, the old ``application/vnd.`` names with ``oci.image.layer.``
# inserted. The base type (before any ``+``) is deliberately not ``...layer.v1.tar`` and not
# ``...layer.nondistributable...``: should containerd ever try to unpack one itself (a pull
# without labels), its differ finds no stream processor for it ("no processor for
# media-type") instead of reading a SQLite file or lz4 chunks as a tar; and it is never
# skipped as non-distributable.
MEDIA_TYPE_INDEX = "application/vnd.oci.image.layer.lazyfs.index.v1.sqlite"
MEDIA_TYPE_CHUNKS = "application/vnd.oci.image.layer.lazyfs.chunks.v1"
# What images converted before that change carry; still read (mount, images).
LEGACY_MEDIA_TYPE_INDEX = "application/vnd.lazyfs.index.v1.sqlite"
LEGACY_MEDIA_TYPE_CHUNKS = "application/vnd.lazyfs.chunks.v1"
BLOCK_INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_INDEX, LEGACY_MEDIA_TYPE_INDEX})
"""The layer holding a lazy image's block index, current and legacy (not an OCI image
index: ``fetcher.manifests.IMAGE_INDEX_MEDIA_TYPES``)."""
ARTIFACT_ANNOTATION = "io.lazyfs.image"  # value: FORMAT_VERSION; marks a lazy image
MEDIA_TYPE_SIDE_INDEX = "application/vnd.lazyfs.side-index.v1.sqlite"
"""The artifact type (and layer type) of a side index attached to an ordinary image."""

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE inodes (
    ino INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    rdev INTEGER NOT NULL,
    target BLOB
);
CREATE TABLE dirents (
    parent INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (parent, pos)
) WITHOUT ROWID;
CREATE UNIQUE INDEX dirents_by_name ON dirents (parent, name);
CREATE TABLE xattrs (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE blobs (id INTEGER PRIMARY KEY, digest TEXT NOT NULL UNIQUE, size INTEGER NOT NULL);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    blob INTEGER NOT NULL REFERENCES blobs (id),
    offset INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    size INTEGER NOT NULL,
    codec INTEGER NOT NULL
);
CREATE TABLE extents (
    ino INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    chunk INTEGER NOT NULL REFERENCES chunks (id),
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
"""


SIDE_SCHEMA = """
CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY,
    blob INTEGER NOT NULL REFERENCES blobs (id),
    uoffset INTEGER NOT NULL,
    coffset INTEGER NOT NULL,
    bits INTEGER NOT NULL,
    window BLOB NOT NULL
);
CREATE UNIQUE INDEX checkpoints_by_offset ON checkpoints (blob, uoffset);
"""
"""What a side index adds: deflate block boundaries of its gzip layers, each at
``uoffset`` in the layer's tar, starting ``bits`` bits (0-7) into byte ``coffset`` of the
compressed blob, after the output ``window`` (zlib-compressed; empty at a member's start)."""


class Inode(NamedTuple):
    """The attributes of one inode, as lstat would report them. A named tuple rather
    than a frozen dataclass: a walk builds one per directory entry, and a tuple is built
    several times faster."""

    ino: InodeT
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: int


@dataclasses.dataclass(frozen=True, slots=True)
class Blob:
    """A blob of packed chunks, fetched by its OCI digest (``sha256:<hex>``)."""

    id: int
    digest: str
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """One stored chunk: where its compressed bytes lie and how to check them."""

    digest: ChunkDigest
    blob: Blob
    offset: int
    stored_size: int
    size: int
    codec: int
    span: GzipSpan | None = dataclasses.field(default=None, compare=False)
    """For ``CODEC_GZIP_SPAN``: how to inflate the chunk from its stored bytes, which are
    then the compressed range from its checkpoint to the next one past its end."""

    @property
    def hexdigest(self) -> str:
        return self.digest.hex()


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """A piece of a read: ``length`` bytes at ``file_offset``, found at ``chunk_offset``
    within ``chunk`` (or zeros when ``chunk`` is None: a hole)."""

    file_offset: int
    length: int
    chunk: Chunk | None
    chunk_offset: int
