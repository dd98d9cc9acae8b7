"""The peer tier on its own: rendezvous hashing, hedging under a mock clock, and the chunk
fetcher with scripted peers (right bytes whatever the peers do)."""

from __future__ import annotations

import math
import os
import random
from functools import partial

import pytest
import trio
import trio.testing

from blockindex.codec import decode
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.errors import RefusedError, ServerError, UnreachableError
from fetcher.http1 import RangeClient
from fetcher.peers import PeerConfig, PeerSet, PeerTier, read_peers_file, rendezvous

from .fakes import BatchesByChunk, ScriptedSource, make_blob, peer_answer

PEERS = [f"http://10.0.0.{i}:7070" for i in range(1, 11)]


def _digests(n: int) -> list[bytes]:
    rnd = random.Random(4)
    return [rnd.randbytes(32) for _ in range(n)]


def test_rendezvous_spreads_chunks_evenly():
    counts = dict.fromkeys(PEERS, 0)
    digests = _digests(20000)
    for d in digests:
        counts[rendezvous(d, PEERS)[0]] += 1
    mean = len(digests) / len(PEERS)
    assert all(abs(c - mean) < 0.1 * mean for c in counts.values()), counts
    # the order does not depend on how the list is written
    assert all(rendezvous(d, PEERS) == rendezvous(d, PEERS[::-1]) for d in digests[:100])


def test_rendezvous_moves_only_the_chunks_of_a_peer_that_leaves():
    digests = _digests(5000)
    gone = PEERS[3]
    rest = [p for p in PEERS if p != gone]
    for d in digests:
        before, after = rendezvous(d, PEERS)[0], rendezvous(d, rest)[0]
        if before != gone:
            assert after == before
        else:  # the next in its order takes over
            assert after == rendezvous(d, PEERS)[1]


def test_no_owner_for_a_chunk_of_this_node_and_avoided_peers_are_skipped():
    now = [0.0]
    peers = PeerSet(PEERS[:3], self_url=PEERS[0], clock=lambda: now[0],
                    config=PeerConfig(down_backoff=1.0))
    mine = next(d for d in _digests(100) if rendezvous(d, PEERS[:3])[0] == PEERS[0])
    assert peers.owners(mine, 1) == []
    theirs = next(d for d in _digests(100) if rendezvous(d, PEERS[:3])[0] == PEERS[1])
    assert peers.owners(theirs, 1) == [PEERS[1]]
    peers.mark_down(PEERS[1], "refused")
    nxt = rendezvous(theirs, PEERS[:3])[1]
    assert peers.owners(theirs, 1) == ([] if nxt == PEERS[0] else [nxt])
    now[0] = 1.5  # backoff over
    assert peers.owners(theirs, 1) == [PEERS[1]]
    peers.mark_down(PEERS[1], "refused")
    peers.mark_down(PEERS[1], "refused")  # the third failure in a row: 1, 2, then 4 s
    assert peers.health[PEERS[1]].avoid_until == pytest.approx(1.5 + 4.0)


def test_a_peer_that_refused_the_connection_is_asked_again_soon():
    """Nothing listening is a node still starting as often as one stopped, and asking again
    costs a round trip: its first pause is short, then doubles as any other's."""
    now = [0.0]
    peers = PeerSet(PEERS[:3], self_url=PEERS[0], clock=lambda: now[0],
                    config=PeerConfig(down_backoff=1.0, refused_backoff=0.05))
    peers.mark_down(PEERS[1], RefusedError("cannot connect: Connection refused"))
    assert peers.health[PEERS[1]].avoid_until == pytest.approx(0.05)
    peers.mark_down(PEERS[1], RefusedError("cannot connect: Connection refused"))
    assert peers.health[PEERS[1]].avoid_until == pytest.approx(0.1)
    peers.mark_down(PEERS[2], UnreachableError("cannot connect: timed out"))
    assert peers.health[PEERS[2]].avoid_until == pytest.approx(1.0)


