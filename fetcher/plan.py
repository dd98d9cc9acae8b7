"""Which range requests fetch a set of chunks.

Missing chunks of one blob that lie close together are merged into one request (the gap's
bytes are read and discarded: cheaper than another round trip), up to a size limit;
chunks of different blobs never share one.

    plan_ranges(chunks, max_request=, max_gap=)   the requests, as few as the limits allow
    claim(rng, entries)                           what a queued background request still
                                                  has to fetch when its turn comes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Protocol

from blockindex.format import Chunk, ChunkDigest


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """One request: chunks of one blob lying within ``[start, end)``."""

    blob: str
    start: int
    end: int
    chunks: tuple[Chunk, ...]


def plan_ranges(chunks: Iterable[Chunk], *, max_request: int, max_gap: int) -> list[Range]:
    """Group chunks into as few range requests as the limits allow."""
    by_blob: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_blob.setdefault(c.blob.digest, []).append(c)
    out: list[Range] = []
    for blob, group in by_blob.items():
        group.sort(key=lambda c: c.offset)
        cur: list[Chunk] = []
        start = end = 0
        for c in group:
            c_end = c.offset + c.stored_size
            if cur and c.offset - end <= max_gap and c_end - start <= max_request:
                cur.append(c)
                end = max(end, c_end)
                continue
            if cur:
                out.append(Range(blob, start, end, tuple(cur)))
            cur, start, end = [c], c.offset, c_end
        if cur:
            out.append(Range(blob, start, end, tuple(cur)))
    return out


class Queued(Protocol):
    queued: bool
    """Still waiting for its background request to start (a demand fetch that takes the
    chunk over clears it)."""


def claim(rng: Range, entries: Mapping[ChunkDigest, Queued]) -> Range | None:
    """The part of a queued background range that no demand fetch has taken over, now
    marked as under way (its entries' ``queued`` cleared); None if nothing is left."""
    mine = [c for c in rng.chunks if entries[c.digest].queued]
    for c in mine:
        entries[c.digest].queued = False
    if not mine:
        return None
    if len(mine) == len(rng.chunks):
        return rng
    return Range(rng.blob, mine[0].offset, max(c.offset + c.stored_size for c in mine), tuple(mine))
