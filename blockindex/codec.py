"""Chunk encoding: lz4 block compression and BLAKE3 naming, in one place."""

from __future__ import annotations

import blake3
import lz4.block

from .format import CODEC_LZ4, CODEC_RAW, Chunk, ChunkDigest


class ChunkDecodeError(ValueError):
    """Stored chunk bytes do not decode to what the index says they are."""


def chunk_digest(data: bytes | memoryview) -> ChunkDigest:
    return ChunkDigest(blake3.blake3(data).digest())


def encode(data: bytes, *, keep_ratio: float = 0.97) -> tuple[int, bytes]:
    """``(codec, payload)``: lz4 where it saves at least 3%, the bytes as they are otherwise."""
    packed = lz4.block.compress(data, store_size=False)
    if len(packed) < len(data) * keep_ratio:
        return CODEC_LZ4, packed
    return CODEC_RAW, bytes(data)


def decode(codec: int, size: int, payload: bytes | memoryview) -> bytes | memoryview:
    """The uncompressed bytes of a payload; ChunkDecodeError if it does not decode to
    exactly ``size`` bytes. A raw payload comes back as it is, without a copy."""
    if codec == CODEC_LZ4:
        try:
            data = lz4.block.decompress(payload, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise ChunkDecodeError(f"lz4 payload does not decode: {exc}") from exc
    elif codec == CODEC_RAW:
        data = payload
    else:
        raise ChunkDecodeError(f"unknown codec {codec}")
    if len(data) != size:
        raise ChunkDecodeError(f"decodes to {len(data)} bytes, expected {size}")
    return data


def decode_verified(chunk: Chunk, payload: bytes | memoryview) -> bytes | memoryview:
    """Decode a payload that came from elsewhere and check it against the chunk's digest."""
    data = decode(chunk.codec, chunk.size, payload)
    if chunk_digest(data) != chunk.digest:
        raise ChunkDecodeError("BLAKE3 digest mismatch")
    return data