def test_a_large_chunk_is_waited_for_longer_before_a_hedge():
    """Its owner fetches it whole from the origin before it sends a byte: its size over
    ``hedge_rate`` is added to the hedge delay."""
    peers = PeerSet(PEERS[:3], self_url=PEERS[0], config=PeerConfig(hedge_delay=0.08, hedge_rate=4 << 20))
    assert peers.hedge_delay() == pytest.approx(0.08)
    assert peers.hedge_delay(1 << 20) == pytest.approx(0.08 + 0.25)
    assert peers.hedge_delay(16 << 10) < peers.hedge_delay(512 << 10)


def test_a_closed_port_is_a_refused_connection():
    async def main():
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # bound, never listening: the kernel refuses
        client = RangeClient("127.0.0.1", port, connect_timeout=5)
        with pytest.raises(RefusedError, match="refused"):
            await client.get_range("/x", 0, 1, deadline=trio.current_time() + 5)
    trio.run(main)


def test_a_node_served_by_its_lazyfs_peer_asks_it_for_what_it_owns():
    """--advertise without --listen: the node's chunks go through its `lazyfs peer` (the
    last one asked), which fetches each once for the node's mounts and the other nodes."""
    peers = PeerSet(PEERS[:3], self_url=PEERS[0], served_elsewhere=True)
    mine = next(d for d in _digests(100) if rendezvous(d, PEERS[:3])[0] == PEERS[0])
    assert peers.owners(mine, 2) == [PEERS[0]]
    second = next(d for d in _digests(100) if rendezvous(d, PEERS[:3])[1] == PEERS[0])
    assert peers.owners(second, 2) == rendezvous(second, PEERS[:3])[:2]
    peers.mark_down(PEERS[0], "refused")  # its lazyfs peer is down: the origin
    assert peers.owners(mine, 2) == []


def test_peers_file_is_read_and_checked(tmp_path):
    f = tmp_path / "peers"
    f.write_text("# cluster\nhttp://127.0.0.1:7001\n127.0.0.1:7002  # no scheme\n\nhttp://127.0.0.1:7001/\n")
    assert read_peers_file(f) == ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
    f.write_text("ftp://x:1\n")
    with pytest.raises(ValueError, match="peers:1"):
        read_peers_file(f)


# -- the fetcher with scripted peers ----------------------------------------------------

class ScriptedPeers(BatchesByChunk):
    """A PeerClient whose answers follow a script: ``ok``, ``corrupt``, ``refused``, ``stall``."""

    def __init__(self, raw: bytes, script: list[str]) -> None:
        self.raw = raw
        self.script = script
        self.asked: list[str] = []

    async def fetch(self, peer, chunk, repository):
        self.asked.append(peer)
        return await peer_answer(self.raw, chunk, peer, self.script.pop(0) if self.script else "ok")


PIECES = [os.urandom(5000), b"a" * 7000, os.urandom(3000)]


def run_with_peers(tmp_path, script, clock=None):
    blob, chunks, raw = make_blob(PIECES)
    origin = ScriptedSource({blob.digest: raw})
    peers = PeerSet(["http://10.0.0.2:7070"], self_url="http://10.0.0.1:7070",
                    config=PeerConfig(hedge_delay=0.05, hedge_rate=math.inf))
    client = ScriptedPeers(raw, list(script))
    out = {}

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(nursery, origin, ChunkStore(tmp_path), FetchConfig(deadline=5),
                                   peers=PeerTier(peers, client, "reg/app"))  # type: ignore[arg-type]
            out["data"] = await fetcher.get(chunks)
            out["stats"] = fetcher.stats
            out["time"] = trio.current_time()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock or trio.testing.MockClock(autojump_threshold=0))
    assert [out["data"][c.digest] for c in chunks] == PIECES
    return origin, peers, client, out


def test_chunks_come_from_the_peer_and_not_the_origin(tmp_path):
    origin, peers, client, out = run_with_peers(tmp_path, [])
    assert origin.requests == [] and len(client.asked) == 3
    assert peers.health["http://10.0.0.2:7070"].chunks == 3 and out["stats"].peer_chunks == 3


