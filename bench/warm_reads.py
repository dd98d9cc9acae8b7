"""Warm reads of a complete image: random 4 KiB ``pread``s and whole-file reads through a
lazyfs mount whose cache holds every chunk, beside the same files on local disk.

    python3 bench/warm_reads.py [--tree DIR] [--mib 64] [--reads 2000] [--runs 3]

It converts a tree of files (half random, half compressible text; 1 MiB chunks), serves
it on loopback, mounts it with ``--tree``'s lazyfs (default: this one, so that two trees
can be compared on the same input), waits for the prefetch to fill the cache, stops the
server, and then, ``--runs`` times with the page cache dropped before each: the reads
through the mount and through the local copy, one after the other. With ``--warm``, the
bytes underneath (the cache's entries, the local files) are read into the page cache
after it is dropped, so that what is measured is the read path, not the disk. Prints one
JSON object: medians over the runs of the per-read latencies' median and mean (microseconds;
the mean is what sets a rate) and of whole-file
throughput (MiB/s), and the ratio local/mount (1.0: as fast as local disk).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockindex.convert import convert  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402

MiB = 1 << 20


def make_tree(root: Path, mib: int) -> None:
    rng = random.Random(7)
    root.mkdir(parents=True)
    for n in range(max(mib // 8, 1)):
        if n % 2:
            data = rng.randbytes(8 * MiB)
        else:
            words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"lazyfs", b"chunk", b"block"]
            data = b" ".join(rng.choice(words) for _ in range(8 * MiB // 5))[: 8 * MiB]
        (root / f"f{n:02d}.bin").write_bytes(data)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def random_latencies(root: Path, picks: list[tuple[str, int]]) -> list[float]:
    fds = {p: os.open(root / p, os.O_RDONLY) for p in {p for p, _ in picks}}
    for fd in fds.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    out = []
    try:
        for path, off in picks:
            t = time.perf_counter()
            if len(os.pread(fds[path], 4096, off)) != 4096:
                raise RuntimeError(f"{root / path}: short read at {off}")
            out.append((time.perf_counter() - t) * 1e6)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def whole_rate(root: Path) -> float:
    buf = bytearray(MiB)
    total = 0
    t = time.perf_counter()
    for p in sorted(root.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / (time.perf_counter() - t) / MiB


def warm(root: Path) -> None:
    """Read every file under ``root`` into the page cache."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(MiB):
                    pass


def lazyfs(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazyfs", *args], cwd=tree, check=True,
                          capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="the lazyfs source tree to mount with")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm", action="store_true", help="the bytes underneath in the page cache")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lazyfs-warm-"))
    mnt = work / "mnt"
    server = None
    try:
        local = work / "local"
        make_tree(local, args.mib)
        convert(f"dir:{local}", f"oci:{work / 'images' / 'w'}:1", chunk_size=MiB)
        server = make_server(work / "images", "127.0.0.1", 0)
        server.start()
        mnt.mkdir()
        lazyfs(args.tree, "mount", f"127.0.0.1:{server.port}/w:1", str(mnt), "--cache", str(work / "cache"),
               "--log-file", str(work / "mount.log"))
        deadline = time.monotonic() + 300
        while not json.loads(lazyfs(args.tree, "status", str(mnt), "--json").stdout)["prefetch"]["complete"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the prefetch did not complete in 300 s")
            time.sleep(0.1)
        server.close()
        server = None
        rng = random.Random(3)
        names = sorted(p.name for p in local.iterdir())
        size = (local / names[0]).stat().st_size
        keys = ("mount_us", "local_us", "mount_mean_us", "local_mean_us", "mount_mib_s", "local_mib_s")
        rows: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(args.runs):
            picks = [(rng.choice(names), rng.randrange(size // 4096) * 4096) for _ in range(args.reads)]
            for label, root, under in (("mount", mnt, work / "cache" / "chunks"), ("local", local, local)):
                drop_caches()
                if args.warm:
                    warm(under)
                lat = random_latencies(root, picks)
                rows[f"{label}_us"].append(statistics.median(lat))
                rows[f"{label}_mean_us"].append(statistics.fmean(lat))
                drop_caches()
                if args.warm:
                    warm(under)
                rows[f"{label}_mib_s"].append(whole_rate(root))
        med = {k: round(statistics.median(v), 1) for k, v in rows.items()}
        print(json.dumps({"tree": str(args.tree), "warm": args.warm, "mib": args.mib, "reads": args.reads,
                          "runs": args.runs,
                          **med, "random_local_over_mount": round(med["local_us"] / med["mount_us"], 3),
                          "random_rate_mount_over_local": round(med["local_mean_us"] / med["mount_mean_us"],
                                                                3),
                          "whole_mount_over_local": round(med["mount_mib_s"] / med["local_mib_s"], 3),
                          "all": rows}))
    finally:
        if server is not None:
            server.close()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        time.sleep(0.5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
