"""What a demand miss fetches along: the chunks that follow it in its blob.

Convert lays a directory's files side by side in a blob, so a read that misses on a small
chunk is likely followed by reads of the chunks after it (Nydus's ``amplify_io``). The
window starts at an eighth of ``FetchConfig.amplify`` and doubles while misses walk
through the blob (as the kernel's readahead grows), so that scattered reads fetch little
beyond what they asked for and a walk of a tree takes few requests.

A range of a gzip layer (a side index's) brings along the other chunks that its bytes
inflate to, whatever the window (``spans.py``): they cost no byte more, and a chunk left
out would be fetched again with its whole span when read.

    along = FetchedAlong(inflight, store, amplifier=, within=)
    rng = along.grow(rng, background)    # each chunk added gets its in-flight entry
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blockindex.format import Chunk
from cache.store import ChunkStore

from .inflight import InFlight
from .plan import Range, amplify
from .spans import is_gzip, with_mates


class Amplifier:
    """Grows demand ranges by their free neighbours, per blob."""

    def __init__(self, neighbours: Callable[[Chunk, int], Sequence[Chunk]], *, largest: int) -> None:
        self._neighbours = neighbours
        """The chunks following a chunk in its blob within so many bytes (the index's
        ``chunks_after``)."""
        self._largest = largest
        self._streaks: dict[str, tuple[int, int]] = {}
        """Per blob, where the last grown request ended and its window: a miss right there
        (a walk through the blob) doubles the window, any other starts small."""

    def extend(self, rng: Range, free: Callable[[Chunk], bool]) -> Range:
        """``rng`` with the chunks that follow it while they are ``free`` (neither cached
        nor in flight) and fit the window (``plan.amplify``)."""
        end, last = self._streaks.get(rng.blob, (-1, 0))
        window = min(2 * last, self._largest) if rng.start == end else max(self._largest // 8, 1)
        room = window - (rng.end - rng.start)
        out = rng if room <= 0 else amplify(rng, self._neighbours(rng.chunks[-1], room),
                                            window=window, free=free)
        self._streaks[rng.blob] = (out.end, window)
        return out


class FetchedAlong:
    """What a planned range fetches along with the chunks asked for: for a demand miss,
    the free chunks after it (``amplifier``); for a range of a gzip layer, the free
    chunks whose stored bytes lie within it (``within``: the index's ``chunks_within``).
    Each gets its in-flight entry, so that a reader of one joins the fetch."""

    def __init__(self, inflight: InFlight, store: ChunkStore | None, *, amplifier: Amplifier | None,
                 within: Callable[[Chunk, int, int], Sequence[Chunk]] | None) -> None:
        self._inflight = inflight
        self._store = store
        self._amplifier = amplifier
        self._within = within

    def free(self, c: Chunk) -> bool:
        """Whether ``c`` is neither being fetched nor in the node cache."""
        return self._inflight.get(c.digest) is None and not (
            self._store is not None and self._store.contains(c.digest, c.size))

    def grow(self, rng: Range, background: bool) -> Range:
        """``rng`` with what it brings along, as its last chunks (``Range.neighbours``)."""
        grown = rng
        if not background and self._amplifier is not None:
            grown = self._amplifier.extend(grown, self.free)
        if self._within is not None and is_gzip(grown):
            grown = with_mates(grown, self._within(grown.chunks[0], grown.start, grown.end), self.free)
        for c in grown.chunks[len(rng.chunks):]:
            self._inflight.start(c.digest, queued=background)
        return grown