def test_a_lying_peer_is_avoided_and_the_origin_answers(tmp_path, caplog):
    origin, peers, client, out = run_with_peers(tmp_path, ["corrupt", "corrupt", "corrupt"])
    assert len(origin.requests) == 3
    assert peers.bad_peers() == ["http://10.0.0.2:7070"]
    assert "peer http://10.0.0.2:7070 sent wrong bytes" in caplog.text
    assert out["stats"].peer_integrity_failures == 3


def test_a_stalled_peer_is_hedged_after_the_delay(tmp_path):
    origin, peers, client, out = run_with_peers(tmp_path, ["stall", "stall", "stall"])
    assert len(origin.requests) == 3 and out["stats"].hedge_wins == 3
    assert out["time"] == pytest.approx(0.05, abs=0.01)  # not the peer's 10 s deadline


def test_a_down_peer_is_skipped_with_backoff(tmp_path):
    origin, peers, client, out = run_with_peers(tmp_path, ["refused", "refused", "refused"])
    assert len(origin.requests) == 3 and out["time"] < 0.01  # at once, no hedge delay
    assert peers.health["http://10.0.0.2:7070"].avoid_until > 0
    assert peers.owners(b"\0" * 32, 1) == []  # avoided: straight to the origin


def test_runner_up_skips_this_node_and_avoided_peers():
    from fetcher.peers import PeerSet, rendezvous

    peers = ["http://a:1", "http://b:1", "http://c:1"]
    digest = next(d for d in (bytes([i]) * 32 for i in range(256))
                  if rendezvous(d, peers) == ["http://c:1", "http://b:1", "http://a:1"])
    now = [0.0]
    ps = PeerSet(peers, self_url="http://b:1", clock=lambda: now[0])
    assert ps.owners(digest, 1) == ["http://c:1"]
    ps.mark_down("http://c:1", "refused")  # the owner is down; this node comes next
    assert ps.owners(digest, 1) == []
    assert ps.runner_up(digest) == "http://a:1"  # a prefetched before: ask it, cache-only


# -- owner, next owner, origin ------------------------------------------------------------

class ClusterPeers(BatchesByChunk):
    """A PeerClient with a script per peer: ``ok``, ``corrupt``, ``refused``, ``missing``
    (404), ``stall``, or ``slow:<seconds>`` (answers right after that long)."""

    def __init__(self, raw: bytes, scripts: dict[str, list[str]]) -> None:
        self.raw = raw
        self.scripts = {p: list(s) for p, s in scripts.items()}
        self.asked: list[tuple[str, str | None, float]] = []  # peer, repository, when

    async def fetch(self, peer, chunk, repository):
        self.asked.append((peer, repository, trio.current_time()))
        await trio.lowlevel.checkpoint()
        script = self.scripts.get(peer, [])
        outcome = script.pop(0) if script else "ok"
        data = bytearray(self.raw[chunk.offset : chunk.offset + chunk.stored_size])
        if outcome == "refused":
            raise UnreachableError(f"cannot connect to {peer}")
        if outcome == "missing":
            raise ServerError(f"peer {peer} has no chunk (404)")
        if outcome == "stall":
            await trio.sleep_forever()
        if outcome.startswith("slow:"):
            await trio.sleep(float(outcome[5:]))
        if outcome == "corrupt":
            data[0] ^= 0xFF
        return data


class TimedSource(ScriptedSource):
    """A ScriptedSource that notes when each request came."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.times: list[float] = []

    async def read_range(self, digest, offset, length):
        self.times.append(trio.current_time())
        return await super().read_range(digest, offset, length)


CLUSTER = ["http://10.0.1.1:7070", "http://10.0.1.2:7070", "http://10.0.1.3:7070"]
ONE = [random.Random(41).randbytes(6000)]  # fixed: the roles below depend on its digest


def _self_at(digest: bytes, position: int) -> str:
    """A URL for this node that comes at ``position`` in ``digest``'s rendezvous order."""
    return next(u for u in (f"http://10.9.{i // 250}.{i % 250 + 1}:7070" for i in range(100_000))
                if rendezvous(digest, [*CLUSTER, u]).index(u) == position)


