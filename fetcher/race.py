"""Attempts in order, each started when those before have failed or are slow.

    race(attempts, d)           run the first attempt; start the next one when every
                                attempt started so far has failed, or (a hedge) when the
                                last one started has not answered within ``d`` seconds;
                                the first success wins and the others are cancelled
    race(attempts, d, pulses=)  the same, but an attempt that beats its ``Pulse`` (a
                                peer's batch, at each frame) is waited for while the
                                beats come less than ``d`` apart: slow but alive

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


class Pulse:
    """When an attempt was last heard from, on trio's clock: an attempt whose answer comes
    in parts beats its pulse at each part, and is alive while they come."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = -math.inf
        """When it was last heard from (-inf: never)."""

    def beat(self) -> None:
        self.last = trio.current_time()

    @property
    def heard(self) -> bool:
        """Whether it was ever heard from."""
        return self.last > -math.inf


async def race(attempts: Sequence[Callable[[], Awaitable[T]]], delay: float, *,
               take_hedge: Callable[[bool], bool] | None = None,
               last_by: float = math.inf,
               pulses: Sequence[Pulse | None] = ()) -> RaceResult[T]:
    """Run ``attempts[0]``; start the next attempt when every attempt started so far has
    failed (a ``FetchError``), or when the last one started has been silent for ``delay``
    seconds and ``take_hedge(stalled)`` grants a hedge (it may count it against a budget;
    a refused hedge waits for failures only, and every attempt has a deadline of its own).
    Silent means no answer within ``delay`` of its start or, for an attempt with a pulse
    (``pulses[i]``), of its last beat; ``stalled`` says it had been heard from before it
    fell silent (it stopped, rather than not started yet).
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

        async def silent(i: int, give_up_at: float) -> Pulse | None:
            """Wait until attempts ``0..i`` have failed, ``give_up_at``, or attempt ``i``
            has been silent for ``delay``; its pulse, if it has one."""
            pulse = pulses[i] if i < len(pulses) else None
            heard = trio.current_time()
            while True:
                with trio.move_on_at(min(give_up_at, heard + delay)):
                    await all_failed(i + 1)
                    return pulse
                if pulse is None or pulse.last <= heard or trio.current_time() >= give_up_at:
                    return pulse
                heard = pulse.last  # it beat meanwhile: alive, wait from its last beat

        async def drive() -> None:
            give_up_at = began + last_by
            for i in range(last):
                nursery.start_soon(run, i)
                pulse = await silent(i, give_up_at)
                if len(errors) <= i and trio.current_time() < give_up_at:
                    if take_hedge is None or take_hedge(pulse is not None and pulse.heard):
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
