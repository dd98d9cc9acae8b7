"""An owner fetching chunks from the origin for its peers: the chunks of a batch, and of
batches of several nodes at once, go in range requests that join neighbours, as a lone
node's do; each chunk is still checked on its own. The chunk server in process, in front
of an in-memory origin that counts its requests."""

from __future__ import annotations

import os

import trio
import trio.testing

from blockindex.codec import decode
from blockindex.format import Chunk
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.peerwire import END, FRAME, OK, authorization, batch_body
from lazyfs.httphead import RequestHead
from lazyfs.peer import ChunkServer, OriginPool

from .fakes import ScriptedSource, make_blob

TOKEN = "s3cret-cluster-token-0123456789"
REPO = "reg/app"
PIECES = [os.urandom(3000 + 97 * i) for i in range(40)]


def _batch(chunks: list[Chunk], prefetch: bool = False) -> RequestHead:
    body = batch_body(chunks, REPO, prefetch)
    return RequestHead(method="POST", path="/v1/chunks", query="", body_length=len(body), body=body,
                       headers={"authorization": authorization(TOKEN).encode()})


def _frames(sent: bytes) -> dict[bytes, tuple[int, bytes]]:
    out: dict[bytes, tuple[int, bytes]] = {}
    at = 0
    while True:
        digest, status, _codec, _size, length = FRAME.unpack_from(sent, at)
        at += FRAME.size
        if status == END:
            assert at == len(sent)
            return out
        out[digest] = (status, sent[at : at + length])
        at += length


def _ask(tmp_path, batches: list[list[Chunk]] | list[tuple[list[Chunk], bool]], origin: ScriptedSource,
         prefetch: bool = False, config: FetchConfig = FetchConfig(deadline=10), *, spaced: float = 0.0,
         clock: trio.abc.Clock | None = None) -> list[dict[bytes, tuple[int, bytes]]]:
    """Sends ``batches`` (each with whether it is a prefetch's, else ``prefetch``) to an
    owner with an empty cache, ``spaced`` seconds apart; their answers."""
    answers: list[bytes] = [b""] * len(batches)
    store = ChunkStore(tmp_path / "owner")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, origin, store, config)
            server = ChunkServer(store, TOKEN, OriginPool(nursery, store, fetchers={REPO: fetcher}))

            async def one(i: int, head: RequestHead) -> None:
                answer = await server._answer(head)
                assert answer.status == 200 and answer.stream is not None

                async def send(pieces) -> None:
                    answers[i] += b"".join(bytes(p) for p in pieces)

                await answer.stream(send)

            async with trio.open_nursery() as asking:
                for i, batch in enumerate(batches):
                    chunks, its_prefetch = batch if isinstance(batch, tuple) else (batch, prefetch)
                    asking.start_soon(one, i, _batch(chunks, its_prefetch))
                    if spaced:
                        await trio.sleep(spaced)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return [_frames(a) for a in answers]


def test_a_batch_of_neighbours_takes_one_origin_request_not_one_per_chunk(tmp_path):
    blob, chunks, raw = make_blob(PIECES)
    origin = ScriptedSource({blob.digest: raw})
    [answer] = _ask(tmp_path, [chunks], origin)
    assert [answer[c.digest][0] for c in chunks] == [OK] * len(chunks)
    assert [decode(c.codec, c.size, answer[c.digest][1]) for c in chunks] == PIECES
    assert len(origin.requests) == 1


def test_the_batches_of_several_nodes_at_once_share_range_requests(tmp_path):
    """Two prefetch batches, every other chunk each, and a third overlapping both: the
    owner plans them together, gaps included."""
    blob, chunks, raw = make_blob(PIECES)
    origin = ScriptedSource({blob.digest: raw})
    answers = _ask(tmp_path, [chunks[0::2], chunks[1::2], chunks[10:20]], origin, prefetch=True)
    assert [len(a) for a in answers] == [20, 20, 10]
    assert all(status == OK for a in answers for status, _ in a.values())
    assert len(origin.requests) <= 2  # one per chunk before: 40
    assert sum(length for _, _, length in origin.requests) == len(raw)


def test_a_wrong_chunk_in_a_range_is_not_served_and_the_others_are(tmp_path):
    blob, chunks, raw = make_blob(PIECES)
    bad = chunks[7]
    lying = raw[: bad.offset] + bytes([raw[bad.offset] ^ 0xFF]) + raw[bad.offset + 1 :]
    origin = ScriptedSource({blob.digest: lying})
    [answer] = _ask(tmp_path, [chunks], origin)
    assert answer[bad.digest][0] != OK and not answer[bad.digest][1]
    good = [c for c in chunks if c is not bad]
    assert all(answer[c.digest][0] == OK for c in good)
    assert [decode(c.codec, c.size, answer[c.digest][1]) for c in good] == PIECES[:7] + PIECES[8:]
    assert not ChunkStore(tmp_path / "owner").contains(bad.digest, bad.size)
    assert len(origin.requests) <= 2  # the range, and perhaps the bad chunk asked again alone


def test_an_owners_ranges_are_no_larger_than_a_background_request(tmp_path):
    """Most of what an owner fetches is its peers' prefetch, which a read's chunk may join:
    its ranges keep to the prefetch's size (``background_max_request``)."""
    blob, chunks, raw = make_blob(PIECES)
    origin = ScriptedSource({blob.digest: raw})
    config = FetchConfig(deadline=10, background_max_request=len(raw) // 4)
    [answer] = _ask(tmp_path, [chunks], origin, config=config)
    assert all(status == OK for status, _ in answer.values()) and len(answer) == len(chunks)
    assert 4 <= len(origin.requests) <= 8
    assert all(length <= len(raw) // 4 for _, _, length in origin.requests)


def test_a_peers_prefetch_waits_for_reads_and_a_read_takes_its_chunk_over(tmp_path):
    """A prefetch batch's chunks are fetched as this node's own prefetch is: after the reads
    the owner is fetching (for itself or any peer) and never ahead of them; a read that wants
    one of its queued chunks fetches that chunk at once."""
    blob, chunks, raw = make_blob(PIECES)
    started: list[tuple[float, int, int]] = []

    class Timed(ScriptedSource):
        async def read_range(self, digest: str, offset: int, length: int) -> bytes:
            started.append((trio.current_time(), offset, offset + length))
            return await super().read_range(digest, offset, length)

    origin = Timed({blob.digest: raw}, script=["slow"])  # the first request: 0.4 s
    read_first, wanted = chunks[0], chunks[15]
    _, prefetched, _ = _ask(tmp_path, [([read_first], False), (chunks[10:20], True), ([wanted], False)],
                            origin, spaced=0.01, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(prefetched) == 10 and all(status == OK for status, _ in prefetched.values())
    first_end = read_first.offset + read_first.stored_size
    assert started[0][1:] == (read_first.offset, first_end)
    [at_wanted] = [t for t, lo, _ in started if lo == wanted.offset]
    assert at_wanted < 0.1  # the read's, at once: not after the slow one, nor the prefetch
    rest = [t for t, lo, _ in started if lo >= chunks[10].offset and lo != wanted.offset]
    assert rest and min(rest) >= 0.4  # the prefetch's own ranges: once no read is under way
