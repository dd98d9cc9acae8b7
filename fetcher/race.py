"""Attempts in order, each started when those before have failed or are slow.

    race(attempts, d)           run the first attempt; start the next one when every
                                attempt started so far has failed, or (a hedge) when the
                                last one started has not answered within ``d`` seconds;
                                the first success wins and the others are cancelled

A chunk's attempts are its owners among the peers, then the origin (see ``peers.py``); an
image's trace is asked of a few peers the same way (``lazyfs.learned``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from .errors import FetchError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RaceResult(Generic[T]):
    value: T
    winner: int
    """Index of the attempt that answered."""
    hedged: bool
    """Whether that attempt was started by a hedge (its predecessor was slow, not failed)."""


async def race(attempts: Sequence[Callable[[], Awaitable[T]]], delay: float, *,
               take_hedge: Callable[[], bool] | None = None,
               last_by: float = math.inf) -> RaceResult[T]:
    """Run ``attempts[0]``; start the next attempt when every attempt started so far has
    failed (a ``FetchError``), or when the last one started has not answered within
    ``delay`` seconds and ``take_hedge()`` grants a hedge (it counts it against a budget;
    a refused hedge waits for failures only, and every attempt has a deadline of its own).
    The last attempt (the origin: the one that must work) is started ``last_by`` seconds
    after the first at the latest, whatever the budget says, so that slow peers never
    make a read miss a deadline the origin alone would have met.

    The first success wins and the others are cancelled. If all fail, the last attempt's
    error is raised."""
    if not attempts:
        raise ValueError("race needs at least one attempt")
    results: list[RaceResult[T]] = []
    errors: dict[int, FetchError] = {}
    hedged: set[int] = set()
    changed = [trio.Event()]
    last = len(attempts) - 1
    began = trio.current_time()

    async with trio.open_nursery() as nursery:

        async def run(i: int) -> None:
            try:
                value = await attempts[i]()
            except FetchError as exc:
                errors[i] = exc
                changed[0].set()
                changed[0] = trio.Event()
                return
            results.append(RaceResult(value, i, i in hedged))
            nursery.cancel_scope.cancel()

        async def all_failed(n: int) -> None:
            while len(errors) < n:
                await changed[0].wait()

        async def drive() -> None:
            give_up_at = began + last_by
            for i in range(last):
                nursery.start_soon(run, i)
                with trio.move_on_at(min(give_up_at, trio.current_time() + delay)):
                    await all_failed(i + 1)
                if len(errors) <= i and trio.current_time() < give_up_at:
                    if take_hedge is None or take_hedge():
                        hedged.add(i + 1)
                    else:  # no budget: the next attempt waits for these to fail
                        with trio.move_on_at(give_up_at):
                            await all_failed(i + 1)
                if trio.current_time() >= give_up_at:
                    if len(errors) <= i:
                        hedged.add(last)
                    break  # straight to the last attempt
            nursery.start_soon(run, last)

        nursery.start_soon(drive)
    if results:
        return results[0]
    raise errors[last]
