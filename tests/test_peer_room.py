"""An owner with every request slot taken makes the next caller wait for one, first come
first served, up to a bound in time and in number; past it, 503 (the caller moves on)."""

from __future__ import annotations

import trio
import trio.testing

from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher
from fetcher.config import FetchConfig
from fetcher.peerwire import OK
from lazyfs.peer import ChunkServer, OriginPool, PeerServerConfig

from .fakes import ScriptedSource, make_blob
from .test_owner_ranges import PIECES, REPO, TOKEN, _batch, _frames


def _two_batches(tmp_path, config: PeerServerConfig) -> tuple[list[int], list[dict], ChunkServer]:
    """Two batches 0.1 s apart to an owner whose origin takes 0.4 s for the first request:
    the statuses and answers, and the server (its stats)."""
    blob, chunks, raw = make_blob(PIECES)
    origin = ScriptedSource({blob.digest: raw}, script=["slow"])
    statuses: list[int] = [0, 0]
    answers: list[bytes] = [b"", b""]
    servers: list[ChunkServer] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            store = ChunkStore(tmp_path / "owner")
            fetcher = ChunkFetcher(nursery, origin, store, FetchConfig(deadline=10))
            server = ChunkServer(store, TOKEN, OriginPool(nursery, store, fetchers={REPO: fetcher}), config)
            servers.append(server)

            async def ask(i: int, asked) -> None:
                answer = await server._answer(_batch(asked))
                statuses[i] = answer.status
                if answer.stream is not None:
                    async def send(pieces) -> None:
                        answers[i] += b"".join(bytes(p) for p in pieces)

                    await answer.stream(send)

            async with trio.open_nursery() as asking:
                asking.start_soon(ask, 0, chunks[:20])
                await trio.sleep(0.1)
                asking.start_soon(ask, 1, chunks[20:])
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return statuses, [_frames(a) if a else {} for a in answers], servers[0]


def test_a_caller_past_the_slots_waits_for_one_and_is_served(tmp_path):
    statuses, answers, server = _two_batches(tmp_path, PeerServerConfig(max_concurrent=1, max_wait=5))
    assert statuses == [200, 200]
    assert [len(a) for a in answers] == [20, 20]
    assert all(status == OK for a in answers for status, _ in a.values())
    assert (server.stats.waited, server.stats.busy) == (1, 0)


def test_past_its_wait_or_a_full_queue_a_caller_is_told_busy(tmp_path):
    statuses, _, server = _two_batches(tmp_path, PeerServerConfig(max_concurrent=1, max_wait=0.1))
    assert statuses == [200, 503] and (server.stats.waited, server.stats.busy) == (1, 1)
    statuses, _, server = _two_batches(tmp_path / "b", PeerServerConfig(max_concurrent=1, max_waiting=0))
    assert statuses == [200, 503] and (server.stats.waited, server.stats.busy) == (0, 1)


def test_a_server_raises_its_open_file_limit_to_hold_its_connections():
    """Each caller waiting for room holds a connection: the soft limit on open files (1,024
    by default) is raised within the hard one to fit ``max_connections`` and the rest."""
    import resource
    import subprocess
    import sys

    from lazyfs.peer import FDS_BESIDE_CONNECTIONS, PeerServerConfig

    need = PeerServerConfig().max_connections + FDS_BESIDE_CONNECTIONS
    assert need > 1024  # more than a default soft limit
    code = ("import resource; from lazyfs.peer import raise_fd_limit; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, (1024, {need + 1})); "
            f"print(raise_fd_limit({need}), resource.getrlimit(resource.RLIMIT_NOFILE)[0]); "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, (512, 700)); "
            f"print(raise_fd_limit({need}), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > need, "this test needs a hard limit above the need"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(need), str(need), "700", "700"]  # up to the hard limit, no further
