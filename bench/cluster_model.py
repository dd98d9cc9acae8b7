"""A discrete-event model of a lazyfs cluster starting one image: what the peers design
costs at 1,000 nodes, where it cannot be measured (``bench/peers_bench.py`` measures 1-8).

    python3 bench/cluster_model.py                      # 1,000 nodes, 10,000 containers
    python3 bench/cluster_model.py --nodes 100 --fill   # and every node's full fill
    python3 bench/cluster_model.py --calibrate bench/results/<UTC>/peers_bench/peers.json

What is modelled (``Params`` has every number, its default and why), following
``fetcher/peerroute.py``, ``race.py``, ``peers.py`` and ``lazyfs/peer.py``:

- The image is cut into pieces: the start's ``start_requests`` reads of ``start_bytes``
  in all, then (``fill``) the rest in ``fill_request`` ranges. A piece has one owner by
  rendezvous hashing (``fetcher.peers.rendezvous``) over every node; the real owner is
  per chunk, so the model's owners are fewer and hotter (a piece of several chunks is
  one owner, but each chunk is still one peer request: ``request_cost`` is paid per
  ``chunks_per_request`` chunks). Containers on a node share its cache.
- A node asks the owner, then the next owner, then the origin (``Race``): the next is
  started when all before it failed, or (demand reads) after the hedge delay if the
  budget (2% of peer requests plus 3) allows; the origin at the latest after
  ``min(request_deadline, deadline / 2)``. A node that owns a piece asks the origin.
- A peer serves at most ``server_slots`` requests at once (503 past that: the caller
  moves on); it fetches a piece it lacks by its own route first (coalesced), spends
  ``request_cost`` CPU seconds per request on one core, then sends it over its uplink
  and the caller's downlink. The origin's link is shared by everyone.
- Faults: ``fail_at`` takes the busiest owner down (its transfers are cut, new requests
  refused: the caller avoids it with backoff); ``liars`` is the fraction of nodes that
  send wrong bytes: the caller checks the digest, avoids the liar for 5 minutes and
  asks the next source (``verify`` False: no check, for the tests).
- ``tree`` > 0: a node asks its parent in a ``tree``-ary tree over the piece's
  rendezvous order first (the owner at the root), as DADI and FaaSNet do.

The command line, scenarios, calibration and comparisons: ``bench/cluster_report.py``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster_node import ORIGIN, Node, Piece, Race  # noqa: E402
from bench.cluster_sim import Sim  # noqa: E402
from fetcher.peers import rendezvous  # noqa: E402

MiB = 1 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Params:
    nodes: int = 1000
    containers: int = 10000
    """Containers started at once, spread evenly over the nodes (they share the node's cache)."""
    image_bytes: int = 256 * MiB
    """The suite's Debian image (python3 and numpy), about 256 MiB."""
    chunks: int = 13800
    """Chunks in the image: 19 KiB on average, as the python image (1,359 chunks, 25.9 MB)."""
    start_bytes: int = 12 * MiB
    start_requests: int = 60
    """What a container start reads: 12.1 MiB in about 60 requests (the suite's cold start)."""
    start_concurrency: int = 4
    """Start reads in flight at once per container (readahead and threads)."""
    fill: bool = False
    """Also fill every node's cache with the whole image (the background prefetch)."""
    fill_request: int = 4 * MiB
    fill_concurrency: int = 8
    """Prefetch ranges (``FetchConfig.background_max_request``) and how many at once with peers."""
    peers: bool = True
    node_bps: float = 125e6
    node_rtt: float = 0.0005
    """Each node's link, each way (1 Gbit/s), and the round trip between nodes."""
    origin_bps: float = 1.25e9
    origin_rtt: float = 0.002
    """The registry's link shared by all (10 Gbit/s) and its round trip."""
    request_cost: float = 0.0005
    """CPU seconds a peer server spends on one request (HTTP, cache read, send)."""
    recv_cost: float = 0.0
    """CPU seconds a node spends per chunk it receives (check, decode, write)."""
    chunks_per_request: int = 64
    """Chunks a node asks of a peer in one request (a batch, ``peerwire.MAX_BATCH_CHUNKS``;
    1 before batches: one request per chunk)."""
    server_slots: int = 32
    """Requests a peer serves at once, 503 past that (``PeerServerConfig.max_concurrent``); 0: no limit."""
    cores: int = 2
    shared_cores: int = 0
    """CPU cores per node; ``shared_cores`` > 0: one CPU for all nodes (the benchmark's machine)."""
    mount_cpu: float = 0.0
    start_cpu: float = 0.0
    """CPU seconds of a node's mount before its containers start, and of each start itself."""
    hedge_delay: float = 0.08
    max_hedge_delay: float = 1.0
    hedge_rate: float = 4 << 20
    """A chunk's stored size over this is added to its hedge delay (``PeerConfig.hedge_rate``)."""
    hedge_budget: float = 0.02
    hedge_burst: int = 3
    request_deadline: float = 10.0
    deadline: float = 30.0
    """``PeerConfig`` and ``FetchConfig``: hedging, a peer request's deadline, a read's."""
    down_backoff: float = 1.0
    bad_peer_penalty: float = 300.0
    fail_at: float | None = None
    """Seconds into the run at which the node owning the most start pieces goes down."""
    liars: float = 0.0
    verify: bool = True
    tree: int = 0
    seed: int = 0
    resolution: float = 0.001
    """Seconds between recomputations of the links' shares (``cluster_sim``); 0: exact."""


class Cluster:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.sim = Sim(p.resolution)
        net = self.sim.net
        self.origin_link = net.link(p.origin_bps)
        shared_cpu = net.link(float(p.shared_cores)) if p.shared_cores else 0
        self.nodes = [Node(i, net.link(p.node_bps), net.link(p.node_bps),
                           shared_cpu or net.link(float(p.cores))) for i in range(p.nodes)]
        self.pieces = self._pieces()
        self.counts = dict(origin_bytes=0.0, origin_requests=0, peer_requests=0, busy=0, hedges=0,
                           refused=0, wrong_rejected=0, wrong_accepted=0, timeouts=0, cut=0)
        if p.liars:
            for i in random.Random(p.seed).sample(range(p.nodes), max(1, round(p.liars * p.nodes))):
                self.nodes[i].liar = True

    def _pieces(self) -> list[Piece]:
        p = self.p
        per_chunk = p.image_bytes / p.chunks
        sizes = [p.start_bytes // p.start_requests] * p.start_requests
        if p.fill:
            rest = p.image_bytes - sum(sizes)
            whole, part = divmod(rest, p.fill_request)
            sizes += [p.fill_request] * whole + ([part] if part else [])
        names = [f"n{i}" for i in range(p.nodes)]
        index = {n: i for i, n in enumerate(names)}
        out = []
        for k, size in enumerate(sizes):
            digest = hashlib.blake2b(f"{p.seed}:{k}".encode(), digest_size=32).digest()
            order = [index[n] for n in rendezvous(digest, names)] if p.peers else []
            out.append(Piece(size, max(1, round(size / per_chunk)), order, k < p.start_requests))
        return out

    # -- a node's view of its peers -------------------------------------------------------

    def asks(self, n: Node, k: int) -> list[int]:
        """Whom ``n`` asks for piece ``k`` before the origin (``PeerSet.owners``, limit 2),
        after its parent in the tree if there is one."""
        p, piece, now = self.p, self.pieces[k], self.sim.now
        if not p.peers:
            return []
        out: list[int] = []
        if p.tree:
            pos = piece.order.index(n.i)
            if pos:
                parent = piece.order[(pos - 1) // p.tree]
                if n.avoid.get(parent, -1.0) <= now:
                    out.append(parent)
        limit = len(out) + 2
        for j in piece.order:
            if j == n.i or len(out) == limit:
                break
            if n.avoid.get(j, -1.0) <= now and j not in out:
                out.append(j)
        return out

    def hedge_delay(self, n: Node, k: int) -> float:
        """``PeerSet.hedge_delay`` for a chunk of piece ``k`` (its pieces' average chunk)."""
        piece = self.pieces[k]
        base = min(self.p.max_hedge_delay, max(self.p.hedge_delay, 3 * n.latency))
        return base + piece.size / piece.chunks / self.p.hedge_rate

    def may_hedge(self, n: Node) -> bool:
        if n.hedged < self.p.hedge_budget * n.peer_requests + self.p.hedge_burst:
            n.hedged += 1
            self.counts["hedges"] += 1
            return True
        return False

    # -- getting a piece into a node's cache ---------------------------------------------

    def get(self, n: Node, k: int, demand: bool, then: Callable[[], Any]) -> None:
        """Call ``then`` once ``n`` holds piece ``k`` (one fetch however many wait)."""
        if k in n.cached:
            then()
            return
        if k in n.waiting:
            n.waiting[k].append(then)
            return
        n.waiting[k] = [then]
        asks = self.asks(n, k)
        if demand and asks:
            n.peer_requests += 1

        def got(right: bool) -> None:
            if n.failed:
                return
            n.cached[k] = right
            for fn in n.waiting.pop(k):
                fn()
        Race(self, n, k, asks, demand, got)

    def attempt(self, n: Node, k: int, source: int, ok: Callable[[bool], Any],
                fail: Callable[[], Any]) -> Callable[[], Any]:
        """Ask ``source`` (a node, or ``ORIGIN``) for piece ``k``; a function that cancels."""
        if source == ORIGIN:
            return self._from_origin(n, k, ok)
        return self._from_peer(n, self.nodes[source], k, ok, fail)

    def _from_origin(self, n: Node, k: int, ok: Callable[[bool], Any]) -> Callable[[], Any]:
        p, sim, piece = self.p, self.sim, self.pieces[k]
        self.counts["origin_requests"] += 1
        state: dict[str, Any] = {"flow": None, "over": False}

        def arrived() -> None:
            state["flow"] = None
            self.counts["origin_bytes"] += piece.size
            self._received(n, piece, lambda: sim.at(p.origin_rtt / 2, lambda: state["over"] or ok(True)))

        def send() -> None:
            if not state["over"]:
                state["flow"] = sim.net.start(piece.size, self.origin_link, n.down, done=arrived)

        def cancel() -> None:
            state["over"] = True
            if state["flow"] is not None:
                self.counts["origin_bytes"] += sim.net.cancel(state["flow"])
        sim.at(p.origin_rtt / 2, send)
        return cancel

    def _received(self, n: Node, piece: Piece, then: Callable[[], Any]) -> None:
        self._cpu(n, self.p.recv_cost * piece.chunks, then)

    def _from_peer(self, n: Node, s: Node, k: int, ok: Callable[[bool], Any],
                   fail: Callable[[], Any]) -> Callable[[], Any]:
        p, sim, piece = self.p, self.sim, self.pieces[k]
        requests = math.ceil(piece.chunks / p.chunks_per_request)
        self.counts["peer_requests"] += requests
        half = p.node_rtt / 2
        started = sim.now
        st: dict[str, Any] = {"over": False, "flow": None, "slot": False}

        def release() -> None:
            if st["slot"]:
                st["slot"] = False
                s.active -= 1

        def end(outcome: Callable[[], Any]) -> None:
            if not st["over"]:
                st["over"] = True
                release()
                deadline.cancel()
                outcome()

        def timeout() -> None:
            self.counts["timeouts"] += 1
            cut()
            end(fail)

        def cut() -> None:
            if st["flow"] is not None:
                sim.net.cancel(st["flow"])
                st["flow"] = None

        def reset() -> None:  # the server went down mid-request
            self.counts["cut"] += 1
            cut()
            self._mark_down(n, s)
            end(fail)

        def arrive() -> None:
            if s.failed:
                self.counts["refused"] += 1
                self._mark_down(n, s)
                sim.at(half, lambda: end(fail))
            elif p.server_slots and s.active >= p.server_slots:
                self.counts["busy"] += 1
                sim.at(half, lambda: end(fail))
            else:
                st["slot"] = True
                s.active += 1
                s.cleanups.append(lambda: st["over"] or reset())
                self.get(s, k, False, serve)

        def serve() -> None:
            if not st["over"]:
                sim.net.start(p.request_cost * requests, s.cpu, max_rate=1.0, done=send)

        def send() -> None:
            if not st["over"] and not s.failed:
                st["flow"] = sim.net.start(piece.size, s.up, n.down, done=sent)

        def sent() -> None:
            st["flow"] = None
            release()
            self._received(n, piece, lambda: sim.at(half, check))

        def check() -> None:
            if st["over"]:
                return
            if s.liar or not s.cached.get(k, True):
                if p.verify:
                    self.counts["wrong_rejected"] += 1
                    n.avoid[s.i] = sim.now + p.bad_peer_penalty
                    end(fail)
                    return
                self.counts["wrong_accepted"] += 1
                end(lambda: ok(False))
                return
            seconds = sim.now - started
            n.latency = seconds if not n.latency else 0.8 * n.latency + 0.2 * seconds
            end(lambda: ok(True))

        deadline = sim.at(p.request_deadline, lambda: st["over"] or timeout())
        sim.at(half, arrive)

        def cancel() -> None:
            cut()
            st["over"] = True
            release()
            deadline.cancel()
        return cancel

    def _mark_down(self, n: Node, s: Node) -> None:
        f = n.down_count.get(s.i, 0)
        n.down_count[s.i] = f + 1
        n.avoid[s.i] = self.sim.now + min(60.0, self.p.down_backoff * 2 ** min(f, 16))

    def fail(self, s: Node) -> None:
        s.failed = True
        for fn in s.cleanups:
            fn()
        s.cleanups.clear()

    # -- containers and the prefetch ------------------------------------------------------

    def start_container(self, n: Node) -> None:
        p = self.p
        todo = [k for k, pc in enumerate(self.pieces) if pc.start]
        left = [len(todo)]

        def next_read() -> None:
            if todo:
                self.get(n, todo.pop(0), True, one_done)

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                self._cpu(n, p.start_cpu, lambda: self._ready(n))
            else:
                next_read()
        for _ in range(min(p.start_concurrency, len(todo))):
            next_read()

    def _ready(self, n: Node) -> None:
        if n.failed:
            return
        n.ready.append(self.sim.now)
        if self.p.fill and len(n.ready) == 1:
            self.prefetch(n)

    def prefetch(self, n: Node) -> None:
        todo = list(range(len(self.pieces)))
        left = [len(todo)]

        def next_one() -> None:
            if todo:
                self.get(n, todo.pop(0), False, one_done)

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                n.filled = self.sim.now
            else:
                next_one()
        for _ in range(self.p.fill_concurrency):
            next_one()

    def _cpu(self, n: Node, seconds: float, then: Callable[[], Any]) -> None:
        if seconds:
            self.sim.net.start(seconds, n.cpu, max_rate=1.0, done=then)
        else:
            then()

    def run(self) -> dict[str, Any]:
        p = self.p
        each, extra = divmod(p.containers, p.nodes)
        per_node = [each + (i < extra) for i in range(p.nodes)]
        for n, count in zip(self.nodes, per_node, strict=True):
            def launch(n: Node = n, count: int = count) -> None:
                for _ in range(count):
                    self.start_container(n)
            self._cpu(n, p.mount_cpu, launch)
        victim = None
        if p.fail_at is not None and p.peers:
            owned = [0] * p.nodes
            for pc in self.pieces:
                owned[pc.order[0]] += pc.start
            victim = self.nodes[max(range(p.nodes), key=lambda i: (owned[i], -i))]
            self.sim.at(p.fail_at, lambda: self.fail(victim))  # type: ignore[arg-type]
        self.sim.run()
        return summarize(self, per_node, victim)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(cl: Cluster, per_node: list[int], victim: Node | None) -> dict[str, Any]:
    p = cl.p
    live = [n for n in cl.nodes if not n.failed]
    ready = [t for n in live for t in n.ready]
    filled = [n.filled for n in live if n.filled is not None]
    expected = sum(c for n, c in zip(cl.nodes, per_node, strict=True) if not n.failed)
    copy = p.image_bytes if p.fill else p.start_bytes
    wrong_ready = sum(1 for n in live if n.ready and not all(n.cached.get(k, True) for k, pc in
                                                           enumerate(cl.pieces) if pc.start))
    return {
        "containers_ready": len(ready), "containers_expected": expected,
        "all_ready": len(ready) == expected and (not p.fill or len(filled) == len(live)),
        "ready_cdf": [pct(ready, q) for q in range(0, 101, 2)] if ready else [],
        "ready_p50_s": pct(ready, 50), "ready_p99_s": pct(ready, 99),
        "ready_max_s": max(ready, default=math.nan),
        "fill_p50_s": pct(filled, 50), "fill_p99_s": pct(filled, 99),
        "fill_max_s": max(filled, default=math.nan),
        "origin_bytes": cl.counts["origin_bytes"], "origin_copies": cl.counts["origin_bytes"] / copy,
        "nodes_ready_with_wrong_bytes": wrong_ready,
        "failed_node": victim.i if victim else None,
        "events": cl.sim.events,
        **{k: v for k, v in cl.counts.items() if k != "origin_bytes"},
    }


def simulate(p: Params) -> dict[str, Any]:
    """Run the model once; its results (see ``summarize``)."""
    gc.disable()  # millions of short-lived closures: the cycle collector would take half the time
    try:
        return Cluster(p).run()
    finally:
        gc.enable()


if __name__ == "__main__":
    from bench.cluster_report import main
    sys.exit(main())