def run_cluster(tmp_path, scripts, *, self_position=3, origin_script=(), deadline=5.0,
                hedged_before=0, background=False):
    """One chunk read on a node of a four-node cluster (three peers and this node at
    ``self_position`` in the chunk's order). Returns (roles, origin, client, out):
    ``roles`` are the peers in rendezvous order for the chunk."""
    blob, chunks, raw = make_blob(ONE)
    [chunk] = chunks
    me = _self_at(chunk.digest, self_position)
    roles = [u for u in rendezvous(chunk.digest, [*CLUSTER, me]) if u != me]
    origin = TimedSource({blob.digest: raw}, origin_script)
    peers = PeerSet([*CLUSTER, me], self_url=me, config=PeerConfig(hedge_delay=0.05, hedge_rate=math.inf))
    client = ClusterPeers(raw, {roles[i]: s for i, s in enumerate(scripts)})
    out = {"peers": peers, "digest": chunk.digest}

    async def main():
        async with trio.open_nursery() as nursery:
            # no store for a prefetch: its cache write runs in a thread, and the mock clock
            # would jump to the prefetch's deadline while it does
            store = None if background else ChunkStore(tmp_path)
            fetcher = ChunkFetcher(nursery, origin, store, FetchConfig(deadline=deadline),
                                   peers=PeerTier(peers, client, "reg/app"))  # type: ignore[arg-type]
            fetcher.stats.hedged = hedged_before
            try:
                out["data"] = await fetcher.get(chunks, background=background)
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                out["error"] = exc
            out["stats"] = fetcher.stats
            out["time"] = trio.current_time()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if "data" in out:
        assert out["data"][chunk.digest] == ONE[0]
    return roles, origin, client, out


def test_a_down_owner_is_followed_by_the_next_owner_not_the_origin(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["refused"], ["ok"]])
    owner, nxt = roles[0], roles[1]
    assert [(p, r) for p, r, _ in client.asked] == [(owner, "reg/app"), (nxt, "reg/app")]
    assert origin.requests == [] and out["time"] < 0.01  # at once, no hedge delay
    assert out["peers"].health[owner].avoid_until > 0  # down: on backoff
    assert owner not in out["peers"].owners(out["digest"], 3)  # and not asked again for now


def test_a_slow_owner_is_hedged_to_the_next_owner(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["stall"], ["slow:0.01"]])
    assert [p for p, _, _ in client.asked] == roles[:2]
    assert client.asked[1][2] == pytest.approx(0.05)  # the hedge delay
    assert origin.requests == [] and out["time"] == pytest.approx(0.06)
    st = out["stats"]
    assert (st.hedged, st.hedge_wins, st.origin_after_peers) == (1, 1, 0)


def test_two_slow_owners_are_hedged_to_the_origin(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["stall"], ["stall"], ["ok"]])
    assert [p for p, _, _ in client.asked] == roles[:2]  # never a third peer
    assert len(origin.requests) == 1 and out["time"] == pytest.approx(0.10)
    assert out["stats"].hedged == 2 and out["stats"].origin_after_peers == 1


def test_a_lying_owner_is_reported_and_the_next_owner_answers(tmp_path, caplog):
    roles, origin, client, out = run_cluster(tmp_path, [["corrupt"], ["ok"]])
    assert origin.requests == [] and [p for p, _, _ in client.asked] == roles[:2]
    assert out["peers"].bad_peers() == [roles[0]]
    assert f"peer {roles[0]} sent wrong bytes" in caplog.text
    assert roles[0] not in out["peers"].owners(out["digest"], 3)


def test_when_every_peer_fails_the_origin_answers(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["corrupt"], ["missing"]])
    assert len(origin.requests) == 1 and out["time"] < 0.01
    assert out["stats"].origin_after_peers == 1


def test_when_the_origin_fails_too_the_read_fails_with_the_origins_error(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["refused"], ["refused"]], origin_script=["fail"])
    assert isinstance(out["error"], ServerError) and "scripted failure" in str(out["error"])


