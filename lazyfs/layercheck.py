"""A mounted side index checked against the image's own layers: trust stated, not assumed.

    verifier = LayerVerifier(opened, client, store, images, timeout=30.0, strict=False)
    await verifier.run()       # the fill's first step; True once every layer is verified
    await verifier.admit()     # before a read serves bytes; IntegrityError once it failed
    verifier.status()          # what ``lazyfs status`` shows

A side index is attached by anyone who can push to the repository and is not covered by
the image digest; only the manifest's layer digests are. The fill (``prefetch.py``) starts
here: each layer the index reads from is streamed whole, in one GET, in order, and
``blockindex.layercheck`` hashes it and inflates it from its start, checking every chunk
the index places in it against its digest; the chunks it cuts go into the node cache, so
the check replaces the per-span fetches of the fill rather than adding a pass. The index
must also list only the manifest's layers, by digest and size.

A side index that does not match is refused for good: logged once, recorded for the node
(``ImageStore.record_layer_check``, so that later mounts of the image pass it over), shown
by ``lazyfs status``, and every further read of the image is EIO, its chunks in memory or
in the node cache too (they are cached by digest, and a lying index's digests name bytes
it chose). A layer that cannot be read, or is not the manifest's (the source's fault, not
the index's), is tried again after ``retry_delay``. With ``strict`` (``--verify-layers``),
no read serves a byte before every layer is verified: a read waits for the check, at most
as long as the check may take (each layer ``blob_seconds`` of its size), then fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import trio

from blockindex.errors import ImageError, LayerMismatchError
from blockindex.format import Blob, Chunk
from blockindex.layercheck import LayerCheck
from blockindex.reader import IndexReader
from cache.errors import CacheError
from cache.images import ImageStore
from cache.store import ChunkStore
from fetcher.blobroute import blob_seconds
from fetcher.bodies import whole_body
from fetcher.errors import DeadlineError, FetchError, IntegrityError, ServerError
from fetcher.gate import DemandGate
from fetcher.mirrors import MirroredClient
from fetcher.registry import RegistryClient

from .opening import OpenedImage

log = logging.getLogger(__name__)

PIECE = 1 << 20
"""Bytes of a layer handed to a worker thread at once (hashing, inflating, cutting)."""


class LayerVerifier:
    """The layer check of one mounted side index, and what reads may do meanwhile."""

    def __init__(self, opened: OpenedImage, client: RegistryClient | MirroredClient, store: ChunkStore,
                 images: ImageStore, *, timeout: float, strict: bool = False,
                 gate: DemandGate | None = None, on_cached: Callable[[Chunk], object] | None = None,
                 retry_delay: float = 5.0) -> None:
        assert opened.layers is not None  # an ordinary image, read by its side index
        self._opened = opened
        self._layers = dict(opened.layers)
        self._origin = client.origin if isinstance(client, MirroredClient) else client
        self._store = store
        self._images = images
        self._timeout = timeout
        self.strict = strict
        self._gate = gate
        self.on_cached = on_cached
        """Told of each chunk the check cached (the prefetch's progress)."""
        self._retry_delay = retry_delay
        self.wait = sum(blob_seconds(size, timeout) for size in self._layers.values())
        """Seconds a strict read waits for the check at most."""
        self.state = "unchecked"  # unchecked, checking, retrying, verified, failed
        self.problem: str | None = None
        self.to_check = 0
        self.checked = 0
        self.recorded = False
        """The verdict is this node's, from an earlier mount."""
        self._done = trio.Event()
        self._running: trio.Event | None = None
        verdict = images.layer_check(opened.manifest_digest, opened.index_digest)
        if verdict is not None:
            self.recorded = True
            self._settle(None if verdict == "verified" else verdict.removeprefix("failed: "))

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    async def run(self) -> bool:
        """Check every layer the index reads (unless this node did before); True if they
        match. Network failures are retried; a run already under way is waited for."""
        if self._done.is_set():
            return self.verified
        if self._running is not None:
            await self._running.wait()
            return self.verified
        self._running = trio.Event()
        try:
            return await self._run()
        finally:
            self._running.set()
            self._running = None

    async def _run(self) -> bool:
        try:
            todo = await trio.to_thread.run_sync(self._plan)
        except LayerMismatchError as exc:
            self._fail(str(exc))
            return False
        self.to_check = len(todo)
        self.state = "checking"
        while todo:
            blob, chunks = todo[0]
            try:
                await self._check(blob, chunks)
            except LayerMismatchError as exc:
                self._fail(str(exc))
                return False
            except (FetchError, ImageError) as exc:
                self.state = "retrying"
                log.warning("layer check: %s; trying again in %gs", exc, self._retry_delay)
                await trio.sleep(self._retry_delay)
                self.state = "checking"
                continue
            todo.pop(0)
            self.checked += 1
        self._settle(None)
        return True

    def _plan(self) -> list[tuple[Blob, list[Chunk]]]:
        """The layers to read, each with the chunks the index places in it (in a thread:
        every chunk row). LayerMismatchError if it lists a blob the manifest does not."""
        index = IndexReader(self._opened.index_path)
        try:
            for blob in index.blobs():
                if self._layers.get(blob.digest) != blob.size:
                    raise LayerMismatchError(f"it lists blob {blob.digest} ({blob.size} bytes), "
                                             "which is not a layer of the image")
            by_blob: dict[int, tuple[Blob, list[Chunk]]] = {}
            for c in index.all_chunks():
                by_blob.setdefault(c.blob.id, (c.blob, []))[1].append(c)
            return [by_blob[b.id] for b in index.blobs() if b.id in by_blob]
        finally:
            index.close()

    async def _check(self, blob: Blob, chunks: list[Chunk]) -> None:
        """One layer, streamed whole (bounded by its size, every wait by a deadline)."""
        what = f"layer {blob.digest}"

        async def consume(response: httpx.Response) -> None:  # each try starts over
            if response.status_code != 200:
                raise ServerError(f"{what}: status {response.status_code}")
            check = LayerCheck(blob.digest, blob.size, chunks)
            pieces: list[bytes] = []
            held = 0
            async for piece in whole_body(response, blob.size, what, exact=True):
                pieces.append(piece)
                held += len(piece)
                if held >= PIECE:
                    await self._feed(check, b"".join(pieces))
                    pieces, held = [], 0
            await self._feed(check, b"".join(pieces))
            await trio.to_thread.run_sync(check.finish)

        seconds = blob_seconds(blob.size, self._timeout)
        try:
            with trio.fail_after(seconds):
                await self._origin.request("GET", f"/blobs/{blob.digest}", consume,
                                           headers={"Accept-Encoding": "identity"},
                                           not_found=f"the registry has no {what}")
        except trio.TooSlowError:
            raise DeadlineError(f"{what} ({blob.size} bytes) was not read within {seconds:.0f} s") from None

    async def _feed(self, check: LayerCheck, data: bytes) -> None:
        if self._gate is not None:
            await self._gate.wait_idle()  # reads first: the check is background work
        kept = await trio.to_thread.run_sync(self._keep, check, data)
        if self.on_cached is not None:
            for c in kept:
                self.on_cached(c)

    def _keep(self, check: LayerCheck, data: bytes) -> list[Chunk]:
        """Feed ``data`` to the check (in a worker thread); cache the chunks it completed."""
        kept = []
        for c, plain in check.feed(data):
            if self._store.contains(c.digest, c.size) or self._store.put(c.digest, plain):
                kept.append(c)
        return kept

    def _fail(self, problem: str) -> None:
        self._settle(problem)
        log.error("%s: every read of this image through it is refused (EIO) from now on", self.problem)
        self._record(problem)

    def _settle(self, problem: str | None) -> None:
        if problem is None:
            self.state = "verified"
            if not self.recorded:
                log.info("side index %s verified: it matches the %d layers of the image",
                         self._opened.index_digest, self.checked)
                self._record(None)
        else:
            self.state = "failed"
            self.problem = (f"side index {self._opened.index_digest} does not match the image's "
                            f"layers: {problem}")
        self._done.set()

    def _record(self, problem: str | None) -> None:
        try:
            self._images.record_layer_check(self._opened.manifest_digest, self._opened.index_digest, problem)
        except CacheError as exc:  # a full disk: the next mount checks again
            log.warning("%s", exc)

    async def admit(self) -> None:
        """Before a read serves bytes: IntegrityError once the index failed its check; in
        ``strict`` mode, wait for the check (at most ``wait`` seconds) first."""
        if self.state == "failed":
            raise self._refused()
        if not self.strict or self.verified:
            return
        with trio.move_on_after(self.wait):
            await self._done.wait()
        if self.state == "failed":
            raise self._refused()
        if not self.verified:
            raise DeadlineError(f"the image's layers were not verified within {self.wait:.0f} s "
                                "(--verify-layers serves nothing before)")

    def _refused(self) -> IntegrityError:
        """Short: every refused read logs it (the reason was logged once, and is in status)."""
        return IntegrityError(f"side index {self._opened.index_digest} failed its layer check "
                              "(lazyfs status says why): reads through it are refused")

    def status(self) -> dict[str, object]:
        return {"state": self.state, "problem": self.problem, "strict": self.strict,
                "checked_layers": self.checked, "layers_to_check": self.to_check,
                "recorded": self.recorded}
