"""Stress (issue 7, scaled down for CI): many readers racing the prefetcher, and a mount
SIGKILLed mid-prefetch again and again on one shared cache.

The image is a rootfs of pseudo-random (incompressible) files, a few tens of MiB, converted
with 64 KiB chunks so that ranges cross many chunk boundaries; the server answers each
request after a small delay so that the prefetch is still running while the test works.
Every byte read is compared with the bytes the rootfs was generated from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockindex.codec import chunk_digest
from blockindex.convert import convert
from blockindex.oci import Layout
from blockindex.reader import IndexReader
from cache.store import ChunkStore
from lazyfs.process import wait_gone
from lazyfs.serve import make_server
from testkit.waiting import wait_until

pytestmark = pytest.mark.mount

CHUNK = 64 << 10
MiB = 1 << 20

#: readers of test 1, and how much each does (whichever bound comes first)
READERS = 32
READS_EACH = 150
READ_SECONDS = 5.0

#: SIGKILL rounds of test 2. The issue asks for 20; 5 keeps CI fast (KILL_ROUNDS=20 for more).
KILL_ROUNDS = int(os.environ.get("KILL_ROUNDS", "5"))

#: files of the rootfs: path -> size. Sizes off chunk boundaries on purpose, and the
#: small cases (empty, one byte, exactly one chunk, one chunk and a byte).
_SIZES = {
    "big/a.bin": 16 * MiB + 4321,
    "big/b.bin": 12 * MiB,
    "big/c.bin": 8 * MiB - 1,
    "mid/d.bin": 3 * MiB + 17,
    "mid/e.bin": 1 * MiB + CHUNK // 2,
    "small/empty": 0,
    "small/one": 1,
    "small/chunk": CHUNK,
    "small/chunk_plus": CHUNK + 1,
    "small/odd": 100_003,
}


@pytest.fixture(scope="module")
def stress_image(tmp_path_factory):
    """(files: path -> bytes, images root) of the generated rootfs, converted once."""
    tmp = tmp_path_factory.mktemp("stress")
    rootfs = tmp / "rootfs"
    rng = random.Random(7)
    files: dict[str, bytes] = {}
    for rel, size in _SIZES.items():
        data = rng.randbytes(size)
        path = rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = data
    convert(f"dir:{rootfs}", f"oci:{tmp / 'images' / 'stress'}:1", chunk_size=CHUNK)
    shutil.rmtree(rootfs)
    return files, tmp / "images"


@pytest.fixture
def slow_server(stress_image, request):
    """The converted image served with a per-response delay (seconds; 0.05 unless the test
    is marked ``@pytest.mark.server_delay(s)``), so that a prefetch takes a while."""
    _files, root = stress_image
    mark = request.node.get_closest_marker("server_delay")
    server = make_server(root, "127.0.0.1", 0, delay=mark.args[0] if mark else 0.05)
    server.start()
    yield server
    server.close()


def _ref(server) -> str:
    return f"127.0.0.1:{server.port}/stress:1"


def _index(root: Path) -> IndexReader:
    layout = Layout(root / "stress")
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    return IndexReader(layout.blob_path(manifest["layers"][0]["digest"]))


def _assert_all_bytes(mnt: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        got = (mnt / rel).read_bytes()
        assert got == data, f"{rel}: {len(got)} bytes read, {len(data)} expected, or bytes differ"


# -- 1. many readers racing the prefetcher and each other ---------------------------------


@pytest.mark.server_delay(0.15)
def test_many_readers_while_prefetching_get_every_byte_right(stress_image, slow_server, mounts):
    """READERS threads read random ranges (across chunk boundaries, past EOF) of random
    files while the prefetch runs: not one byte differs and no read fails."""
    files, _root = stress_image
    mnt, _ = mounts.mount(_ref(slow_server))  # with prefetch
    names = list(files)
    mismatches: list[str] = []
    errors: list[str] = []
    done_reads = [0] * READERS
    start = threading.Barrier(READERS)

    def reader(n: int) -> None:
        rng = random.Random(1000 + n)
        fds = {}
        try:
            start.wait()
            stop = time.monotonic() + READ_SECONDS
            for _ in range(READS_EACH):
                if time.monotonic() > stop:
                    break
                rel = rng.choice(names)
                data = files[rel]
                # offsets anywhere up to a chunk past EOF; lengths from one byte to three chunks
                offset = rng.randrange(0, len(data) + CHUNK)
                if rng.random() < 0.3 and data:  # aim at a chunk boundary
                    offset = max(0, min(len(data), rng.randrange(0, len(data) + 1) // CHUNK * CHUNK
                                        - rng.randrange(0, 64)))
                length = rng.randrange(1, 3 * CHUNK)
                try:
                    fd = fds.get(rel)
                    if fd is None:
                        fd = fds[rel] = os.open(mnt / rel, os.O_RDONLY)
                    got = os.pread(fd, length, offset)
                except OSError as exc:
                    errors.append(f"reader {n}: {rel} [{offset}, +{length}): {exc!r}")
                    continue
                if got != data[offset : offset + length]:
                    mismatches.append(f"reader {n}: {rel} [{offset}, +{length}): {len(got)} bytes")
                done_reads[n] += 1
        except Exception as exc:  # noqa: BLE001 - reported below, never lost in a thread
            errors.append(f"reader {n}: {exc!r}")
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(READERS)]
    for t in threads:
        t.start()
    during = []  # what the prefetch was doing while the readers ran (reported, not asserted)
    while any(t.is_alive() for t in threads) and len(during) < 600:
        p = mounts.status(mnt)["prefetch"]
        during.append((p["state"], p["cached_chunks"], p["total_chunks"]))
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert errors == []
    assert mismatches == []
    assert sum(done_reads) >= READERS  # every reader got through at least some reads
    st = mounts.wait_complete(mnt)
    assert st["prefetch"]["cached_chunks"] == st["prefetch"]["total_chunks"] > 0
    _assert_all_bytes(mnt, files)
    print(f"{sum(done_reads)} reads; prefetch while they ran: {during}")


# -- 2. SIGKILL mid-prefetch never leaves an entry that is served wrong ------------------


def _cached_count(cache: Path) -> int:
    chunks = cache / "chunks"
    return sum(len(os.listdir(d)) for d in chunks.iterdir()) if chunks.exists() else 0


def _check_entries(cache: Path, digests: set[bytes]) -> int:
    """Every entry is whole or is dropped; returns how many whole entries there are."""
    store = ChunkStore(cache)
    whole = 0
    for d in digests:
        entry = store.get(d)
        if entry is None:
            assert not store.path(d).exists(), "a bad entry was reported missing but kept"
            continue
        assert chunk_digest(entry) == d, f"entry {d.hex()} holds the wrong bytes"
        whole += 1
    return whole


def test_sigkill_during_prefetch_never_leaves_a_bad_entry(stress_image, slow_server, mounts, tmp_path):
    """KILL_ROUNDS times (5 in CI; the issue asks 20): mount with prefetch on one shared
    cache, SIGKILL the mount process while entries are being written, lazily unmount.
    (When more than half the image is cached, half of the entries are evicted first, so
    that every round kills a prefetch that still has work to do.)
    Then every entry is whole or dropped, leftovers in tmp/ are harmless, a hand-corrupted
    entry is dropped and fetched again, and a last mount gets every byte right."""
    files, root = stress_image
    cache = tmp_path / "cache"
    index = _index(root)
    digests = {c.digest for c in index.all_chunks()}
    total = len(digests)
    rng = random.Random(11)
    rounds = []  # (entries before, entries at the kill, temp files left, entries dropped): reported

    for n in range(KILL_ROUNDS):
        before = _cached_count(cache)
        if before > total // 2:  # keep the prefetch long enough to be killed mid-way: evict
            for d in rng.sample(sorted(digests), total // 2):
                ChunkStore(cache).remove(d)
            before = _cached_count(cache)
        mnt, _ = mounts.mount(_ref(slow_server), name=f"kill{n}", cache=cache)
        pid = mounts.status(mnt)["pid"]
        # kill as soon as entries are being written
        wait_until(lambda: _cached_count(cache) > before, 30,  # noqa: B023
                   "the prefetch writing", interval=0.002)
        os.kill(pid, 9)
        assert wait_gone(pid, 10), f"mount process {pid} survived SIGKILL"
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=True)
        mounts.points.remove(mnt)
        at_kill = _cached_count(cache)
        assert before < at_kill, "nothing was cached in this round"
        left = len(list(cache.glob("chunks/*/.tmp.*")))
        whole = _check_entries(cache, digests)
        rounds.append((before, at_kill, left, at_kill - whole))

    print(f"{total} chunks; rounds: {rounds}")
    whole = _check_entries(cache, digests)
    assert 0 < whole, "no entry survived the kills"

    # flip one payload byte of a cached entry of a known file
    target = "big/a.bin"
    node = index.attr(1)
    for part in target.split("/"):
        node = index.lookup(node.ino, part.encode())
    store = ChunkStore(cache)
    chunk = next((c for c in index.chunks_of(node.ino) if store.get(c.digest) is not None), None)
    if chunk is None:  # none of its chunks survived: plant a whole entry to corrupt
        chunk = index.chunks_of(node.ino)[0]
        first = files[target][:chunk.size]
        store.put(chunk.digest, first)
    entry = store.path(chunk.digest)
    raw = bytearray(entry.read_bytes())
    raw[-1] ^= 0x40
    entry.write_bytes(bytes(raw))

    # leftovers: a half-written temp entry of a writer that died (this test's kills left
    # such entries too, swept by the ChunkStore opened to check them), and an entry torn
    # at its final name, as a filesystem without rename ordering could leave after a crash
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is surely not running (barring reuse in the next instants)
    some = [d for d in sorted(digests) if d != chunk.digest][:2]
    half = store.path(some[0]).parent / f".tmp.{some[0].hex()}.{dead.pid}.1"
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"LZC1\x00 torn")
    torn_path = store.path(some[1])
    torn_path.parent.mkdir(parents=True, exist_ok=True)
    torn_path.write_bytes(b"LZC1")

    mnt, _ = mounts.mount(_ref(slow_server), name="final", cache=cache)
    assert (mnt / target).read_bytes() == files[target]  # the corrupt entry is not served
    assert "dropped" in mounts.log("final")
    st = mounts.wait_complete(mnt)
    assert st["prefetch"]["cached_chunks"] == st["prefetch"]["total_chunks"] == total
    # "complete" must mean the cache can serve the image offline: the torn entry was refetched
    assert ChunkStore(cache).get(some[1]) is not None
    _assert_all_bytes(mnt, files)
    assert _check_entries(cache, digests) == total
    assert not list(cache.glob("chunks/*/.tmp.*")), "temp entries of dead writers were left behind"