def test_when_this_node_is_next_a_failed_owner_goes_to_the_origin(tmp_path):
    """This node is the next owner: it fetches from the origin itself (no third peer)."""
    roles, origin, client, out = run_cluster(tmp_path, [["stall"], ["ok"]], self_position=1)
    assert [p for p, _, _ in client.asked] == roles[:1]
    assert len(origin.requests) == 1 and out["time"] == pytest.approx(0.05)


def test_a_spent_hedge_budget_still_reaches_the_origin_within_the_deadline(tmp_path):
    """Past the budget a slow peer is not hedged, but the origin is still asked at half
    the read's deadline: peers never make a read fail that the origin would serve."""
    roles, origin, client, out = run_cluster(tmp_path, [["stall"], ["stall"]], deadline=4.0,
                                             hedged_before=10**6)
    assert [p for p, _, _ in client.asked] == roles[:1]  # no hedge to the next owner
    assert len(origin.requests) == 1 and out["time"] == pytest.approx(2.0)
    assert "data" in out


def test_prefetch_waits_for_a_slow_owner_and_falls_back_to_the_next_owner(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["slow:3"], ["ok"]], background=True)
    assert [p for p, _, _ in client.asked] == roles[:1]  # no hedging in the background
    assert origin.requests == [] and out["stats"].hedged == 0
    roles, origin, client, out = run_cluster(tmp_path, [["refused"], ["missing"]], background=True)
    assert [p for p, _, _ in client.asked] == roles[:2] and len(origin.requests) == 1


def test_prefetch_of_a_chunk_this_node_owns_asks_the_runner_up_cache_only(tmp_path):
    roles, origin, client, out = run_cluster(tmp_path, [["ok"]], self_position=0, background=True)
    assert [(p, r) for p, r, _ in client.asked] == [(roles[0], None)] and origin.requests == []
    # a demand read of a chunk this node owns goes straight to the origin
    roles, origin, client, out = run_cluster(tmp_path / "d", [["ok"]], self_position=0)
    assert client.asked == [] and len(origin.requests) == 1


def test_peers_file_watcher_reads_changes_and_keeps_the_last_good_list(tmp_path, caplog):
    from fetcher.peers import PeersFileWatcher

    f = tmp_path / "peers"
    f.write_text("http://10.0.0.1:1\n")
    peers = PeerSet()
    w = PeersFileWatcher(f, peers)
    assert w.load() and peers.peers == ["http://10.0.0.1:1"]
    assert not w.load()  # unchanged
    f.write_text("http://10.0.0.1:1\nhttp://10.0.0.2:1\n")
    os.utime(f, ns=(1, 10**18))
    assert w.load() and peers.peers == ["http://10.0.0.1:1", "http://10.0.0.2:1"]
    f.write_text("not a url at all\n")
    os.utime(f, ns=(1, 2 * 10**18))
    assert not w.load() and peers.peers == ["http://10.0.0.1:1", "http://10.0.0.2:1"]
    assert "unusable" in caplog.text


# -- two fetchers asking each other ----------------------------------------------------------

class DelaySource:
    """An origin that answers each range after the delay given for its offset."""

    def __init__(self, raw: bytes, digest: str, delays: dict[int, float]) -> None:
        self.raw, self.digest, self.delays = raw, digest, delays
        self.requests: list[int] = []

    def blame(self, digest: str, offset: int, length: int) -> bool:
        return False  # the only sender

    async def read_range(self, digest, offset, length):
        assert digest == self.digest
        self.requests.append(offset)
        await trio.sleep(self.delays.get(offset, 0.0))
        return self.raw[offset : offset + length]


class Loopback(BatchesByChunk):
    """A PeerClient that asks the other fetcher as a node's chunk server does."""

    def __init__(self) -> None:
        self.servers: dict[str, ChunkFetcher] = {}

    async def fetch(self, peer, chunk, repository):
        if repository is None:
            raise ServerError(f"peer {peer} has no chunk (404)")  # no cache in this test
        return bytearray(await self.servers[peer].get_payload(chunk))


