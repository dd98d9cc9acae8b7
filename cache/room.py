"""Waiting for room on the cache disk, so that background work pauses instead of spinning.

When the cache disk is full, a prefetch that went on would fetch chunks only to drop them,
and fetch them again on its next pass: network load for nothing. It waits here instead,
checking free space with one ``statvfs`` every ``poll`` seconds, and goes on as soon as
there is room for a batch (space freed by hand, by ``lazyfs cache prune``, by eviction).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .store import ChunkStore


async def wait_for_room(store: ChunkStore, nbytes: int, *, poll: float = 5.0,
                        on_pause: Callable[[bool], object] | None = None) -> None:
    """Return at once unless the store is full; else once ``nbytes`` fit (with a margin).
    ``on_pause(True)`` is called when the wait starts, ``on_pause(False)`` when it ends."""
    if not store.full:
        return
    if await trio.to_thread.run_sync(store.has_room, nbytes):
        return
    if on_pause is not None:
        on_pause(True)
    try:
        while True:  # polling: free space has no event to wait on
            await trio.sleep(poll)
            if not store.full or await trio.to_thread.run_sync(store.has_room, nbytes):
                break
    finally:
        if on_pause is not None:
            on_pause(False)
