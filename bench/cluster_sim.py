"""A small discrete-event simulator with fluid, fairly shared links (for
``bench/cluster_model.py``).

    sim = Sim(resolution=0.001)
    up = sim.net.link(125e6)                      # bytes per second
    sim.at(0.002, lambda: sim.net.start(2 << 20, up, down, done=on_done))
    sim.run()

Events are callbacks on a heap ordered by time (then by the order they were set).
A transfer is a fluid flow over one or two links; each link's capacity is shared
equally by the flows on it, and a flow runs at the smallest of its links' shares
(and at most ``max_rate``: a request using one core of a CPU "link" of several).
That is the bottleneck share, not max-min fairness: capacity a flow cannot use on
one link is not handed to the others there. Rates are recomputed for all flows at
once (numpy) when flows have come or gone, at most once per ``resolution`` seconds
of simulated time; a flow that starts in between gets the share its links give at
once and the others keep theirs until then. ``resolution`` 0 recomputes at every
change, which is exact (the tests check it against the analytic answer).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

Callback = Callable[[], Any]
FlowId = tuple[int, int]
"""(slot, generation): a flow's handle, stale once the flow has ended."""


class Timer:
    """A scheduled callback; ``cancel()`` keeps it from running."""

    __slots__ = ("fn", "cancelled")

    def __init__(self, fn: Callback) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Sim:
    """The event loop: ``at(delay, fn)``, ``run()``; ``now`` is simulated seconds."""

    def __init__(self, resolution: float = 0.0) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.net = Net(self, resolution)
        self.events = 0

    def at(self, delay: float, fn: Callback) -> Timer:
        timer = Timer(fn)
        heapq.heappush(self._heap, (self.now + max(0.0, delay), next(self._seq), timer))
        return timer

    def run(self, until: float = math.inf) -> None:
        """Run events and flows in time order until none is left (or ``until``)."""
        net = self.net
        while True:
            net.maybe_recompute()
            next_event = self._heap[0][0] if self._heap else math.inf
            next_flow = net.next_completion()
            t = min(next_event, next_flow)
            if t == math.inf or t > until:
                return
            self.now = max(self.now, float(t))
            if next_flow <= next_event:
                net.complete_due()
            else:
                _, _, timer = heapq.heappop(self._heap)
                if not timer.cancelled:
                    self.events += 1
                    timer.fn()


class Net:
    """Links and the fluid flows over them (see the module docstring)."""

    def __init__(self, sim: Sim, resolution: float) -> None:
        self._sim = sim
        self.resolution = resolution
        self.caps: list[float] = [math.inf]  # link 0: no limit (a flow's missing second link)
        self.count: list[int] = [0]
        self._size = 0
        self._grow(1024)
        self._dirty = False
        self._last = -math.inf
        self._next = math.inf

    def _grow(self, n: int) -> None:
        old = self._size
        def ext(a: np.ndarray | None, fill: Any, dtype: Any) -> np.ndarray:
            new = np.full(n, fill, dtype=dtype)
            if a is not None:
                new[:old] = a
            return new
        first = old == 0
        self.rem = ext(None if first else self.rem, 0.0, float)
        self.size = ext(None if first else self.size, 0.0, float)
        self.rate = ext(None if first else self.rate, 1.0, float)
        self.t0 = ext(None if first else self.t0, 0.0, float)
        self.finish = ext(None if first else self.finish, math.inf, float)
        self.max_rate = ext(None if first else self.max_rate, math.inf, float)
        self.src = ext(None if first else self.src, 0, np.int64)
        self.dst = ext(None if first else self.dst, 0, np.int64)
        self.gen = ext(None if first else self.gen, 0, np.int64)
        self.done: list[Callable[[], Any] | None] = (
            [None] * n if first else self.done + [None] * (n - old))
        self._free = list(range(n - 1, old - 1, -1)) + ([] if first else self._free)
        self._size = n

    def link(self, capacity: float) -> int:
        """A new link of ``capacity`` units per second (bytes, or CPU seconds); its id."""
        self.caps.append(capacity)
        self.count.append(0)
        return len(self.caps) - 1

    def start(self, amount: float, a: int, b: int = 0, *, max_rate: float = math.inf,
              done: Callable[[], Any]) -> FlowId:
        """Move ``amount`` over links ``a`` and ``b``; ``done()`` when it is through."""
        if not self._free:
            self._grow(self._size * 2)
        i = self._free.pop()
        now = self._sim.now
        self.count[a] += 1
        self.count[b] += 1
        rate = min(self.caps[a] / self.count[a], self.caps[b] / self.count[b], max_rate)
        self.rem[i] = self.size[i] = amount
        self.rate[i], self.t0[i], self.src[i], self.dst[i] = rate, now, a, b
        self.max_rate[i] = max_rate
        self.finish[i] = now + amount / rate
        self.done[i] = done
        self._next = min(self._next, self.finish[i])
        self._dirty = True
        return i, int(self.gen[i])

    def moved(self, flow: FlowId) -> float:
        """How much of a live flow has gone through so far."""
        i, g = flow
        if self.gen[i] != g or self.done[i] is None:
            return 0.0
        return float(self.size[i] - (self.rem[i] - self.rate[i] * (self._sim.now - self.t0[i])))

    def cancel(self, flow: FlowId) -> float:
        """End a flow early (no ``done``); how much of it had gone through."""
        i, g = flow
        if self.gen[i] != g or self.done[i] is None:
            return 0.0
        moved = self.moved(flow)
        self._end(i)
        self._next = float(self.finish.min())
        return moved

    def _end(self, i: int) -> None:
        self.count[int(self.src[i])] -= 1
        self.count[int(self.dst[i])] -= 1
        self.finish[i] = math.inf
        self.done[i] = None
        self.gen[i] += 1
        self._free.append(i)
        self._dirty = True

    def next_completion(self) -> float:
        return self._next

    def complete_due(self) -> None:
        """End every flow due by now and call its ``done``."""
        now = self._sim.now
        due = np.flatnonzero(self.finish <= now + 1e-12)
        callbacks = []
        for i in due[np.argsort(self.finish[due], kind="stable")]:
            callbacks.append(self.done[i])
            self._end(int(i))
        self._next = float(self.finish.min())
        for fn in callbacks:
            assert fn is not None
            fn()

    def maybe_recompute(self) -> None:
        now = self._sim.now
        if not self._dirty or now - self._last < self.resolution:
            return
        self._dirty = False
        self._last = now
        live = self.finish < math.inf
        if not live.any():
            self._next = math.inf
            return
        caps = np.asarray(self.caps)
        count = np.maximum(np.asarray(self.count, dtype=float), 1.0)
        share = caps / count
        idx = np.flatnonzero(live)
        rem = self.rem[idx] - self.rate[idx] * (now - self.t0[idx])
        rate = np.minimum(np.minimum(share[self.src[idx]], share[self.dst[idx]]), self.max_rate[idx])
        self.rem[idx] = np.maximum(rem, 0.0)
        self.rate[idx] = rate
        self.t0[idx] = now
        self.finish[idx] = now + self.rem[idx] / rate
        self._next = float(self.finish[idx].min())
