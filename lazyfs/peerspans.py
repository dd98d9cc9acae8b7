"""The checkpoints of gzip spans, for the chunk server.

A chunk of a side-indexed image is a span of a gzip layer, inflated from the checkpoint
before it, and only the side index has that checkpoint (its 32 KiB window). A peer that
asks for such a chunk names the side index it reads by (``fetcher.peerwire``); an owner
that lacks the chunk looks the chunk up in that index, if its node cache keeps it (the
node mounted the image), and fetches the span from the origin as its own reads would:

    spans = SideIndexes(images)
    located = await spans.locate("sha256:<index>", asked)   # None: not kept here

Whatever the index says, the bytes fetched are checked against the digest asked for
before they are cached or sent, so a wrong index costs a fetch, never a wrong byte.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import trio

from blockindex.errors import IndexFormatError
from blockindex.format import CODEC_GZIP_SPAN, Chunk
from blockindex.reader import IndexReader
from cache.images import ImageStore

log = logging.getLogger(__name__)


class SideIndexes:
    """Side indexes of one node cache, opened on first use (at most ``keep`` at once)."""

    def __init__(self, images: ImageStore, *, keep: int = 8) -> None:
        self._images = images
        self._keep = keep
        self._open: collections.OrderedDict[str, IndexReader] = collections.OrderedDict()

    async def locate(self, index: str, asked: Chunk) -> Chunk | None:
        """The gzip span the side index ``index`` has under ``asked``'s digest and size,
        with its checkpoint; None when this node keeps no such index or it has no such
        span (the asker then goes to the next source)."""
        reader = self._open.get(index)
        if reader is None:
            reader = await self._reader(index)
            if reader is None:
                return None
        self._open.move_to_end(index)
        try:
            found = reader.chunk(asked.digest)
        except IndexFormatError as exc:
            log.warning("side index %s: %s", index, exc)
            return None
        if found is None or found.codec != CODEC_GZIP_SPAN or found.size != asked.size:
            return None
        return found

    async def _reader(self, index: str) -> IndexReader | None:
        # a kept index is hashed once per process before it is used (it may be large); a
        # side index pushed compressed is kept decompressed, as one built from its blob
        path = await trio.to_thread.run_sync(self._images.verified_index, index)
        if path is None:
            path = await trio.to_thread.run_sync(self._images.built_index, index)
        if path is None:
            return None
        try:
            reader = await trio.to_thread.run_sync(_side_reader, path)
        except IndexFormatError as exc:
            log.warning("side index %s: %s", index, exc)
            return None
        if reader is None:
            return None
        if index in self._open:  # opened meanwhile by another request
            reader.close()
            return self._open[index]
        self._open[index] = reader
        while len(self._open) > self._keep:
            self._open.popitem(last=False)[1].close()
        return reader

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def _side_reader(path: Path) -> IndexReader | None:
    """A reader of the index at ``path`` if it is a side index, else None."""
    reader = IndexReader(path)
    if not reader.side:
        reader.close()
        return None
    return reader
