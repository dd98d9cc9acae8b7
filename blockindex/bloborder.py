"""Questions about the order of chunks in their blobs, for ``IndexReader``: what follows a
chunk (what a miss fetches along, what the disk is asked for ahead of a walk) and what lies
within a fetched range (the other chunks of a gzip span)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .format import Chunk

_WITHIN_LIMIT = 4096
"""Chunk ids ``chunks_within`` walks on each side: a tar holds at most one file per KiB,
so this covers a span of 4 MiB of output even of empty files."""


class BlobOrder:
    """The blob-order queries of ``IndexReader`` (which provides ``_q``, ``_rows`` and
    ``_chunk``)."""

    def _q(self, sql: str, args: tuple | dict = ()) -> list[Any]:
        raise NotImplementedError

    def _rows(self, sql: str, args: tuple = ()) -> Iterator[Any]:
        raise NotImplementedError

    def _chunk(self, row: tuple) -> Chunk:
        raise NotImplementedError

    def chunks_after(self, chunk: Chunk, nbytes: int) -> list[Chunk]:
        """The chunks of ``chunk``'s blob that follow it, in blob order, as far as they lie
        within ``nbytes`` bytes of its end (what one request may fetch along with it).
        The converter numbers chunks in blob order, so this walks the chunk ids after
        ``chunk``'s and stops at the first that is of another blob, overlaps the one
        before it, or ends past the limit (an index out of order only finds fewer)."""
        end = chunk.offset + chunk.stored_size
        limit = end + nbytes
        out: list[Chunk] = []
        if nbytes <= 0:
            return out
        for row in self._rows(
            "SELECT digest, blob, offset, stored_size, size, codec FROM chunks "
            "WHERE id > (SELECT id FROM chunks WHERE digest = ?) ORDER BY id LIMIT ?",
            (chunk.digest, nbytes),
        ):
            c = self._chunk(row)
            if c.blob.id != chunk.blob.id or c.offset < end or c.offset + c.stored_size > limit:
                break
            out.append(c)
            end = c.offset + c.stored_size
        return out

    def digests_after(self, chunk: Chunk, nbytes: int, most: int = 1024) -> list[bytes]:
        """The digests of at most ``most`` chunks that ``chunks_after`` would give, read
        without checking each row (a hint for the disk: a wrong one costs a useless read,
        never a wrong byte): a walk of a tree asks this for every window of its blob."""
        end = chunk.offset + chunk.stored_size
        limit = end + nbytes
        out: list[bytes] = []
        try:
            for digest, blob, offset, stored in self._q(
                    "SELECT digest, blob, offset, stored_size FROM chunks "
                    "WHERE id > (SELECT id FROM chunks WHERE digest = ?) ORDER BY id LIMIT ?",
                    (chunk.digest, most)):
                if blob != chunk.blob.id or offset < end or offset + stored > limit:
                    break
                if isinstance(digest, bytes) and len(digest) == 32:
                    out.append(digest)
                end = offset + stored
        except TypeError:  # a hostile row's types: the hint ends there
            pass
        return out

    def chunks_within(self, chunk: Chunk, start: int, end: int) -> list[Chunk]:
        """The other chunks of ``chunk``'s blob whose stored bytes lie within ``[start, end)``
        of it: for a chunk of a gzip layer, those that inflating a range fetched for it
        gives as well (the other chunks of its span). A side index numbers its chunks in
        the order of their layer's tar, so this walks the chunk ids on either side of
        ``chunk``'s and stops at the first of another blob or starting outside the bytes
        (a chunk that starts inside but ends past them is passed over)."""
        out: list[Chunk] = []
        for op, order in (("<", "DESC"), (">", "ASC")):
            for row in self._rows(
                "SELECT digest, blob, offset, stored_size, size, codec FROM chunks "
                f"WHERE id {op} (SELECT id FROM chunks WHERE digest = ?) ORDER BY id {order} LIMIT ?",
                (chunk.digest, _WITHIN_LIMIT),
            ):
                c = self._chunk(row)
                if c.blob.id != chunk.blob.id or not start <= c.offset < end:
                    break
                if c.offset + c.stored_size <= end:
                    out.append(c)
        return out
