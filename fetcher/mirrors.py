"""Blob mirrors in front of a registry: blob reads go to each mirror in turn, then to the
registry; manifests always come from the registry (tags move; mirrors may be stale).

    MirroredClient(origin, [mirror, ...])   reads like a RegistryClient

A mirror is any server with the registry's blob paths (``/v2/REPO/blobs/DIGEST``): an
nginx or Squid cache in front of the registry, a pull-through registry. Any failure of a
mirror (unreachable, 404, bad answer; wrong bytes, which the reader reports with ``blame``)
falls through to the next source; a
mirror that fails is skipped for ``PENALTY`` seconds so a dead mirror costs one timeout,
not one per read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import FetchError
from .registry import Manifest, RegistryClient

log = logging.getLogger(__name__)

T = TypeVar("T")
PENALTY = 30.0
SERVED_KEPT = 1024
"""Ranges a mirror answered whose sender is remembered, for ``blame`` (oldest dropped)."""


class MirroredClient:
    def __init__(self, origin: RegistryClient, mirrors: list[RegistryClient]) -> None:
        self.origin = origin
        self.ref = origin.ref
        self.mirrors = mirrors
        self._benched: dict[int, float] = {}
        self._served: dict[tuple[str, int, int], int] = {}  # range -> the mirror that sent it

    async def get_manifest(self, reference: str | None = None) -> Manifest:
        return await self.origin.get_manifest(reference)

    async def read_blob(self, digest: str, *, max_size: int = 1 << 30) -> bytes:
        return await self._first(lambda c: c.read_blob(digest, max_size=max_size), f"blob {digest}")

    async def download_blob(self, digest: str, path: str, *, max_size: int = 1 << 40,
                            size: int | None = None) -> int:
        return await self._first(lambda c: c.download_blob(digest, path, max_size=max_size, size=size),
                                 f"blob {digest}")

    async def read_range(self, digest: str, offset: int, length: int) -> bytes | bytearray:
        return await self._first(lambda c: c.read_range(digest, offset, length),
                                 f"blob {digest} bytes {offset}+{length}", (digest, offset, length))

    def blame(self, digest: str, offset: int, length: int) -> bool:
        """A range read lately held bytes that failed verification: if a mirror sent it,
        skip that mirror for ``PENALTY`` seconds and return True (reading the range again
        reaches the next source); False if the registry itself sent it."""
        i = self._served.pop((digest, offset, length), None)
        if i is None:
            return False
        self._benched[i] = time.monotonic() + PENALTY
        log.warning("mirror %s sent wrong bytes for blob %s bytes %d+%d; trying the next source",
                    self.mirrors[i].origin, digest, offset, length)
        return True

    async def _first(self, call: Callable[[RegistryClient], Awaitable[T]], what: str,
                     key: tuple[str, int, int] | None = None) -> T:
        now = time.monotonic()
        for i, mirror in enumerate(self.mirrors):
            if self._benched.get(i, 0.0) > now:
                continue
            try:
                got = await call(mirror)
            except FetchError as exc:
                self._benched[i] = time.monotonic() + PENALTY
                log.warning("mirror %s failed for %s (%s); trying the next source",
                            mirror.origin, what, exc)
                continue
            if key is not None:  # remembered until the reader has checked the bytes
                self._served[key] = i
                while len(self._served) > SERVED_KEPT:
                    del self._served[next(iter(self._served))]
            return got
        return await call(self.origin)

    async def aclose(self) -> None:
        for mirror in self.mirrors:
            await mirror.aclose()
        await self.origin.aclose()
