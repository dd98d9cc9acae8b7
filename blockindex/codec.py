"""Chunk encoding: lz4 or zstd compression and BLAKE3 naming, in one place.

zstd's compressor and decompressor objects hold a context that is not thread-safe and
costs to make (``ZstdDecompressor()`` 20-75 us, against about 10 us to decode a 4 KiB
chunk with one already made), while chunks are decoded both on the trio thread and in worker
threads: each thread keeps its own, made on first use.
"""

from __future__ import annotations

import hashlib
import threading

import blake3
import lz4.block
import zstandard

from .format import CODEC_GZIP_MEMBER, CODEC_GZIP_SPAN, CODEC_LZ4, CODEC_RAW, CODEC_ZSTD, Chunk, ChunkDigest
from .gzspan import SpanError, inflate_member, inflate_span

COMPRESSIONS = {"lz4": CODEC_LZ4, "zstd": CODEC_ZSTD}
"""What ``lazyfs convert --compression`` offers, and the codec each writes."""

# Levels measured on the chunks of the benchmark's Debian image (246 MiB in 8,039 chunks of
# 1 MiB; gzip layers 90.4 MiB, lz4 126.4 MiB), CPU seconds per GiB of chunk bytes on a busy
# 2-core machine:   level 1: 97.1 MiB, encode 3.8, decode 1.15
#                   level 3: 91.2 MiB, encode 5.8, decode 1.25
#                   level 6: 87.0 MiB, encode 17.7, decode 1.5 (lz4 decodes at 0.54)
# Decoding costs about the same at every level; a higher one only trades convert time for
# bytes. Level 3 (zstd's default) already stores what the gzip layers do; level 6 saves
# 4.6% more for three times the convert CPU. The quick image agrees (ratios 0.42, 0.39,
# 0.37 against lz4's 0.54).
ZSTD_LEVEL = 3
KEEP_RATIO = 0.97
"""A chunk is stored raw unless compression saves at least 3%."""

_local = threading.local()


class ChunkDecodeError(ValueError):
    """Stored chunk bytes do not decode to what the index says they are."""


def chunk_digest(data: bytes | memoryview) -> ChunkDigest:
    return ChunkDigest(blake3.blake3(data).digest())


def named_by(data: bytes | memoryview, digest: bytes) -> bool:
    """Whether ``digest`` names ``data``: its BLAKE3 digest, or (an eStargz chunk's, format
    4) its sha256. Both are 256-bit: no bytes have one's digest as the other's."""
    return chunk_digest(data) == digest or hashlib.sha256(data).digest() == digest


def encode(data: bytes, *, codec: int = CODEC_LZ4) -> tuple[int, bytes]:
    """``(codec, payload)``: ``data`` compressed with ``codec`` where that saves at least
    3%, the bytes as they are (``CODEC_RAW``) otherwise."""
    if codec == CODEC_LZ4:
        packed = lz4.block.compress(data, store_size=False)
    elif codec == CODEC_ZSTD:
        compressor = getattr(_local, "zstd_c", None)
        if compressor is None:
            compressor = _local.zstd_c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        packed = compressor.compress(data)  # the frame records its content size
    else:
        raise ValueError(f"cannot encode with codec {codec}")
    if len(packed) < len(data) * KEEP_RATIO:
        return codec, packed
    return CODEC_RAW, bytes(data)


def decode(codec: int, size: int, payload: bytes | memoryview) -> bytes | memoryview:
    """The uncompressed bytes of a payload; ChunkDecodeError if it does not decode to
    exactly ``size`` bytes. A raw payload comes back as it is, without a copy."""
    if codec == CODEC_LZ4:
        try:
            data = lz4.block.decompress(payload, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise ChunkDecodeError(f"lz4 payload does not decode: {exc}") from exc
    elif codec == CODEC_ZSTD:
        data = _zstd_decode(payload, size)
    elif codec == CODEC_RAW:
        data = payload
    elif codec in (CODEC_GZIP_SPAN, CODEC_GZIP_MEMBER):
        raise ChunkDecodeError("a gzip span or member decodes only with its index (decode_verified)")
    else:
        raise ChunkDecodeError(f"unknown codec {codec}")
    if len(data) != size:
        raise ChunkDecodeError(f"decodes to {len(data)} bytes, expected {size}")
    return data


def _zstd_decode(payload: bytes | memoryview, size: int) -> bytes:
    # The frame header says how much to allocate: a payload from a peer or a registry is
    # untrusted, so it must say ``size`` before anything is allocated.
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise ChunkDecodeError(f"zstd payload does not decode: {exc}") from exc
    if declared != size:
        raise ChunkDecodeError(f"zstd frame declares {declared} bytes, expected {size}")
    decompressor = getattr(_local, "zstd_d", None)
    if decompressor is None:
        decompressor = _local.zstd_d = zstandard.ZstdDecompressor()
    try:
        return decompressor.decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ChunkDecodeError(f"zstd payload does not decode: {exc}") from exc


def check_plain(chunk: Chunk, data: bytes | memoryview) -> bytes | memoryview:
    """``data``, the plain bytes of ``chunk`` from elsewhere (a peer's answer for a chunk
    whose stored form only its index decodes), once they are its ``size`` and match its
    digest by the chunk's own function (an eStargz member's, sha256; else BLAKE3);
    ChunkDecodeError if not."""
    if len(data) != chunk.size:
        raise ChunkDecodeError(f"{len(data)} bytes, expected {chunk.size}")
    if chunk.codec == CODEC_GZIP_MEMBER:
        if hashlib.sha256(data).digest() != chunk.digest:
            raise ChunkDecodeError("sha256 digest mismatch")
    elif chunk_digest(data) != chunk.digest:
        raise ChunkDecodeError("BLAKE3 digest mismatch")
    return data


def decode_verified(chunk: Chunk, payload: bytes | memoryview) -> bytes | memoryview:
    """Decode a payload that came from elsewhere and check it against the chunk's digest
    (BLAKE3; an eStargz member's, sha256)."""
    if chunk.codec == CODEC_GZIP_MEMBER:
        try:
            return check_plain(chunk, inflate_member(payload, chunk.size))
        except SpanError as exc:
            raise ChunkDecodeError(str(exc)) from exc
    if chunk.codec == CODEC_GZIP_SPAN:
        if chunk.span is None:
            raise ChunkDecodeError("a gzip span without its checkpoint")
        try:
            data: bytes | memoryview = inflate_span(payload, chunk.span, chunk.size)
        except SpanError as exc:
            raise ChunkDecodeError(str(exc)) from exc
    else:
        data = decode(chunk.codec, chunk.size, payload)
    return check_plain(chunk, data)
