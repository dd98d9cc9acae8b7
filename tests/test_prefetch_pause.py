"""The prefetch on a full cache disk: it pauses, checking for room once per retry period
and fetching nothing, and goes on once there is room. The retry period is given to the
prefetcher (a hundredth of a second here), and the periods are counted by the checks for
room they make, not slept through: tests/test_cache_disk.py runs the same on a real
mount with a disk that fills up."""

from __future__ import annotations

import trio

from blockindex.oci import Layout
from blockindex.reader import IndexReader
from cache.images import ImageStore
from cache.store import ChunkStore
from fetcher.chunks import ChunkFetcher, FetchConfig
from lazyfs.prefetch import Prefetcher
from testkit.waiting import wait_until

from .cachekit import make_image, manifest_of
from .fakes import ScriptedSource

HANG = 30  # seconds: only catches a hang


class FullDisk(ChunkStore):
    """A store whose disk is full until ``room`` is set; counts the checks for room."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.room = False
        self.room_checks = 0
        self.full_since = 1.0

    def has_room(self, nbytes: int) -> bool:
        self.room_checks += 1
        return self.room


def test_a_prefetch_on_a_full_disk_waits_for_room_without_fetching(tmp_path):
    root = tmp_path / "images"
    make_image(root, "img", {"a": 300_000, "b": 150_000}, seed=5)
    manifest_digest, _, manifest = manifest_of(root, "img")
    layout = Layout(root / "img")
    index_digest = manifest["layers"][0]["digest"]
    images = ImageStore(tmp_path / "cache")
    index_path = images.save_index(index_digest, layout.read_blob(index_digest))
    reader = IndexReader(index_path)
    try:
        chunks = list(reader.all_chunks())
    finally:
        reader.close()
    source = ScriptedSource({c.blob.digest: layout.read_blob(c.blob.digest) for c in chunks})
    store = FullDisk(tmp_path / "cache")
    done = trio.Event()

    async def main() -> None:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                fetcher = ChunkFetcher(nursery, source, store, FetchConfig())
                prefetcher = Prefetcher(index_path, store, images, manifest_digest, fetcher, retry_delay=0.01)

                async def prefetch() -> None:
                    await prefetcher.run()
                    done.set()

                nursery.start_soon(prefetch)
                # through twenty retry periods and more (the workers check together)
                await trio.to_thread.run_sync(wait_until, lambda: store.room_checks > 80, HANG,
                                              "checks for room")
                assert prefetcher.progress.state == "paused-cache-full"
                assert source.requests == []
                store.room = True
                await done.wait()
                nursery.cancel_scope.cancel()
        assert prefetcher.progress.cached_chunks == prefetcher.progress.total_chunks == len(chunks)
        assert source.requests

    trio.run(main)
    assert all(store.contains(c.digest) for c in chunks)
