"""The chunk server's whole blobs: an image's index, for the peers that ask its owner.

    GET /v1/blobs/sha256:<hex>?size=N&repo=REGISTRY/REPO     (the cluster token, as chunks)
        200  the index this node's cache keeps (``cache.images``), streamed from its file
        400  a malformed digest, size or repository
        404  not kept here (nor being fetched from the origin: a cache-only request
             waits for that), and the request does not say where it comes from
        502  the owner could not get it from the origin in time (the asker goes on to the
             next owner or the origin)

An index this node lacks is fetched from the origin with the node's own credentials, once
for the node (``cache.onefetch``: the askers, this node's mounts and its ``lazyfs peer``
all wait for the one fetch), checked against its digest, kept, and sent. The server never
asks another peer. A kept file is checked against its digest before it is first sent by
this process (and again when it changes), so that a rotten file is never sent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import trio

from cache.images import ImageStore
from cache.onefetch import from_origin, index_once, wait_for_origin
from fetcher.blobroute import MAX_INDEX_SIZE, blob_seconds
from fetcher.errors import FetchError
from fetcher.peerwire import parse_blob_target

from .peerhttp import Answer

log = logging.getLogger(__name__)


class BlobServer:
    """Answers ``/v1/blobs/`` requests from ``images``; ``origins(repo)`` gives the client
    that fetches a missing one (None: from the cache alone)."""

    def __init__(self, images: ImageStore, origins: OriginClients | None, *, fetch_timeout: float,
                 io: trio.CapacityLimiter) -> None:
        self._images = images
        self._origins = origins
        self._timeout = fetch_timeout
        self._io = io
        self._checked: dict[str, tuple[int, int, int]] = {}
        """Digest -> (inode, mtime, size) of the file that passed its check."""
        self.fetched = 0
        """Blobs fetched from the origin for peers."""
        self.served = 0

    async def answer(self, path: str, query: str) -> Answer:
        try:
            digest, size, repo = parse_blob_target(path, query, MAX_INDEX_SIZE)
        except ValueError as exc:
            return Answer(400, f"{exc}\n".encode())
        kept = await self._kept(digest)
        if kept is None and size is not None and repo is not None and self._origins is not None:
            try:
                client = self._origins.client(repo)
            except ValueError as exc:
                return Answer(400, f"bad repository: {exc}\n".encode())
            seconds = blob_seconds(size, self._timeout)

            async def fetch(target: Path) -> None:
                async with from_origin(self._images, digest, deadline=trio.current_time() + seconds):
                    await client.download_blob(digest, str(target), size=size)

            try:
                with trio.fail_after(seconds):
                    _, fetched = await index_once(self._images, digest, fetch,
                                                  deadline=trio.current_time() + seconds)
            except FetchError as exc:
                return Answer(502, f"cannot fetch {digest}: {exc}\n".encode())
            except trio.TooSlowError:
                return Answer(502, f"{digest} not fetched in {seconds:.0f} s\n".encode())
            self.fetched += fetched
            kept = await self._kept(digest)
        if kept is None and size is not None and repo is None:
            try:  # cache-only: a fetch under way on this node is as good as kept
                deadline = trio.current_time() + blob_seconds(size, self._timeout)
                if await wait_for_origin(self._images, digest, deadline=deadline):
                    kept = await self._kept(digest)
            except trio.TooSlowError:
                pass
        if kept is None:
            return Answer(404, f"no blob {digest} here\n".encode())
        if size is not None and kept[1] != size:
            return Answer(404, f"blob {digest} here is not {size} bytes\n".encode())
        self.served += 1
        return Answer(200, b"", file=kept)

    async def _kept(self, digest: str) -> tuple[Path, int] | None:
        """The file and size of the index ``digest`` kept here, checked once per version."""
        path = self._images.index_path(digest)
        try:
            st = os.stat(path)  # noqa: ASYNC240 - one stat, like the chunk server's
        except OSError:
            return None
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._checked.get(digest) != version:
            if await trio.to_thread.run_sync(self._images.verified_index, digest, limiter=self._io) is None:
                return None
            self._checked[digest] = version
        return path, st.st_size


class BlobClient(Protocol):
    """The registry client's one call a blob fetch needs (``RegistryClient``, ``MirroredClient``)."""

    async def download_blob(self, digest: str, path: str, *, max_size: int = ...,
                            size: int | None = ...) -> int: ...


class OriginClients(Protocol):
    """What ``BlobServer`` needs of ``lazyfs.peer.OriginPool``: the client of a
    ``registry/repository`` (ValueError for a malformed one)."""

    def client(self, repository: str) -> BlobClient: ...
