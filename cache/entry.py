"""The bytes of one cache entry: a chunk's plain bytes behind a header of checksums.

    magic "LZC2" | block size (u32) | chunk size (u64)
    xxh3-64 of each block (u64 each; blocks of BLOCK_SIZE, the last one short)
    xxh3-64 of the header so far (u64)
    the plain bytes: block k at header_size + k * block size

A read checks only the blocks it touches (``check_blocks``); ``check_entry`` checks a
whole entry. ``cache.store`` keeps entries on disk; this module only knows their bytes.
"""

from __future__ import annotations

import struct

import xxhash

HEAD = struct.Struct("<4sIQ")  # magic, block size, chunk size
SUM = struct.Struct("<Q")
MAGIC = b"LZC2"
OLD_MAGIC = b"LZC1"

BLOCK_SIZE = 64 << 10
"""Bytes per checked block: a read checks the blocks it touches, no more."""

FIRST_READ = 4096
"""Bytes read first from an entry: its header (up to 500 blocks) and, for a small chunk,
all of its bytes in the same ``pread``."""


def entry_size(size: int, block: int = BLOCK_SIZE) -> int:
    """Bytes on disk of the whole entry of a chunk of ``size`` plain bytes."""
    return HEAD.size + SUM.size * (blocks(size, block) + 1) + size


def pack_header(plain: bytes | memoryview, block: int = BLOCK_SIZE) -> bytes:
    """The header of the entry of ``plain``: sizes, a checksum per block, its own checksum."""
    view = memoryview(plain)
    sums = [xxhash.xxh3_64_intdigest(view[at : at + block]) for at in range(0, max(len(view), 1), block)]
    head = HEAD.pack(MAGIC, block, len(view)) + struct.pack(f"<{len(sums)}Q", *sums)
    return head + SUM.pack(xxhash.xxh3_64_intdigest(head))


def check_entry(data: bytes) -> str | None:
    """What is wrong with the bytes of an entry file (header, length, a block's xxh3), or
    None."""
    return _check_whole(data)


def entry_plain(data: bytes) -> memoryview:
    """The plain bytes of an entry that ``check_entry`` passed."""
    return memoryview(data)[head_size(data) :]


OLD_FORMAT = "of the earlier cache format"


def blocks(size: int, block: int) -> int:
    return max(-(-size // block), 1)


def head_size(data: bytes | bytearray) -> int:
    _, block, size = HEAD.unpack_from(data)
    return HEAD.size + SUM.size * (blocks(size, block) + 1)


def parse_head(head: bytes | bytearray) -> tuple[str | None, int, int, int]:
    """``(problem, where the plain bytes start, block size, chunk size)`` from the first
    bytes of an entry (at least its whole header)."""
    if len(head) < HEAD.size + 2 * SUM.size:
        return ("truncated" if head[:4] != OLD_MAGIC else OLD_FORMAT), 0, 0, 0
    magic, block, size = HEAD.unpack_from(head)
    if magic != MAGIC:
        return (OLD_FORMAT if magic == OLD_MAGIC else "not a chunk entry"), 0, 0, 0
    if block == 0 or size > 1 << 40:
        return "corrupt (header)", 0, 0, 0
    at = head_size(head)
    if len(head) < at:
        return "truncated", 0, 0, 0
    (own,) = SUM.unpack_from(head, at - SUM.size)
    if xxhash.xxh3_64_intdigest(memoryview(head)[: at - SUM.size]) != own:
        return "corrupt (header checksum mismatch)", 0, 0, 0
    return None, at, block, size


def check_blocks(head: bytes | bytearray, data: memoryview, first: int, block: int) -> str | None:
    """Check ``data``, the bytes of blocks ``first``, ``first + 1``... against the
    checksums in ``head``."""
    for i, at in enumerate(range(0, len(data), block)):
        (want,) = SUM.unpack_from(head, HEAD.size + SUM.size * (first + i))
        if xxhash.xxh3_64_intdigest(data[at : at + block]) != want:
            return f"corrupt (checksum mismatch in block {first + i})"
    return None


def _check_whole(data: bytes) -> str | None:
    problem, at, block, size = parse_head(data)
    if problem is not None:
        return problem
    if len(data) != at + size:
        return "truncated" if len(data) < at + size else "too long"
    return check_blocks(data, memoryview(data)[at:], 0, block)
