"""One node of the cluster model (``bench/cluster_model.py``): what it holds and knows of
its peers, and its race over a piece's sources (``fetcher.race.race``'s rules)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.cluster_model import Cluster

ORIGIN = -1
"""The source that is not a node: the registry."""


@dataclasses.dataclass
class Piece:
    size: int
    chunks: int
    order: list[int]
    """Nodes in rendezvous order for this piece (owner first)."""
    start: bool


class Node:
    """A node: its links' and CPU's ids in the simulator's ``Net``, its cache and its
    view of the peers (whom it avoids until when, its hedges, their latency)."""

    def __init__(self, i: int, up: int, down: int, cpu: int) -> None:
        self.i = i
        self.up = up
        self.down = down
        self.cpu = cpu
        self.cached: dict[int, bool] = {}
        """Pieces held: True if right, False if wrong bytes got in (only without ``verify``)."""
        self.waiting: dict[int, list[Callable[[], Any]]] = {}
        self.failed = False
        self.liar = False
        self.avoid: dict[int, float] = {}
        self.down_count: dict[int, int] = {}
        self.hedged = 0
        self.peer_requests = 0
        self.latency = 0.0
        self.active = 0
        self.ready: list[float] = []
        self.filled: float | None = None
        self.cleanups: list[Callable[[], Any]] = []
        """What to cut when this node fails: its transfers to others."""


class Race:
    """``fetcher.race.race`` over one node's sources for one piece (see the module docstring)."""

    def __init__(self, cl: Cluster, n: Node, k: int, asks: list[int], demand: bool,
                 done: Callable[[bool], Any]) -> None:
        self.cl, self.n, self.k, self.done = cl, n, k, done
        self.sources = asks + [ORIGIN]
        self.demand = demand
        self.next = 0
        self.failed = 0
        self.over = False
        self.cancels: list[Callable[[], Any]] = []
        self.hedge = None
        p = cl.p
        self.delay = cl.hedge_delay(n, k)
        last_by = min(p.request_deadline, p.deadline / 2) if demand else p.request_deadline
        self.give_up = cl.sim.at(last_by, self._give_up) if len(self.sources) > 1 else None
        self._launch()

    def _launch(self) -> None:
        i = self.next
        self.next += 1
        if self.hedge:
            self.hedge.cancel()
        self.cancels.append(self.cl.attempt(self.n, self.k, self.sources[i],
                                            lambda right: self._ok(right), self._fail))
        if self.demand and self.next < len(self.sources):
            self.hedge = self.cl.sim.at(self.delay, self._hedge)

    def _fail(self) -> None:
        if self.over:
            return
        self.failed += 1
        if self.failed == self.next and self.next < len(self.sources):
            self._launch()

    def _hedge(self) -> None:
        if not self.over and self.next < len(self.sources) and self.cl.may_hedge(self.n):
            self._launch()

    def _give_up(self) -> None:
        if not self.over and self.next < len(self.sources):
            self.next = len(self.sources) - 1
            self._launch()

    def _ok(self, right: bool) -> None:
        if self.over:
            return
        self.over = True
        for c in self.cancels:
            c()
        for t in (self.hedge, self.give_up):
            if t:
                t.cancel()
        self.done(right)


