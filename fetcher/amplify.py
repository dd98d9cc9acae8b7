"""What a demand miss fetches along: the chunks that follow it in its blob.

Convert lays a directory's files side by side in a blob, so a read that misses on a small
chunk is likely followed by reads of the chunks after it (Nydus's ``amplify_io``). The
window starts at an eighth of ``FetchConfig.amplify`` and doubles while misses walk
through the blob (as the kernel's readahead grows), so that scattered reads fetch little
beyond what they asked for and a walk of a tree takes few requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blockindex.format import Chunk

from .plan import Range, amplify


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
