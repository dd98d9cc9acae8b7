"""Batches for real: a node's prefetch asks an owner for many chunks in one request
(``POST /v1/chunks``). Mount processes on loopback in front of one counting origin, and
hostile peers (``hostiled.BatchPeer``) that lie about one chunk of a batch, die in the
middle of one, or answer slowly."""

from __future__ import annotations

import itertools
import math

import pytest

from blockindex.oci import Layout
from fetcher.peerwire import MAX_BATCH_CHUNKS
from testkit.treecompare import compare_tree

from .hostiled import BatchPeer
from .test_peers import (
    TOKEN,
    files_of,
    free_ports,
    index_size,
    origin_range_bytes,
    read_all,
    status,
    unique_stored_bytes,
)

pytestmark = pytest.mark.mount


@pytest.fixture
def token(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    return f


def _origin_ranges(server) -> list[tuple[str, int, int]]:
    """The chunk ranges the origin sent: (blob path, first byte, end)."""
    out = []
    for _method, path, rng, code in server.requests:
        if "/blobs/" in path and rng and code == 206:
            first, last = rng.removeprefix("bytes=").split("-")
            out.append((path, int(first), int(last) + 1))
    return out


def _overlap(ranges: list[tuple[str, int, int]]) -> int:
    """Bytes the origin sent more than once."""
    twice = 0
    ranges = sorted(ranges)
    for (path, _, end), (next_path, start, next_end) in itertools.pairwise(ranges):
        if path == next_path and start < end:
            twice += min(end, next_end) - start
    return twice


def _node(mounts, server, tmp_path, name, peers, token, *extra):
    """A mount whose peers file lists ``peers`` (not itself: they own every chunk)."""
    (tmp_path / f"peers-{name}").write_text("".join(p + "\n" for p in peers))
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--peers-file", str(tmp_path / f"peers-{name}"),
                          "--token-file", str(token), *extra, name=name, cache=tmp_path / f"cache-{name}")
    return mnt


def _owner(mounts, server, tmp_path, token):
    """A mount that serves its cache to peers and owns every chunk (its peers file names
    it alone): what it lacks it fetches from the origin."""
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    mnt = _node(mounts, server, tmp_path, "owner", [url], token, "--no-prefetch",
                "--listen", f"127.0.0.1:{port}")
    return url, mnt


def test_nodes_prefetch_from_an_owner_in_few_requests_and_it_fetches_each_chunk_once(
        served, mounts, tmp_path, token):
    """Two nodes prefetch the whole image at once from one owner with an empty cache: the
    owner takes far fewer requests than chunks, and the origin sends each chunk once (the
    owner fetches a chunk both nodes ask for once)."""
    image, root, server = served
    unique = unique_stored_bytes(root)
    url, owner = _owner(mounts, server, tmp_path, token)
    nodes = [_node(mounts, server, tmp_path, name, [url], token) for name in ("b", "c")]
    for mnt in nodes:
        mounts.wait_complete(mnt, timeout=90)
    n = status(nodes[0])["prefetch"]["total_chunks"]
    served_by = status(owner)["peer_server"]
    ranges = _origin_ranges(server)
    print(f"\n{n} chunks to each of 2 nodes: {served_by['requests']} requests at the owner, "
          f"{served_by['batches']} of them batches; origin {origin_range_bytes(server)} of {unique} "
          f"in {len(ranges)} range requests")
    fewest = 2 * math.ceil(n / MAX_BATCH_CHUNKS)
    # a prefetch keeps a few full batches on their way (PREFETCH_BATCHES): with one, its
    # later batches went as chunks freed up, about 7 chunks each (20 to 30 batches here)
    assert fewest <= served_by["batches"] <= 1.5 * fewest
    assert served_by["requests"] <= 2 * n / 8
    # neighbours go in one range request, with the bytes between them (up to
    # owner_max_gap): one request per chunk before
    assert unique <= origin_range_bytes(server) <= unique * 1.01
    assert len(ranges) <= n / 4 and _overlap(ranges) == 0
    for mnt in nodes:
        st = status(mnt)
        assert st["bytes_by_source"].get("origin", 0) == 0
        assert st["bytes_by_source"][f"peer {url}"] == unique + index_size(root)
        assert compare_tree(mnt, image.expected) == []


def test_a_batch_that_lies_about_one_chunk_loses_that_chunk_only(served, mounts, tmp_path, token):
    """The peer flips a byte of one chunk of its first batch: that chunk comes from the
    origin, the others of the batch are used, and the peer is reported and avoided."""
    image, root, server = served
    with BatchPeer(Layout(root / "rich"), "lie") as liar:
        mnt = _node(mounts, server, tmp_path, "b", [liar.url], token)
        mounts.wait_complete(mnt, timeout=90)
    st = status(mnt)
    assert liar.batches[0] > 1 and liar.sent == sum(liar.batches) - 1
    assert st["fetch"]["peer_integrity_failures"] == 1
    assert st["fetch"]["peer_chunks"] == liar.sent  # every honest chunk was used
    assert 0 < origin_range_bytes(server) < unique_stored_bytes(root) / len(liar.batches)
    assert liar.url in st["peers"]["bad_peers"]
    assert compare_tree(mnt, image.expected) == []


def test_an_owner_that_dies_in_the_middle_of_a_batch_hands_the_rest_to_the_next_owner(
        served, mounts, tmp_path, token):
    """The owner of half the chunks sends half of its first batch and dies: the chunks it
    sent are used, the rest come from the next owner (which fetches them from the origin,
    neighbours joined), none straight from the origin."""
    image, root, server = served
    unique = unique_stored_bytes(root)
    url, _ = _owner(mounts, server, tmp_path, token)
    with BatchPeer(Layout(root / "rich"), "die") as dying:
        mnt = _node(mounts, server, tmp_path, "b", [dying.url, url], token)
        mounts.wait_complete(mnt, timeout=90)
    st = status(mnt)
    # the batches it took before it died (a prefetch keeps a few on their way) are sent whole
    assert dying.sent == dying.batches[0] // 2 + sum(dying.batches[1:]) and dying.batches[0] > 1
    assert st["bytes_by_source"][f"peer {dying.url}"] > 0
    assert st["bytes_by_source"].get("origin", 0) == 0
    # the next owner's ranges join neighbours with the bytes between them (up to
    # owner_max_gap; some of them the chunks the dying owner sent)
    assert origin_range_bytes(server) <= unique * 1.1
    assert compare_tree(mnt, image.expected) == []


def test_a_slow_owner_is_waited_for_not_doubled_at_the_origin(served, mounts, tmp_path, token):
    """While a peer fetch of a chunk is under way and within its deadline, the node does
    not ask the origin for it: a prefetch from an owner that takes 1.5 s a batch (the
    hedge delay is 0.08 s, a peer's deadline 10 s) costs the origin nothing."""
    image, root, server = served
    with BatchPeer(Layout(root / "rich"), "slow:1.5") as slow:
        mnt = _node(mounts, server, tmp_path, "b", [slow.url], token)
        mounts.wait_complete(mnt, timeout=90)
    assert origin_range_bytes(server) == 0
    assert status(mnt)["fetch"]["origin_after_peers"] == 0
    assert read_all(mnt, image, files_of(image)) == []


def test_a_frame_longer_than_its_chunk_fails_the_rest_of_the_answer_unread():
    """Never more bytes than a chunk has: the chunks answered before are kept, the frame
    that announces more is not read, and the call fails (the rest go to the next source)."""
    import trio

    from fetcher.errors import ServerError
    from fetcher.peerbatch import read_frames
    from fetcher.peerwire import OK, frame

    from .fakes import FrameReader, make_blob

    _, chunks, raw = make_blob([b"a" * 3000, b"b" * 5000, b"c" * 4000])
    a, b, c = chunks

    def payload(x):
        return raw[x.offset : x.offset + x.stored_size]

    got = {}

    async def main():
        send, receive = trio.open_memory_channel(10)
        send.send_nowait(b"".join(frame(a.digest, OK, a.codec, a.size, payload(a))))
        send.send_nowait(b"".join(frame(b.digest, OK, b.codec, b.size, payload(b) + bytes(1 << 20))))
        send.close()
        with pytest.raises(ServerError, match="announced"):
            await read_frames("p", chunks, FrameReader(receive), lambda ch, ans: got.update({ch: ans}))

    trio.run(main)
    assert got == {a: payload(a)}


def test_an_owner_sends_what_it_has_cached_while_its_origin_fetches_are_held_up():
    """Prefetch batches share a few origin fetches at a server (``PREFETCH_FETCHES``): with
    all of them held up by a slow origin, a batch of chunks the node cache holds is still
    answered at once, not queued behind them."""
    import trio
    import trio.testing

    from fetcher.peerwire import FRAME, MAX_BATCH_CHUNKS, batch_body
    from lazyfs.peer import PeerServerStats
    from lazyfs.peerbatch import PREFETCH_FETCHES, BatchServer

    from .fakes import make_blob

    _, chunks, raw = make_blob([i.to_bytes(2, "big") * 1500 for i in range(PREFETCH_FETCHES + 4)])
    slow, have = chunks[:PREFETCH_FETCHES], chunks[PREFETCH_FETCHES:]

    def payload(c):
        return c.codec, c.size, raw[c.offset : c.offset + c.stored_size]

    held = {c.digest for c in have}

    async def serve(c, repo, index, prefetch):  # as the chunk server's: the cache, else an hour at the origin
        if c.digest not in held:
            await trio.sleep(3600)
        return payload(c)

    async def cached(c):
        await trio.lowlevel.checkpoint()
        return payload(c) if c.digest in held else None

    answered = {}

    async def main():
        server = BatchServer(serve, PeerServerStats(), deadline=7200, cached=cached)
        async with trio.open_nursery() as nursery:
            asking = [("slow", slow[i : i + MAX_BATCH_CHUNKS]) for i in range(0, len(slow), MAX_BATCH_CHUNKS)]
            for name, asked in (*asking, ("have", have)):
                async def send(pieces, name=name):
                    head = bytes(pieces[0])[: FRAME.size]
                    if FRAME.unpack(head)[0] != bytes(32):  # not the END frame
                        answered.setdefault(name, []).append(trio.current_time())

                answer = server.answer(batch_body(asked, "reg/app", True))
                nursery.start_soon(answer.stream, send)
                await trio.sleep(1)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert answered == {"have": [PREFETCH_FETCHES / MAX_BATCH_CHUNKS] * len(have)}
