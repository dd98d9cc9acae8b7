"""The index's route through the peers, one layer on its own (``fetcher.blobroute``): the
owner first, the origin only once the owner has failed or run past its deadline, and a
peer's wrong blob never kept. Real ``PeerClient`` against scripted peers on loopback;
time under trio's MockClock."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio
import trio.testing

from fetcher.blobroute import blob_seconds, fetch_blob
from fetcher.peers import PeerClient, PeerSet, PeerTier, rendezvous

TOKEN = "blobroute-token-0123456789"
DATA = b"index bytes " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


async def _peer(nursery: trio.Nursery, answer: bytes | None) -> str:
    """A peer that reads a request head, sends ``answer`` (None: nothing) and keeps the
    connection open."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        if answer is not None:
            await stream.send_all(answer)
        await trio.sleep_forever()  # the connection stays open: only the deadline ends it

    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, [listener])
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}"


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def _route(tmp_path: Path, answer: bytes | None) -> tuple[str, list[float], PeerSet]:
    """Fetch the blob with one scripted peer as its owner; (source, when the origin was
    asked, the peer set)."""
    asked: list[float] = []

    async def origin(path: Path) -> None:
        asked.append(trio.current_time())
        await trio.Path(path).write_bytes(DATA)

    async with trio.open_nursery() as nursery:
        peer = await _peer(nursery, answer)
        key = bytes.fromhex(DIGEST.partition(":")[2])
        me = next(u for u in (f"http://10.0.0.{i}:1" for i in range(1, 99))
                  if rendezvous(key, [peer, u])[0] == peer)  # the peer owns it
        peers = PeerSet([peer, me], self_url=me)
        client = PeerClient(TOKEN)
        tier = PeerTier(peers, client, "127.0.0.1:1/img")
        try:
            source = await fetch_blob(tier, DIGEST, len(DATA), tmp_path / "index", origin, wait=5.0)
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert (tmp_path / "index").read_bytes() == DATA
    return source, asked, peers


def test_the_owner_sends_it_and_the_origin_is_not_asked(tmp_path):
    source, asked, _ = trio.run(_route, tmp_path, _ok(DATA))
    assert source.startswith("http://127.0.0.1:") and asked == []


def test_a_peer_that_lies_is_marked_bad_and_its_bytes_never_kept(tmp_path):
    source, asked, peers = trio.run(_route, tmp_path, _ok(b"X" + DATA[1:]))
    assert source == "origin" and len(asked) == 1
    assert len(peers.bad_peers()) == 1


def test_a_peer_announcing_another_size_is_not_read(tmp_path):
    source, asked, peers = trio.run(_route, tmp_path, _ok(DATA + b"more"))
    assert source == "origin" and len(asked) == 1


@pytest.mark.parametrize("answer", [None, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nabc" % len(DATA)],
                         ids=["silent", "stalls-mid-body"])
def test_the_origin_is_asked_only_once_the_owner_is_overdue(tmp_path, answer):
    clock = trio.testing.MockClock(autojump_threshold=0)
    source, asked, _ = trio.run(_route, tmp_path, answer, clock=clock)
    assert source == "origin"
    assert asked and asked[0] >= blob_seconds(len(DATA), 5.0) - 0.01