def test_prefetches_waiting_for_reads_do_not_deadlock_two_nodes(tmp_path):
    """Each node's prefetch of a chunk it owns waits for its own reads to end; each node's
    read asks the other for the chunk that node's prefetch holds. A read (or a peer) that
    finds a chunk queued for prefetch fetches it at once rather than waiting behind it."""
    a, b = "http://10.0.2.1:7070", "http://10.0.2.2:7070"
    pieces = [os.urandom(3000) for _ in range(24)]
    blob, chunks, raw = make_blob(pieces)
    owned = {u: [c for c in chunks if rendezvous(c.digest, [a, b])[0] == u] for u in (a, b)}
    (busy_a, d), (busy_b, c) = owned[a][:2], owned[b][:2]  # d: a's, c: b's
    origin = DelaySource(raw, blob.digest, {busy_a.offset: 1.0, busy_b.offset: 1.0})
    client = Loopback()
    done = {}

    async def main():
        async with trio.open_nursery() as nursery:
            for me in (a, b):
                client.servers[me] = ChunkFetcher(
                    nursery, origin, None, FetchConfig(deadline=10),
                    peers=PeerTier(PeerSet([a, b], self_url=me), client, "reg/app"))  # type: ignore[arg-type]
            fa, fb = client.servers[a], client.servers[b]
            fa.stats.hedged = fb.stats.hedged = 10**6  # hedge budget spent: no way round a wait

            async def read(name, fetcher, chunk, **kw):
                got = await fetcher.get([chunk], **kw)
                assert got[chunk.digest] == pieces[chunks.index(chunk)]
                done[name] = trio.current_time()

            nursery.start_soon(read, "busy a", fa, busy_a)  # keeps a's reads going for 1 s
            nursery.start_soon(read, "busy b", fb, busy_b)
            await trio.sleep(0.01)
            nursery.start_soon(partial(read, "prefetch a", fa, d, background=True))
            nursery.start_soon(partial(read, "prefetch b", fb, c, background=True))
            await trio.sleep(0.1)
            nursery.start_soon(read, "a reads c", fa, c)
            nursery.start_soon(read, "b reads d", fb, d)
            await trio.sleep(20)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert done["a reads c"] == pytest.approx(0.11) and done["b reads d"] == pytest.approx(0.11)
    assert done["prefetch a"] == pytest.approx(0.11) and done["prefetch b"] == pytest.approx(0.11)
    assert sorted(origin.requests) == sorted([busy_a.offset, busy_b.offset, c.offset, d.offset])


def test_a_peer_found_to_be_this_node_is_never_asked_again():
    digest = next(d for d in _digests(200) if rendezvous(d, CLUSTER)[0] == CLUSTER[1])
    ps = PeerSet(CLUSTER, self_url=CLUSTER[0])
    assert ps.owners(digest, 2)[0] == CLUSTER[1]
    ps.mark_self(CLUSTER[1])  # the same node under a second address
    assert ps.owners(digest, 2) == []
    assert ps.self_url == CLUSTER[0]
    unknown = PeerSet(CLUSTER)
    unknown.mark_self(CLUSTER[2])
    assert unknown.self_url == CLUSTER[2]


def test_prefetch_asks_the_origin_by_one_peer_deadline_when_peers_hang(tmp_path):
    """A reader may come to wait on a prefetch's chunk: two hanging owners must not hold
    it for two peer deadlines (or more) before the origin is asked."""
    roles, origin, client, out = run_cluster(tmp_path, [["stall"], ["stall"]], background=True)
    assert len(origin.requests) == 1 and "data" in out
    assert origin.times[0] <= PeerConfig().request_deadline + 1e-6


# -- the chunk server's limits on its callers -------------------------------------------------

PEER_TOKEN = "s3cret-cluster-token-0123456789"


