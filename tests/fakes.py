"""Test doubles for one layer at a time: an in-memory blob source with a script of faults."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import trio
import trio.lowlevel

from blockindex.codec import chunk_digest, encode
from blockindex.format import CODEC_LZ4, Blob, Chunk
from fetcher.errors import ServerError, UnreachableError


class ScriptedSource:
    """Serves ranges of in-memory blobs. ``script`` is consumed one outcome per request:
    ``"ok"``, ``"fail"`` (ServerError), ``"corrupt"`` (one byte flipped), ``"stall"``
    (never answers), ``"slow"`` (answers after 0.4 s); when it runs out, requests succeed."""

    def __init__(self, blobs: dict[str, bytes], script: Iterable[str] = ()) -> None:
        self.blobs = blobs
        self.script = list(script)
        self.requests: list[tuple[str, int, int]] = []

    def blame(self, digest: str, offset: int, length: int) -> bool:
        return False  # the only sender

    async def read_range(self, digest: str, offset: int, length: int) -> bytes:
        self.requests.append((digest, offset, length))
        await trio.lowlevel.checkpoint()
        outcome = self.script.pop(0) if self.script else "ok"
        data = self.blobs[digest][offset : offset + length]
        if outcome == "fail":
            raise ServerError("scripted failure")
        if outcome == "stall":
            await trio.sleep_forever()
        if outcome == "slow":
            await trio.sleep(0.4)
        if outcome == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def make_blob(pieces: list[bytes], blob_id: int = 1,
              codec: int = CODEC_LZ4) -> tuple[Blob, list[Chunk], bytes]:
    """Pack ``pieces`` into one blob the way the converter does (compressed with ``codec``
    where that pays); returns the blob, its chunks in order and the blob bytes."""
    payloads = []
    metas = []
    offset = 0
    for data in pieces:
        used, payload = encode(data, codec=codec)
        metas.append((chunk_digest(data), offset, len(payload), len(data), used))
        payloads.append(payload)
        offset += len(payload)
    raw = b"".join(payloads)
    blob = Blob(blob_id, "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw))
    chunks = [Chunk(d, blob, off, ss, size, codec) for d, off, ss, size, codec in metas]
    return blob, chunks, raw


async def peer_answer(raw: bytes, chunk: Chunk, peer: str, outcome: str) -> bytearray:
    """What a scripted peer answers for ``chunk`` of the blob ``raw``: ``ok`` (its stored
    bytes), ``corrupt`` (one byte flipped), ``refused`` (UnreachableError) or ``stall``."""
    await trio.lowlevel.checkpoint()
    if outcome == "refused":
        raise UnreachableError(f"cannot connect to {peer}")
    if outcome == "stall":
        await trio.sleep_forever()
    data = bytearray(raw[chunk.offset : chunk.offset + chunk.stored_size])
    if outcome == "corrupt":
        data[0] ^= 0xFF
    return data


class FrameReader:
    """A batch answer's bytes as a ``StreamReader`` gives them, from a channel of pieces."""

    def __init__(self, pieces: trio.MemoryReceiveChannel[bytes]) -> None:
        self._pieces = pieces
        self._buf = bytearray()

    async def exactly(self, n: int) -> bytearray:
        while len(self._buf) < n:
            try:
                self._buf += await self._pieces.receive()
            except trio.EndOfChannel:
                raise ServerError("connection closed in the middle of the answer") from None
        out = self._buf[:n]
        del self._buf[:n]
        return out


class BatchesByChunk:
    """Gives a scripted PeerClient ``fetch_batch``: each chunk of a batch is answered by
    its own ``fetch`` (so per-chunk scripts hold), as the frame it would be on the wire,
    when that answers; a refused one refuses the whole request, as a refused connection
    would."""

    batches: list[int]

    async def fetch_batch(self, peer, chunks, repository, read, *, deadline, prefetch=False):
        from fetcher.peerwire import END, FRAME, MISSING, OK

        self.batches = [*getattr(self, "batches", []), len(chunks)]
        send, receive = trio.open_memory_channel[bytes](len(chunks) + 1)

        async def one(c):
            try:
                payload = await self.fetch(peer, c, repository)  # type: ignore[attr-defined]
            except UnreachableError:
                raise
            except ServerError:
                send.send_nowait(FRAME.pack(c.digest, MISSING, 0, 0, 0))
                return
            send.send_nowait(FRAME.pack(c.digest, OK, c.codec, c.size, len(payload)) + payload)

        async def every():
            async with trio.open_nursery() as nursery:
                for c in chunks:
                    nursery.start_soon(one, c)
            send.send_nowait(FRAME.pack(bytes(32), END, 0, 0, 0))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(every)
                result = await read(FrameReader(receive))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # trio >= 0.25 groups what a nursery raises: a
            raise _first_leaf(group) from None  # refused connection raises alone, as the real one
        return result


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf
