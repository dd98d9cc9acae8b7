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

An eStargz chunk needs none of this: it starts a gzip member of its own, which inflates
without a window (``inflate_member``).
"""

from __future__ import annotations

import dataclasses
import sys
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
    ``skip`` bytes of output after the checkpoint, which is at ``point`` in the layer's
    tar (so the chunk at ``point + skip``)."""

    bits: int
    skip: int
    window: bytes = dataclasses.field(repr=False)
    point: int = 0


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


class SpanInflater:
    """The output of a gzip layer from a checkpoint on, inflated only as far as asked:
    the chunks of one fetched range come out of one inflate, each reader waiting only for
    the output up to its own chunk's end (``fetcher.spans``).

        inflater = SpanInflater(payload, bits, window)   # SpanError: a bad window
        inflater.upto(n)       # inflate until there are n bytes of output (or no more)
        inflater.read(a, b)    # output bytes [a, b), once upto(b) reached b

    Once the bytes stop inflating (corrupt, or at their end), ``error`` says why and the
    output so far stays readable."""

    def __init__(self, payload: bytes | memoryview, bits: int, window: bytes, *, plain_window: bool = False
                 ) -> None:
        try:
            plain = window if plain_window else zlib.decompress(window) if window else b""
        except zlib.error as exc:
            raise SpanError(f"the checkpoint's window does not inflate ({exc})") from None
        if len(plain) > WINDOW:
            raise SpanError("the checkpoint's window is larger than 32 KiB")
        self._d = zlib.decompressobj(wbits=-15, zdict=plain) if plain else zlib.decompressobj(wbits=-15)
        self._data = stream_from(payload, bits)
        self._out = bytearray()
        self.error: SpanError | None = None
        self.ended = False
        """Whether the output stopped at the end of the last gzip member, not on bad bytes."""

    def upto(self, want: int) -> int:
        """Inflate until the output is ``want`` bytes long (never much further) or the
        bytes end or fail (``error``); the output's length."""
        try:
            while len(self._out) < want and self.error is None:
                piece = self._d.decompress(self._data, want - len(self._out))
                self._out += piece
                if len(self._out) >= want:
                    self._data = self._d.unconsumed_tail
                    break
                if self._d.unconsumed_tail:
                    self._data = self._d.unconsumed_tail
                    continue
                if not self._d.eof:
                    self.error = SpanError(f"the compressed bytes end {want - len(self._out)} bytes short")
                    break
                rest = self._d.unused_data[8:]  # past the member's trailer (CRC-32, ISIZE)
                if not rest:
                    self.ended = True
                    self.error = SpanError(f"the gzip stream ends {want - len(self._out)} bytes short")
                    break
                self._d, self._data = zlib.decompressobj(wbits=31), rest  # the next member, header and all
        except zlib.error as exc:
            self.error = SpanError(f"the compressed bytes do not inflate ({exc})")
        return len(self._out)

    def read(self, start: int, end: int) -> bytes:
        """Output bytes ``[start, end)`` (a copy: the output may still grow)."""
        return bytes(self._out[start:end])


_HIGH = b"".join(bytes([k]) * 256 for k in range(WINDOW // 256))  # k < 128: never the high bit
_LOW = bytes(range(256)) * (WINDOW // 256)
_FLIPPED = _LOW.translate(bytes(k ^ 0xFF for k in range(256)))


def sparse_window(payload: bytes | memoryview, bits: int, window: bytes, *, to_end: bool) -> bytes:
    """``window`` (plain) with every byte zeroed that the layer's output after the checkpoint
    never reads, so that it compresses to little; the whole window if that cannot be shown.

    A deflate back-reference reaches at most 32 KiB back, so only the first 32 KiB of
    output after a checkpoint can read its window, and they read few of its bytes (on the
    benchmark's Debian layers, a tenth: most references are short). Which ones is
    found by inflating those 32 KiB (from ``payload``, ``bits`` as ``SpanInflater`` takes
    them) with three marker windows in place of the real one, the low byte of each
    position, that byte inverted, and its high byte: an output byte that differs between
    the first two was copied from the window (a literal is the same in both), from the
    position the first and third give. The result is then checked: inflated with it, the
    first 32 KiB of output are the real window's, byte for byte, or the whole window is
    returned. ``to_end``: ``payload`` runs to the end of the layer, so output short of 32
    KiB that ends with the gzip stream is all there is; any other short output (bytes
    that do not inflate, or too few of them) keeps the whole window."""
    n = len(window)
    if n == 0:
        return window

    def first(w: bytes) -> bytes:
        inflater = SpanInflater(payload, bits, w, plain_window=True)
        if inflater.upto(WINDOW) < WINDOW and not (to_end and inflater.ended):
            raise SpanError("short of 32 KiB before the end")  # bytes that do not inflate, or too few
        return inflater.read(0, WINDOW)

    try:
        real = first(window)
        low, flipped, high = first(_LOW[:n]), first(_FLIPPED[:n]), first(_HIGH[:n])
    except SpanError:
        return window
    if not len(real) == len(low) == len(flipped) == len(high):
        return window
    size = len(low)
    ones = (1 << 8 * size) - 1
    copied = int.from_bytes(low, "little") ^ int.from_bytes(flipped, "little")  # 0xFF where copied
    # the position each output byte was copied from, as 16-bit numbers; the bytes not copied
    # get the high bit set, which takes them past any window
    marked = int.from_bytes(high, "little") | (~copied & ones & int.from_bytes(b"\x80" * size, "little"))
    pairs = bytearray(2 * size)
    lo, hi = (0, 1) if sys.byteorder == "little" else (1, 0)  # as "H" reads them here
    pairs[lo::2] = low
    pairs[hi::2] = marked.to_bytes(size, "little")
    sparse = bytearray(n)
    for at in set(memoryview(pairs).cast("H")):
        if at < n:
            sparse[at] = window[at]
    return bytes(sparse) if first(bytes(sparse)) == real else window


def inflate_span(payload: bytes | memoryview, span: GzipSpan, size: int) -> bytes:
    """The ``size`` bytes ``span.skip`` bytes after the checkpoint at the start of
    ``payload``; SpanError if the bytes do not give them."""
    inflater = SpanInflater(payload, span.bits, span.window)
    want = span.skip + size
    if inflater.upto(want) < want:
        assert inflater.error is not None
        raise inflater.error
    return inflater.read(span.skip, want)


def inflate_member(payload: bytes | memoryview, size: int) -> bytes:
    """The first ``size`` bytes that the gzip member at the start of ``payload`` inflates to
    (an eStargz chunk: what follows them in the member, or in later members, is not
    inflated); SpanError if it does not give them."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(payload, size)
    except zlib.error as exc:
        raise SpanError(f"the gzip member does not inflate ({exc})") from None
    if len(out) < size:
        raise SpanError(f"the gzip member inflates to {len(out)} bytes, expected {size}")
    return out
