"""Which range requests fetch a set of chunks.

Missing chunks of one blob that lie close together are merged into one request (the gap's
bytes are read and discarded: cheaper than another round trip), up to a size limit;
chunks of different blobs never share one. Chunks of a gzip layer whose stored bytes
start at the same checkpoint (one span's: ``spans.py``) share one request even past the
limit: their bytes overlap, and one inflate gives them all. A demand miss on small chunks brings the
chunks that follow it in its blob along, up to a window (Nydus's ``amplify_io``): the
converter lays a directory's files side by side, so a cold walk of a tree needs about one
request per window instead of one per file.

    plan_ranges(chunks, max_request=, max_gap=)   the requests, as few as the limits allow
    plan_fetch(chunks, config, background=, gaps=, owner=)   with a fetcher's limits
    amplify(rng, following, window=, free=)       a demand request grown by its neighbours
    asked_first(rng)                              its parts: asked-for chunks, then neighbours
    claim(rng, entries)                           what a queued background request still
                                                  has to fetch when its turn comes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from blockindex.format import Chunk, ChunkDigest

from .config import FetchConfig


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """One request: chunks of one blob lying within ``[start, end)``, in blob order."""

    blob: str
    start: int
    end: int
    chunks: tuple[Chunk, ...]
    neighbours: int = 0
    """How many of the last ``chunks`` nobody asked for: ``amplify`` added them."""


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
            if cur and c.offset - end <= max_gap and (c_end - start <= max_request or c.offset == start):
                cur.append(c)
                end = max(end, c_end)
                continue
            if cur:
                out.append(Range(blob, start, end, tuple(cur)))
            cur, start, end = [c], c.offset, c_end
        if cur:
            out.append(Range(blob, start, end, tuple(cur)))
    return out


def plan_fetch(chunks: Iterable[Chunk], config: FetchConfig, *, background: bool, gaps: bool,
               owner: bool = False) -> list[Range]:
    """``plan_ranges`` with the limits of ``config``: a background request's smaller size;
    no gaps unless ``gaps`` (in a cluster, the chunks in a gap are other owners': their
    bytes would be fetched twice). An ``owner`` fetching for its peers: small gaps
    (``FetchConfig.owner_max_gap``), and a background request's size, as most of what it
    fetches is their prefetch, which a read's chunk may join."""
    max_request = config.background_max_request if background or owner else config.max_request
    max_gap = 0 if not gaps else config.owner_max_gap if owner else config.max_gap
    return plan_ranges(chunks, max_request=max_request, max_gap=max_gap)


def amplify(rng: Range, following: Iterable[Chunk], *, window: int,
            free: Callable[[Chunk], bool]) -> Range:
    """``rng`` extended by the chunks ``following`` it in its blob (in blob order), as long
    as each is ``free`` (not cached, not being fetched: the first that is not ends the
    extension, so that no byte is fetched twice) and the request stays within ``window``
    bytes. A request already as large as the window is left as it is."""
    extra: list[Chunk] = []
    end = rng.end
    for c in following:
        c_end = c.offset + c.stored_size
        if c.blob.digest != rng.blob or c.offset < end or c_end - rng.start > window or not free(c):
            break
        extra.append(c)
        end = c_end
    if not extra:
        return rng
    return Range(rng.blob, rng.start, end, rng.chunks + tuple(extra), len(extra))


def asked_first(rng: Range) -> list[Range]:
    """The parts of ``rng`` to check and hand over in turn: the chunks asked for (their
    readers wait for these alone), then the neighbours ``amplify`` added."""
    if not rng.neighbours:
        return [rng]
    asked, extra = rng.chunks[: -rng.neighbours], rng.chunks[-rng.neighbours :]
    # the chunks of a side index's gzip spans overlap: the last one need not end last
    return [Range(rng.blob, rng.start, max(c.offset + c.stored_size for c in asked), asked),
            Range(rng.blob, min(c.offset for c in extra), rng.end, extra, len(extra))]


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
    start = min(c.offset for c in mine)  # a gzip span's neighbours may lie before the asked
    return Range(rng.blob, start, max(c.offset + c.stored_size for c in mine), tuple(mine))
