"""Check a side index against one whole layer, read from its first byte.

A side index names each chunk's digest and, for a gzip layer, the checkpoints it is read
from, each with the 32 KiB window of output before it. A span inflated with a window the
index gave and checked against a digest the index gave proves only that the index agrees
with itself: a hostile one makes a file read as bytes it chose. What ties the bytes to the
image is the layer's sha256, which the image manifest, and so the image digest, covers.

``LayerCheck`` is fed one layer blob's bytes in order, as they arrive. It hashes them
(sha256), inflates a gzip layer from its start (each back-reference resolved from the
output before it: the true windows, never the index's), and cuts every chunk the index
places in the layer out of that output at its offset in the tar, each checked against its
BLAKE3 digest. A chunk read through the index then passes its digest check only if its
bytes are the layer's: whatever window or offset the index gave, a digest that names the
layer's bytes at that place lets through nothing else.

    check = LayerCheck(digest, size, chunks)   # the chunks the index places in the layer
    for piece in body:
        good = check.feed(piece)               # [(chunk, its plain bytes)] checked so far
    check.finish()

``finish`` raises ``ImageError`` if the blob is not the manifest's (its sha256 or size: the
source sent wrong bytes, not the index's fault) and ``LayerMismatchError`` if it is and a
chunk was not there. A mismatch stops the cutting, not the hashing: which of the two it is
is known only at the end. Output is held only from the next chunk on, so a layer of any
size is checked in about one chunk's memory.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

from .codec import chunk_digest
from .errors import ImageError, LayerMismatchError
from .format import CODEC_GZIP_SPAN, CODEC_RAW, Chunk

_STEP = 1 << 20
"""Output bytes inflated at most per call: a layer that inflates a thousandfold is read
a piece at a time, never whole."""


def tar_offset(c: Chunk) -> int:
    """Where the index places chunk ``c`` in its layer's uncompressed tar (a raw chunk's
    stored bytes are the tar's own)."""
    if c.codec == CODEC_GZIP_SPAN and c.span is not None:
        return c.span.point + c.span.skip
    return c.offset


class LayerCheck:
    """One layer blob checked as it streams past; not for concurrent use."""

    def __init__(self, digest: str, size: int, chunks: Sequence[Chunk]) -> None:
        self.digest = digest
        self.size = size
        codecs = {c.codec for c in chunks}
        self.problem: str | None = None
        """The first chunk that was not the layer's bytes, once one was found."""
        if not codecs <= {CODEC_RAW, CODEC_GZIP_SPAN} or len(codecs) > 1:
            self.problem = f"layer {digest} has chunks of codecs {sorted(codecs)}, not raw or gzip-span alone"
        self._z = zlib.decompressobj(wbits=31) if CODEC_GZIP_SPAN in codecs else None
        self._todo = sorted(chunks, key=lambda c: (tar_offset(c), c.size))
        self._next = 0
        self._out = bytearray()
        self._base = 0  # the tar offset of _out[0]
        self._sha = hashlib.sha256()
        self._seen = 0

    @property
    def chunks_left(self) -> int:
        return len(self._todo) - self._next

    def feed(self, piece: bytes | memoryview) -> list[tuple[Chunk, bytes]]:
        """The next bytes of the blob; the chunks they completed, checked."""
        self._sha.update(piece)
        self._seen += len(piece)
        if self.problem is not None or not self.chunks_left:
            return []  # nothing more to cut: hashing is all that is left
        good: list[tuple[Chunk, bytes]] = []
        if self._z is None:
            self._take(bytes(piece), good)
        else:
            self._inflate(bytes(piece), good)
        return good

    def finish(self) -> None:
        """After the last byte: ImageError if the blob is not the one the manifest names,
        LayerMismatchError if a chunk the index places in it is not there."""
        if self._seen != self.size:
            raise ImageError(f"layer {self.digest} is {self._seen} bytes, not the manifest's {self.size}")
        if f"sha256:{self._sha.hexdigest()}" != self.digest:
            raise ImageError(f"layer {self.digest} does not match its digest")
        if self.problem is None and self.chunks_left:
            c = self._todo[self._next]
            self.problem = (f"chunk {c.hexdigest[:16]} lies at {tar_offset(c)}, past the end of layer "
                            f"{self.digest} ({self._base + len(self._out)} bytes uncompressed)")
        if self.problem is not None:
            raise LayerMismatchError(self.problem)

    def _inflate(self, data: bytes, good: list[tuple[Chunk, bytes]]) -> None:
        assert self._z is not None
        z = self._z
        try:
            while self.problem is None and self.chunks_left:
                if z.eof:  # concatenated members: the next one, header and all
                    if not data:
                        break
                    z = self._z = zlib.decompressobj(wbits=31)
                out = z.decompress(data, _STEP)
                self._take(out, good)
                data = z.unused_data if z.eof else z.unconsumed_tail
                if not data and len(out) < _STEP:  # all taken in, nothing held back
                    break
        except zlib.error as exc:
            self.problem = (f"layer {self.digest} does not inflate at {self._base + len(self._out)} "
                            f"bytes of output ({exc}) while chunks remain")

    def _take(self, out: bytes, good: list[tuple[Chunk, bytes]]) -> None:
        """Output ``out`` follows what came before: cut the chunks it completes."""
        self._out += out
        end = self._base + len(self._out)
        while self.chunks_left:
            c = self._todo[self._next]
            at = tar_offset(c)
            if at + c.size > end:
                break
            plain = bytes(self._out[at - self._base : at - self._base + c.size])
            if at < self._base or chunk_digest(plain) != c.digest:
                self.problem = (f"chunk {c.hexdigest[:16]} at {at} of layer {self.digest} is not the "
                                "bytes its digest names")
                return
            good.append((c, plain))
            self._next += 1
        keep_from = tar_offset(self._todo[self._next]) if self.chunks_left else end
        drop = min(max(keep_from - self._base, 0), len(self._out))
        if drop:
            del self._out[:drop]
            self._base += drop
