"""One table of behaviours, run against every source of blob ranges (``fetcher.source.
BlobSource``), as stargz-snapshotter runs one test table against every cache: each source
reads from ``lazyfs serve`` on loopback through a ``FaultProxy`` that scripts what goes
wrong. Whatever happens, a source answers exactly the bytes asked for or raises a
``FetchError``, within its deadline: never other bytes, never another exception, never a
hang. A source with somewhere else to go (a mirror falls through to the registry) answers
the right bytes every time.

Sources: the registry through the lean HTTP/1.1 client, a blob mirror. Not yet here: a
registry's redirected blob URL kept for later ranges, and a peer (its requests name chunks,
not ranges)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import pytest
import trio

from fetcher.errors import FetchError
from fetcher.imageref import ImageRef
from fetcher.mirrors import MirroredClient
from fetcher.registry import RegistryClient, RetryPolicy
from fetcher.source import BlobSource
from testkit.faultproxy import FaultProxy

from .conftest import Image

TIMEOUT = 2.0  # seconds: each source's own deadline for one request
HANG = 15  # seconds: well past any deadline here (TIMEOUT for each try)
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, max_retry_after=0.05)


@dataclasses.dataclass
class Source:
    make: Callable[[int, int], BlobSource]
    """(server port, fault proxy port) -> a source whose requests go through the proxy."""
    falls_back: bool
    """Whether it has another way to the bytes when its requests fail."""


def _registry(port: int) -> RegistryClient:
    return RegistryClient(ImageRef.parse(f"127.0.0.1:{port}/app:1"), timeout=TIMEOUT, retry=FAST_RETRY)


SOURCES = {
    "registry": Source(lambda server, proxy: _registry(proxy), falls_back=False),
    "mirror": Source(lambda server, proxy: MirroredClient(_registry(server), [_registry(proxy)]),
                     falls_back=True),
}

#: fault scripts: the proxy's outcome for each coming range request (then all pass)
KINDS = ("503", "429", "500", "reset", "short", "content-range", "stall")
ONCE = KINDS
ALWAYS = [k for k in KINDS if k != "429"]


def ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length): the first byte, the last, the whole blob, one in the middle."""
    return [(0, 1), (size - 1, 1), (0, size), (size // 3, size // 2)]


@pytest.fixture
def setup(server, images: dict[str, Image]) -> Iterator[tuple[FaultProxy, str, bytes]]:
    image = images["app"]
    with FaultProxy(server.port, max_stall=HANG) as proxy:
        yield proxy, image.big, image.blobs[image.big]


@contextlib.asynccontextmanager
async def opened(source: BlobSource):
    try:
        yield source
    finally:
        await source.aclose()  # type: ignore[attr-defined]


def read(source: Source, server_port: int, proxy: FaultProxy, digest: str,
         wanted: list[tuple[int, int]]) -> list[bytes | FetchError]:
    """Each range read once, in order, through one source: its bytes or its FetchError."""
    out: list[bytes | FetchError] = []

    async def main() -> None:
        with trio.fail_after(HANG):
            async with opened(source.make(server_port, proxy.port)) as src:
                for offset, length in wanted:
                    try:
                        out.append(bytes(await src.read_range(digest, offset, length)))
                    except FetchError as exc:
                        out.append(exc)

    trio.run(main)
    return out


@pytest.mark.parametrize("name", SOURCES)
def test_every_range_comes_back_exact(name, setup, server):
    proxy, digest, blob = setup
    wanted = ranges(len(blob))
    got = read(SOURCES[name], server.port, proxy, digest, wanted)
    assert got == [blob[o : o + n] for o, n in wanted]
    assert proxy.chunk_requests >= len(wanted)  # through the proxy, so faults reach them


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("fault", ONCE)
def test_a_fault_once_is_got_over(name, fault, setup, server):
    """One bad answer is retried, or asked again another way: the bytes still come (a
    stall once its request's deadline has passed)."""
    proxy, digest, blob = setup
    proxy.script([fault])
    offset, length = len(blob) // 3, len(blob) // 2
    [got] = read(SOURCES[name], server.port, proxy, digest, [(offset, length)])
    assert proxy.injected[fault] == 1
    assert got == blob[offset : offset + length]


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("fault", ALWAYS)
def test_a_fault_that_lasts_is_a_fetch_error_never_wrong_bytes(name, fault, setup, server):
    proxy, digest, blob = setup
    proxy.inject(fault)
    wanted = [(0, len(blob)), (len(blob) // 3, 1000)]
    got = read(SOURCES[name], server.port, proxy, digest, wanted)
    assert proxy.injected[fault] >= 1
    right = [blob[o : o + n] for o, n in wanted]
    if SOURCES[name].falls_back:
        assert got == right
    else:
        assert all(isinstance(g, FetchError) for g in got), got
