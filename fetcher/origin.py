"""Range requests to a fetcher's source (a registry, its mirrors, an HTTP store): each
bounded by a deadline, checked for its length, and counted.

    origin = Origin(source, "origin", stats, on_answer)
    data = await origin.request(rng, deadline)     # exactly the range's bytes
    origin.blame(rng)                              # they failed their check: ask again?
    plain, payload = await origin.chunk(c, deadline, verifier)   # one chunk, checked
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from blockindex.codec import ChunkDecodeError
from blockindex.format import Chunk

from .config import FetchStats
from .errors import DeadlineError, IntegrityError
from .plan import Range
from .source import BlobSource
from .verify import Verified, Verifier, integrity_error

log = logging.getLogger(__name__)


class Origin:
    """``source`` under the name ``name`` (in errors and logs); counts in ``stats``, and
    calls ``on_answer(name, bytes, seconds)`` after each request that answered."""

    def __init__(self, source: BlobSource, name: str, stats: FetchStats,
                 on_answer: Callable[[str, int, float], object] = lambda *_: None) -> None:
        self.source = source
        self.name = name
        self._stats = stats
        self._on_answer = on_answer

    async def request(self, rng: Range, deadline: float) -> bytes | bytearray:
        """The bytes of ``rng``: ``DeadlineError`` past ``deadline`` seconds,
        ``IntegrityError`` for an answer of the wrong length."""
        length = rng.end - rng.start
        self._stats.requests += 1
        started = time.monotonic()
        with trio.move_on_after(deadline) as scope:
            data = await self.source.read_range(rng.blob, rng.start, length)
        if scope.cancelled_caught:
            self._stats.timeouts += 1
            raise DeadlineError(
                f"{self.name} sent no answer for blob {rng.blob[:19]} within {deadline:g}s"
            ).about(blob=rng.blob, source=self.name)
        if len(data) != length:
            raise IntegrityError(
                f"{self.name} sent {len(data)} bytes for a {length}-byte range"
            ).about(blob=rng.blob, source=self.name)
        self._stats.bytes_received += length
        self._on_answer(self.name, length, time.monotonic() - started)
        return data

    def blame(self, rng: Range) -> bool:
        """The bytes of ``rng`` failed their check: whether another sender sent them (a
        mirror, now skipped), so that asking again reaches the next source."""
        return self.source.blame(rng.blob, rng.start, rng.end - rng.start)

    async def chunk(self, c: Chunk, deadline: float, verifier: Verifier) -> Verified:
        """One chunk alone, checked: ``(plain bytes, payload as stored)``;
        ``IntegrityError`` if its bytes are not the chunk's (logged, never cached)."""
        data = await self.request(Range(c.blob.digest, c.offset, c.offset + c.stored_size, (c,)), deadline)
        payload = bytes(data)  # what is kept; a raw chunk's plain bytes are the same object
        try:
            plain = await verifier.chunk(c, payload)
        except ChunkDecodeError as exc:
            self._stats.integrity_failures += 1
            log.error("chunk %s at %d in blob %s from %s failed verification (%s); not cached",
                      c.hexdigest, c.offset, c.blob.digest, self.name, exc)
            raise integrity_error(c, self.name) from exc
        return plain, payload
