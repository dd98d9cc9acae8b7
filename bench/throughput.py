"""Scenario 4: reads once started, against local disk and the in-memory pyfuse3 ceiling
(``bench/memfs.py``, same mount options and readahead), all with the page cache dropped:

- sequential: one incompressible file read 1 MiB at a time: lazyfs cold (over the link, no
  prefetch), lazyfs warm (cache complete, fresh mount), local disk, memfs;
- random: 4 KiB ``pread``s at random 4 KiB-aligned offsets of that file (the same offsets
  for every mode; cold takes a tenth as many, since each one costs a fetch);
- metadata walk: ``find -printf '%s'`` (an lstat of every entry) over the Debian tree,
  lazyfs against local disk, and over a many-files tree, lazyfs against memfs.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench.context import Bench, fresh_cold, stats
from bench.harness import log, read_all, run


def _seq(path: Path, size: int) -> float:
    t = time.perf_counter()
    n = read_all(path)
    took = time.perf_counter() - t
    if n != size:
        raise RuntimeError(f"{path}: read {n} bytes, expected {size}")
    return size / took


def _random(path: Path, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError(f"{path}: short read at {off}")
        took = time.perf_counter() - t
    finally:
        os.close(fd)
    return len(offsets) * 4096 / took


def _walk(b: Bench, root: Path) -> float:
    fresh_cold(b)
    t = time.perf_counter()
    run("find", str(root), "-printf", "%s", timeout=1800)
    return time.perf_counter() - t


def scenario(b: Bench) -> dict[str, Any]:
    p = b.params
    size = p.seq_bytes
    rng = random.Random(4096)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(p.random_reads)]
    cold_offsets = offsets[: max(10, p.random_reads // 10)]
    log("throughput: filling a warm cache")
    warm = b.h.warm_cache(b.seq)
    memfs = b.h.memfs(size, p.walk_files, p.per_dir)
    local = b.seq_dir / "data" / "big"
    seq: dict[str, list[float]] = {k: [] for k in ("lazy_cold", "lazy_warm", "local_disk", "memfs")}
    rnd: dict[str, list[float]] = {k: [] for k in seq}
    walks: dict[str, list[float]] = {k: [] for k in ("lazy_debian", "local_debian", "lazy_many",
                                                     "memfs_many")}
    for i in range(p.runs):
        log(f"throughput run {i + 1}/{p.runs}")
        for mode in ("seq", "random"):
            mnt = b.h.mount(b.seq, b.h.fresh("cache-cold"), "--no-prefetch")
            fresh_cold(b)
            if mode == "seq":
                seq["lazy_cold"].append(_seq(mnt / "data" / "big", size))
            else:
                rnd["lazy_cold"].append(_random(mnt / "data" / "big", cold_offsets))
            b.h.umount(mnt)
        mnt = b.h.mount(b.seq, warm, "--no-prefetch")
        fresh_cold(b)
        seq["lazy_warm"].append(_seq(mnt / "data" / "big", size))
        fresh_cold(b)
        rnd["lazy_warm"].append(_random(mnt / "data" / "big", offsets))
        b.h.umount(mnt)
        for mode, path in (("local_disk", local), ("memfs", memfs / "file")):
            fresh_cold(b)
            seq[mode].append(_seq(path, size))
            fresh_cold(b)
            rnd[mode].append(_random(path, offsets))

        cache = b.h.fresh("cache-walk")
        mnt = b.h.mount(b.image.lazy, cache, "--no-prefetch")
        walks["lazy_debian"].append(_walk(b, mnt))
        b.h.umount(mnt)
        walks["local_debian"].append(_walk(b, b.image.rootfs))
        mnt = b.h.mount(b.walk, cache, "--no-prefetch")
        walks["lazy_many"].append(_walk(b, mnt / "many"))
        b.h.umount(mnt)
        walks["memfs_many"].append(_walk(b, memfs / "many"))
        shutil.rmtree(cache)
    shutil.rmtree(warm)
    out: dict[str, Any] = {
        "seq_bytes": size, "random_reads": {"warm": len(offsets), "cold": len(cold_offsets)},
        "seq_bytes_per_s": {k: stats(v) for k, v in seq.items()},
        "random_4k_bytes_per_s": {k: stats(v) for k, v in rnd.items()},
        "walk_s": {k: stats(v) for k, v in walks.items()},
        "walk_entries": {"debian": sum(1 for _ in b.image.rootfs.rglob("*")),
                         "many": p.walk_files + -(-p.walk_files // p.per_dir) + 1},
    }
    s = {k: v["median"] for k, v in out["seq_bytes_per_s"].items()}
    r = {k: v["median"] for k, v in out["random_4k_bytes_per_s"].items()}
    w = {k: v["median"] for k, v in out["walk_s"].items()}
    out["ratios"] = {
        "seq_warm_vs_memfs": s["lazy_warm"] / s["memfs"],
        "seq_warm_vs_local_disk": s["lazy_warm"] / s["local_disk"],
        "seq_cold_vs_link": s["lazy_cold"] / b.link.profile.bytes_per_s,
        "random_warm_vs_memfs": r["lazy_warm"] / r["memfs"],
        "random_warm_vs_local_disk": r["lazy_warm"] / r["local_disk"],
        "walk_debian_vs_local_disk": w["lazy_debian"] / w["local_debian"],
        "walk_many_vs_memfs": w["lazy_many"] / w["memfs_many"],
    }
    return out
