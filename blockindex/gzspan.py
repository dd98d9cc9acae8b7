"""Inflate a piece of an ordinary gzip layer from a checkpoint: how a side index reads.

A checkpoint (the zran method, after zlib's ``examples/zran.c``) is a deflate block
boundary: the bit where a block starts in the compressed layer, and the 32 KiB of output
before it (the window its back-references may reach). From there on, inflating the
compressed bytes gives the layer's tar from the checkpoint's uncompressed offset.

Python's zlib cannot start at a bit (it has no ``inflatePrime``). Shifting the bytes so
that the block starts at bit 0 is not enough: a stored block is aligned to the *byte*
boundaries of the original stream, so after a shift its length fields are read from the
wrong bits ("invalid stored block lengths" on any layer that holds incompressible data).
Instead the stream keeps its alignment and the decompressor is fed a few synthetic,
empty deflate blocks first, exactly as many bits long as the checkpoint lies into its
byte: those bits plus the original bytes from the checkpoint's byte on are one valid raw
deflate stream, whose output (after the window, given as ``zdict``) is the layer's from the
checkpoint. The empty blocks: a fixed-Huffman block with only its end code (10 bits), and a
dynamic-Huffman block whose literal code has the end code alone (92 bits with 18 code
length codes, 95 with 19), so every residue 0-7 is reached (``PRIMERS``).

A span that runs past the end of a gzip member (layers of concatenated members) goes on
into the next member, its trailer skipped and header read by zlib.
"""

from __future__ import annotations

import dataclasses
import zlib

WINDOW = 32768
_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


class SpanError(ValueError):
    """Compressed bytes that do not inflate to the span the index describes."""


@dataclasses.dataclass(frozen=True, slots=True)
class GzipSpan:
    """Where a chunk's bytes lie in a gzip layer, relative to the fetched compressed bytes:
    the checkpoint starts ``bits`` bits into the first fetched byte (0-7), its window is
    ``window`` (zlib-compressed, empty at the start of a member), and the chunk starts
    ``skip`` bytes of output after the checkpoint."""

    bits: int
    skip: int
    window: bytes = dataclasses.field(repr=False)


class _Bits:
    """A deflate bit stream being written, least significant bit first."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def put(self, value: int, nbits: int) -> None:
        """``nbits`` bits of ``value``, low bit first (header fields, extra bits)."""
        self.value |= value << self.count
        self.count += nbits

    def code(self, code: int, length: int) -> None:
        """A Huffman code, its most significant bit first."""
        for i in reversed(range(length)):
            self.put((code >> i) & 1, 1)


def _empty_fixed(out: _Bits) -> None:
    out.put(0, 1)  # BFINAL = 0
    out.put(1, 2)  # BTYPE = 01, fixed Huffman
    out.code(0, 7)  # end of block: symbol 256's fixed code is 0000000


def _empty_dynamic(out: _Bits, nclen: int) -> None:
    """A dynamic block whose literal/length code has one symbol, the end code (zlib takes
    an incomplete code of one length-1 symbol), and no distance code."""
    out.put(0, 1)
    out.put(2, 2)  # BTYPE = 10, dynamic Huffman
    out.put(0, 5)  # HLIT: 257 literal/length lengths
    out.put(0, 5)  # HDIST: 1 distance length
    out.put(nclen - 4, 4)  # HCLEN
    lengths = {18: 1, 0: 2, 1: 2}  # code length codes: 18 -> 0, 0 -> 10, 1 -> 11
    for sym in _CL_ORDER[:nclen]:
        out.put(lengths.get(sym, 0), 3)
    out.code(0, 1)
    out.put(138 - 11, 7)  # 138 zero lengths
    out.code(0, 1)
    out.put(118 - 11, 7)  # 118 more: literals 0-255 have no code
    out.code(0b11, 2)  # symbol 256 (end of block): length 1
    out.code(0b10, 2)  # the one distance length: 0
    out.code(0, 1)  # the block's data: its end code


def _primer(residue: int) -> tuple[bytes, int]:
    out = _Bits()
    if residue % 2:
        _empty_dynamic(out, 19)  # 95 bits: 7 mod 8
        fixed = ((residue - 7) % 8) // 2
    else:
        fixed = residue // 2
    for _ in range(fixed):
        _empty_fixed(out)  # 10 bits: 2 mod 8
    assert out.count % 8 == residue
    return out.value.to_bytes((out.count + 7) // 8, "little"), residue


PRIMERS: dict[int, tuple[bytes, int]] = {r: _primer(r) for r in range(8)}
"""Per residue r: empty deflate blocks whose length in bits is r mod 8 (their last byte
holds r bits), and r."""


def stream_from(payload: bytes | memoryview, bits: int) -> bytes:
    """A raw deflate stream that starts at bit ``bits`` of ``payload``'s first byte: the
    primer for that residue, its last partial byte completed by ``payload``'s high bits."""
    if bits == 0:
        return bytes(payload)
    primer, _ = PRIMERS[bits]
    first = payload[0] & (0xFF << bits) & 0xFF
    return primer[:-1] + bytes([primer[-1] | first]) + bytes(payload[1:])


def inflate_span(payload: bytes | memoryview, span: GzipSpan, size: int) -> bytes:
    """The ``size`` bytes ``span.skip`` bytes after the checkpoint at the start of
    ``payload``; SpanError if the bytes do not give them."""
    try:
        window = zlib.decompress(span.window) if span.window else b""
    except zlib.error as exc:
        raise SpanError(f"the checkpoint's window does not inflate ({exc})") from None
    if len(window) > WINDOW:
        raise SpanError("the checkpoint's window is larger than 32 KiB")
    want = span.skip + size
    parts: list[bytes] = []
    got = 0
    d = zlib.decompressobj(wbits=-15, zdict=window) if window else zlib.decompressobj(wbits=-15)
    data = stream_from(payload, span.bits)
    try:
        while True:
            piece = d.decompress(data, want - got)
            parts.append(piece)
            got += len(piece)
            if got >= want:
                break
            if d.unconsumed_tail:
                data = d.unconsumed_tail
                continue
            if not d.eof:
                raise SpanError(f"the compressed bytes end {want - got} bytes short")
            rest = d.unused_data[8:]  # past the member's trailer (CRC-32, ISIZE)
            if not rest:
                raise SpanError(f"the gzip stream ends {want - got} bytes short")
            d, data = zlib.decompressobj(wbits=31), rest  # the next member, header and all
    except zlib.error as exc:
        raise SpanError(f"the compressed bytes do not inflate ({exc})") from None
    out = b"".join(parts)
    return out[span.skip : want]
