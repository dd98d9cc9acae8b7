"""An image's index through the peers, as a chunk goes: its owner, the next owner, then
the origin.

    source = await fetch_blob(tier, digest, size, path, origin, wait=30.0)

The owner of a blob among the peers is the rendezvous owner of its digest
(``PeerSet.owners``): every node asks the same peer, which fetches the blob from the origin
once for all of them (``lazyfs.peerblobs``); when it is down, the next owner does. A node
that owns the blob itself asks the next one cache-only (``PeerSet.runner_up``: it has the
blob, or is fetching it for the nodes that found the owner not up yet, and then answers
when it has it), then the origin (``origin(path)``).

The attempts come one after the other, never at once: the origin is asked only when every
peer before it has failed or run past its deadline (an index may be hundreds of MiB; a
hedge would be a second copy at the origin). Each attempt has the deadline an origin fetch
has: ``wait`` (the mount's timeout) plus the time the blob takes at ``INDEX_MIN_RATE`` (an
owner may fetch it from the origin before it answers). A peer's blob is streamed to disk,
never more than its declared size, and kept only once it matches its digest: a peer that
lies is marked bad and the next source is asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from .errors import AuthError, DeadlineError, FetchError, IntegrityError, UnreachableError
from .peers import PeerIsSelf, PeerTier

log = logging.getLogger(__name__)

MAX_INDEX_SIZE = 1 << 30
"""The largest index a mount fetches, or a peer fetches for another."""
INDEX_MIN_RATE = 256 << 10
"""Bytes a second below which fetching an index counts as stalled (2 Mbit/s)."""


def blob_seconds(size: int, timeout: float) -> float:
    """Seconds one source may take to deliver a ``size``-byte blob."""
    return timeout + size / INDEX_MIN_RATE


async def fetch_blob(tier: PeerTier | None, digest: str, size: int, path: Path,
                     origin: Callable[[Path], Awaitable[object]], *, wait: float) -> str:
    """Write blob ``digest`` (``size`` bytes, sha256) to ``path``, from its owners among
    the peers, else from ``origin``; the source it came from (a peer's URL or ``origin``).
    Raises the origin's ``FetchError`` (``DeadlineError`` past its deadline) if all fail."""
    seconds = blob_seconds(size, wait)
    if tier is not None:
        peers = tier.peers
        key = bytes.fromhex(digest.partition(":")[2])
        # never this node's own `lazyfs peer`: the node's processes share one fetch already
        # (``cache.onefetch``), and it would wait for the very fetch that asks it
        asks = [(p, False) for p in peers.owners(key, peers.config.owners_asked) if not peers.is_self(p)]
        if not asks and (runner_up := peers.runner_up(key)) is not None:
            asks = [(runner_up, True)]
        for peer, cache_only in asks:
            started = time.monotonic()
            deadline = trio.current_time() + seconds
            try:
                with trio.move_on_at(deadline) as scope:
                    await tier.client.download_blob(peer, digest, size, path,
                                                    None if cache_only else tier.repository,
                                                    deadline=deadline)
                if scope.cancelled_caught:
                    raise DeadlineError(f"peer {peer} did not send blob {digest} within {seconds:.0f} s")
            except IntegrityError as exc:
                peers.mark_bad(peer, f"blob {digest}", exc)
                continue
            except (UnreachableError, AuthError) as exc:
                peers.mark_down(peer, exc)
                continue
            except PeerIsSelf:
                peers.mark_self(peer)
                continue
            except FetchError as exc:  # busy, or it could not get it: the next one
                log.log(logging.DEBUG if cache_only else logging.INFO, "blob %s from peer %s: %s",
                        digest, peer, exc)
                continue
            peers.mark_sent(peer, size)
            log.info("blob %s (%d bytes) from peer %s in %.2f s", digest, size, peer,
                     time.monotonic() - started)
            return peer
    try:
        with trio.fail_after(seconds):
            await origin(path)
    except trio.TooSlowError:
        raise DeadlineError(f"blob {digest} ({size} bytes) did not arrive within {seconds:.0f} s") from None
    return "origin"
