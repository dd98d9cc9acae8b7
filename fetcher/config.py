"""How a ``ChunkFetcher`` fetches (``FetchConfig``) and what it has done (``FetchStats``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """How chunks are fetched."""

    deadline: float = 30.0
    """Seconds a demand read waits for its chunks before failing (EIO at the mount)."""
    background_deadline: float = 120.0
    """Seconds one background (prefetch) request may take before it is given up and retried."""
    max_request: int = 16 << 20
    """Largest merged range request, in bytes."""
    max_gap: int = 256 << 10
    """Neighbouring chunks of a blob at most this far apart are fetched in one request
    (the gap's bytes are read and discarded: cheaper than another round trip)."""
    owner_max_gap: int = 4 << 10
    """``max_gap`` for the chunks an owner fetches for its peers (``together``). In a cluster
    the chunks in a gap are other owners': the origin sends their bytes twice. Planning
    every chunk each owner holds of the python image of bench/peers_bench.py (1,359
    chunks, 19 KiB on average) at once takes, at 2 / 4 nodes, 675 / 1,025 requests
    without gaps; 480 / 831 at 1.01x the image's bytes with 4 KiB; 226 / 539 at 1.10 /
    1.12x with 16 KiB; 22 / 44 but 1.49 / 2.30x with ``max_gap``. The benchmark itself
    measured 534 / 890 requests and 1.02 / 1.09x one node's need with 4 KiB, 273-294 /
    585-661 and 1.09-1.17x with 16 KiB (1,366 / 1,375 and 1.02-1.09x one chunk at a time).
    The origin serves every node at once: its bytes are what peers save."""
    amplify: int = 1 << 20
    """A demand miss fetches, in the same request, the chunks that follow it in its blob
    (not cached, not being fetched) until the request is this many bytes: the converter
    lays a directory's files side by side, so a cold walk of many small files makes
    about one request per window instead of one per file. The reader waits for its own
    chunks only; the neighbours are checked and cached like any chunk. The first miss in
    a blob gets an eighth of this, doubled for each miss right where the last request
    ended: bench/amplify.py measured 1 MiB at 1.16x the bytes of a cold start without it
    and one request per 711 KiB of image for a cold tar of the tree (1,355 requests
    without it). 0 turns it off. Not in a cluster, where the neighbours are other
    peers' to fetch."""
    background_concurrency: int = 2
    """Background requests in flight at once."""
    background_max_request: int = 4 << 20
    """Largest background range request, in bytes: with ``background_concurrency`` it
    bounds the prefetch's bytes in flight, which a demand read's answer queues behind."""
    background_pause: float = 0.1
    """While a demand fetch is in flight, the background's checking and caching waits up
    to this many seconds before each chunk (then does that one chunk, and asks again).
    Not in a cluster, nor at a low CPU priority: there a node's background ranges hold the
    chunks it owns, which its peers wait for, and a peer that waits too long asks the
    origin a second time."""
    thread_above: int = 128 << 10
    """Chunks larger than this are decoded and hashed in a worker thread, so that the
    trio loop (and every other reader of the mount) is not held up."""
    reread_window: float = 1.0
    """Seconds after a demand wait for a chunk failed during which a new demand wait for
    it continues the failed one's deadline instead of starting its own: the kernel reads
    a page again at once when its readahead failed, and without this one read(2) would
    wait two deadlines. A failure that came quickly leaves the re-read nearly all of it."""
    reread_try: float = 0.5
    """Seconds a re-read gets when the failed wait left it less: one more short try, so
    that a read just after a source came back is not failed for the one before it."""


@dataclasses.dataclass
class FetchStats:
    """Counters of one fetcher, read by ``lazyfs status``."""

    requests: int = 0
    bytes_received: int = 0
    chunks_fetched: int = 0
    integrity_failures: int = 0
    failed_requests: int = 0
    demand_requests: int = 0
    demand_wait_seconds: float = 0.0
    peer_chunks: int = 0
    """Chunks that came from a peer (their bytes are counted per peer in the PeerSet)."""
    peer_failures: int = 0
    peer_integrity_failures: int = 0
    hedged: int = 0
    """Hedges: requests sent to the next owner or the origin because the one before had
    not answered within the hedge delay, nor sent a frame of its batch (failures and
    stalls move on too, but are not counted here)."""
    peer_requests: int = 0
    """Demand chunks asked of a peer first (the hedge budget is a fraction of these)."""
    hedge_wins: int = 0
    """Chunks answered first by a hedged request."""
    stalled: int = 0
    """Chunks sent on to the next source because their peer's batch had begun answering
    and then sent no frame for the hedge delay (not counted in ``hedged`` nor against
    its budget: a stall is taken as a failure, though its answer may still win)."""
    origin_after_peers: int = 0
    """Chunks asked of the origin after their peers failed or were slow."""
    neighbours: int = 0
    """Chunks fetched along with a demand miss (``FetchConfig.amplify``) and found good."""
    timeouts: int = 0
    """Waits that ran past their deadline (a request with no answer, a read given up)."""
    disk_reads: int = 0
    """Reads of the node cache by range that went to a worker thread: their blocks were
    not all in the page cache (or the read was above ``thread_above``), so they waited for
    the disk; the others were served on the event loop."""
