"""The chunks of a fetched range of a gzip layer, out of one inflate.

A side index's chunk of a gzip layer is stored as the compressed span from the checkpoint
before it to the one after it (``blockindex.gzspan``), so the chunks of one span share
their stored bytes. A range fetched for some of them is inflated once, from the
checkpoint it starts at, and every chunk of the range is cut out of that output and
checked against its digest (``verify.verify_range``): a range of n chunks of one span
costs one inflate, not n. The output is made only as far as the chunk being checked
ends, so the reader of the first chunk of a span waits for that much alone; the chunks
after it (the span's others, checked after the reader's) continue the same inflate.

Bytes that do not inflate, or give a chunk the wrong digest, spoil only the output from
them on: a chunk past them that starts at a checkpoint of its own after the range's first
is inflated again from that checkpoint alone, so that it fails only if its own bytes are
bad.

    with_mates(rng, mates, free)     a planned range and the other chunks it brings
    inflated = InflatedRange(rng, data)
    plain = inflated.plain(c)        # ChunkDecodeError if not the chunk's bytes
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from blockindex.codec import ChunkDecodeError, chunk_digest, decode_verified
from blockindex.format import CODEC_GZIP_SPAN, Chunk
from blockindex.gzspan import SpanError, SpanInflater

from .plan import Range


def is_gzip(rng: Range) -> bool:
    """Whether ``rng`` holds chunks of a gzip layer (a range is of one blob: all or none)."""
    return bool(rng.chunks) and rng.chunks[0].codec == CODEC_GZIP_SPAN


def with_mates(rng: Range, mates: Iterable[Chunk], free: Callable[[Chunk], bool]) -> Range:
    """``rng`` with the ``mates`` (chunks whose stored bytes lie within it, as the index's
    ``chunks_within`` finds them) that are ``free`` (neither cached nor in flight) as
    neighbours: the same bytes give them, so they cost one inflate and no request."""
    have = {c.digest for c in rng.chunks}
    extra: list[Chunk] = []
    for c in mates:
        if (c.digest not in have and rng.start <= c.offset and c.offset + c.stored_size <= rng.end
                and free(c)):
            have.add(c.digest)
            extra.append(c)
    if not extra:
        return rng
    return Range(rng.blob, rng.start, rng.end, rng.chunks + tuple(extra), rng.neighbours + len(extra))


class InflatedRange:
    """The output of one fetched range (``data``, the bytes of ``rng``) of a gzip layer,
    inflated as its chunks are asked for. Not for concurrent use: the parts of a range
    are checked one after the other (``plan.asked_first``)."""

    def __init__(self, rng: Range, data: bytes | bytearray | memoryview) -> None:
        self._start = rng.start
        self._view = memoryview(data)
        first = min(rng.chunks, key=lambda c: c.offset)
        self._first = first if first.offset == rng.start and first.span is not None else None
        self._inflater: SpanInflater | None = None

    def plain(self, c: Chunk) -> bytes | memoryview:
        """The checked plain bytes of chunk ``c`` of the range; ChunkDecodeError if the
        range's bytes do not give them."""
        span, first = c.span, self._first
        if span is None or c.codec != CODEC_GZIP_SPAN:
            return self._alone(c)
        if first is None or first.span is None:
            return self._alone(c)
        at = span.point + span.skip - first.span.point
        inflater = self._inflate()
        if inflater is not None and at >= 0 and inflater.upto(at + c.size) >= at + c.size:
            data = inflater.read(at, at + c.size)
            if chunk_digest(data) == c.digest:
                return data
        if c.offset == self._start:  # its own checkpoint is the range's: it would come out the same
            why = inflater.error if inflater is not None and inflater.error else "BLAKE3 digest mismatch"
            raise ChunkDecodeError(str(why))
        return self._alone(c)

    def _inflate(self) -> SpanInflater | None:
        """The range's inflater, made at the first chunk asked for (None: a bad window)."""
        if self._inflater is None and self._first is not None:
            span = self._first.span
            assert span is not None
            try:
                self._inflater = SpanInflater(self._view, span.bits, span.window)
            except SpanError:
                self._first = None
        return self._inflater

    def _alone(self, c: Chunk) -> bytes | memoryview:
        """``c`` from its own stored bytes (its own checkpoint on), as any chunk."""
        at = c.offset - self._start
        return decode_verified(c, self._view[at : at + c.stored_size])