def test_the_peer_server_caps_connections_and_drops_callers_that_stop_reading(tmp_path):
    """Past ``max_connections`` a connection is closed as it comes; a token holder that
    asks for a chunk and never reads the answer loses the connection after
    ``send_timeout``, and the server serves others all along."""
    from lazyfs.peer import ChunkServer, PeerServerConfig

    store = ChunkStore(tmp_path / "cache")
    big = os.urandom(48 << 20)  # more than loopback's socket buffers hold
    digest = bytes(range(32))
    assert store.put(digest, big)
    config = PeerServerConfig(max_connections=3, send_timeout=1.0)
    request = (f"GET /v1/chunks/{digest.hex()} HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {PEER_TOKEN}\r\n\r\n").encode()

    async def until(condition) -> None:
        with trio.fail_after(10):
            while not condition():  # noqa: ASYNC110 - the server's counters, no event to wait on
                await trio.sleep(0.02)

    async def receive_all(stream: trio.SocketStream) -> bytes:
        out = bytearray()
        while part := await stream.receive_some(1 << 20):
            out += part
        return bytes(out)

    async def main() -> None:
        server = ChunkServer(store, PEER_TOKEN, config=config)
        listeners = await ChunkServer.listen_on("127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listeners)
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await until(lambda: server._connections.open == 3)
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                assert await receive_all(extra) == b""  # closed at once, no answer
            assert server.stats.refused_connections == 1
            await idle.pop().aclose()
            await until(lambda: server._connections.open == 2)
            # a caller that asks and never reads: cut off after the send timeout
            stalled = await trio.open_tcp_stream("127.0.0.1", port)
            await stalled.send_all(request)
            await until(lambda: server.stats.send_timeouts == 1)
            got = await receive_all(stalled)  # what the buffers held, then the end
            assert 0 < len(got) < len(big)
            # and the server still answers a caller that reads
            reader = await trio.open_tcp_stream("127.0.0.1", port)
            await reader.send_all(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            with trio.fail_after(10):
                answer = await receive_all(reader)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(big[-1000:])
            for s in (*idle, extra, stalled, reader):
                await s.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_peer_serves_zstd_chunks_from_its_cache_to_a_fetcher(tmp_path):
    """A node's fetcher gets zstd chunks from a real peer server on loopback, whose cache
    holds their bytes (re-encoded as zstd to be sent); the request names the chunk's codec (zstd) so that an
    owner without it could fetch it from the origin. The origin is never asked."""
    from blockindex.format import CODEC_RAW, CODEC_ZSTD
    from fetcher.peers import PeerClient
    from lazyfs.peer import ChunkServer

    pieces = [b"compressible text " * 600, bytes(range(256)) * 40, os.urandom(3000)]
    blob, chunks, raw = make_blob(pieces, codec=CODEC_ZSTD)
    assert [c.codec for c in chunks] == [CODEC_ZSTD, CODEC_ZSTD, CODEC_RAW]
    peer_store = ChunkStore(tmp_path / "peer")
    for c in chunks:
        assert peer_store.put(c.digest, decode(c.codec, c.size, raw[c.offset : c.offset + c.stored_size]))
    origin = ScriptedSource({blob.digest: raw})
    out = {}

    async def main() -> None:
        server = ChunkServer(peer_store, PEER_TOKEN)
        listeners = await ChunkServer.listen_on("127.0.0.1", 0)
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        client = PeerClient(PEER_TOKEN)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listeners)
            # a hedge to the origin only after 5 s: a slow first answer on a busy machine is
            # still the peer's (hedging has tests of its own)
            calm = PeerConfig(hedge_delay=5.0, max_hedge_delay=5.0)
            tier = PeerTier(PeerSet([url], self_url="http://127.0.0.1:1", config=calm), client, "reg/app")
            fetcher = ChunkFetcher(nursery, origin, ChunkStore(tmp_path / "node"),
                                   FetchConfig(deadline=10), peers=tier)
            out["data"] = await fetcher.get(chunks)
            out["stats"] = fetcher.stats
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert [bytes(out["data"][c.digest]) for c in chunks] == pieces
    assert origin.requests == [] and out["stats"].peer_chunks == 3
