"""One download of an image's index per node, however many processes want it at once.

    path, fetched = await index_once(images, digest, fetch, deadline=d)
    async with from_origin(images, digest, deadline=d): ...   # around a fetch from the origin
    joined = await wait_for_origin(images, digest, deadline=d)

The index kept in the cache is used when it is there and matches its digest; otherwise
``fetch(path)`` writes it (whole or not at all, checked), under an exclusive ``flock`` on
``indexes/.lock.<hex>`` (released if its holder dies). Whoever waited for the lock looks
again first, so a mount and the node's ``lazyfs peer`` (or two mounts) that want the same
index at once fetch it once: the one fetching from the origin or a peer, the others
finding its file when the lock comes free. ``flock`` conflicts between two opens of the
file, in one process too, so a mount's own server waits for the mount the same way.

A fetch from the origin also holds ``indexes/.origin.<hex>``. A peer asked for an index
it lacks, cache-only, joins such a fetch (``wait_for_origin``) rather than answer 404
while it is under way; it never waits for a fetch from another peer, so that two nodes
asking each other cannot wait on each other.

Locks are taken by polling, so that the wait stays on the trio loop and ends at the
deadline (``trio.TooSlowError``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

from .images import ImageStore

LOCK_POLL = 0.02
"""Seconds between tries of a lock another holds."""


def _lock_path(images: ImageStore, digest: str, kind: str) -> Path:
    path = images.index_path(digest)
    return path.with_name(f".{kind}.{path.name}")


@contextlib.asynccontextmanager
async def node_lock(path: Path, *, deadline: float) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` of ``path`` (created if needed); ``trio.TooSlowError``
    if it is not free by ``deadline`` (trio's clock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if trio.current_time() >= deadline:
                    raise trio.TooSlowError from None
                await trio.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)


def from_origin(images: ImageStore, digest: str, *,
                deadline: float) -> contextlib.AbstractAsyncContextManager[None]:
    """Held around a fetch of index ``digest`` from the origin (within ``index_once``)."""
    return node_lock(_lock_path(images, digest, "origin"), deadline=deadline)


async def wait_for_origin(images: ImageStore, digest: str, *, deadline: float) -> bool:
    """Whether a task or process of this node was fetching index ``digest`` from the
    origin; if so, this returns once it is done (``trio.TooSlowError`` at ``deadline``),
    and the index is there unless that fetch failed."""
    lock = _lock_path(images, digest, "origin")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    async with node_lock(lock, deadline=deadline):
        return True


async def index_once(images: ImageStore, digest: str, fetch: Callable[[Path], Awaitable[object]],
                     *, deadline: float) -> tuple[Path, bool]:
    """The path of the verified index ``digest`` and whether ``fetch`` brought it (False:
    the cache had it, or another process of the node fetched it meanwhile)."""
    found = await trio.to_thread.run_sync(images.verified_index, digest)
    if found is not None:
        return found, False
    path = images.index_path(digest)
    async with node_lock(_lock_path(images, digest, "lock"), deadline=deadline):
        found = await trio.to_thread.run_sync(images.verified_index, digest)
        if found is not None:
            return found, False
        await fetch(path)
    return path, True
