"""What every scenario of the suite is handed: the link, the origin on it, the images, the
harness that owns every mount, and small timing tools shared by the scenarios."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Harness, drop_caches, resolve_in
from bench.image import ImageSet
from bench.link import Link, Origin

SH = ("/bin/sh", "-c", "echo hi")
PY = ("/usr/bin/python3", "-c", "import json, sqlite3, ssl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteParams:
    quick: bool
    runs: int
    """Repetitions of each timed scenario."""
    seq_bytes: int
    """Size of the file read sequentially (incompressible). Not a multiple of 8 MiB:
    httpdirfs 1.2.5 asks for a range past the end of such a file and exits."""
    random_reads: int
    """4 KiB reads at random offsets, warm (a tenth of them cold: each costs a fetch)."""
    latency_reads: int
    """Random 4 KiB reads timed while the prefetch runs, and idle."""
    walk_files: int
    per_dir: int = 100


FULL = SuiteParams(quick=False, runs=5, seq_bytes=(256 << 20) - 4096, random_reads=2000, latency_reads=200,
                   walk_files=50_000)
QUICK = SuiteParams(quick=True, runs=1, seq_bytes=(16 << 20) - 4096, random_reads=200, latency_reads=20,
                    walk_files=2_000)


@dataclasses.dataclass
class Bench:
    params: SuiteParams
    work: Path
    out: Path
    link: Link
    origin: Origin
    h: Harness
    image: ImageSet
    seq: str
    """Repository of the converted sequential-read image (``/data/big``)."""
    seq_dir: Path
    """The same file on local disk: ``seq_dir/data/big``."""
    walk: str
    """Repository of the many-files image."""

    def files_url(self, path: str) -> str:
        return f"http://{self.link.peer_ip}:{self.origin.files}/{path.lstrip('/')}"


def stats(values: list[float]) -> dict[str, Any]:
    """Median and spread of one figure over the runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def percentiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": s[-1], "n": len(s)}


CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def chroot(root: Path, argv: tuple[str, ...]) -> None:
    done = subprocess.run([CHROOT, str(root), *argv], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}: {last[-200:]}")


def run_programs(root: Path, t0: float) -> dict[str, float]:
    """Both readiness programs, one after the other: seconds from ``t0`` to each done."""
    chroot(root, SH)
    t_sh = time.perf_counter()
    chroot(root, PY)
    t_py = time.perf_counter()
    return {"sh_s": t_sh - t0, "python_s": t_py - t0}


def sample_files(rootfs: Path, n: int, seed: int = 6) -> list[tuple[str, int]]:
    """``n`` (path in the image, 4 KiB-aligned offset) at random over the image's regular
    files of at least 4 KiB: the same sample for every mode that reads it."""
    files: list[tuple[str, int]] = []
    for dirpath, _dirs, names in os.walk(rootfs):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_size >= 4096 and (st.st_mode & 0o170000) == 0o100000:
                files.append(("/" + os.path.relpath(p, rootfs), st.st_size))
    files.sort()
    rng = random.Random(seed)
    picks = rng.sample(files, min(n, len(files)))
    return [(path, rng.randrange(0, size // 4096) * 4096) for path, size in picks]


def timed_pread(root: Path, path: str, offset: int) -> float:
    t = time.perf_counter()
    fd = os.open(resolve_in(root, path), os.O_RDONLY)
    try:
        if len(os.pread(fd, 4096, offset)) == 0:
            raise RuntimeError(f"{path}: empty read at {offset}")
    finally:
        os.close(fd)
    return time.perf_counter() - t


#: what each mode's own tools are: read back into memory after the page cache is dropped
TOOLS = (
    [sys.executable, "-c", "import lazyfs.cli, lazyfs.mount, pyfuse3, trio, httpx, lz4, blake3, xxhash"],
    ["curl", "--version"], ["tar", "--version"], ["gzip", "--version"], [CHROOT, "--version"],
    ["rclone", "version"], ["httpdirfs", "--version"],
)


def fresh_cold(b: Bench) -> None:
    """Before anything is timed cold: the page cache dropped, so the image's bytes are read
    from where they live; then each tool's own program files read back (as on a node whose
    container runtime and lazyfs are running already), so they are not what is timed.
    A quick run keeps the page cache, as ``bench/registry_bench.py --quick`` does: its
    figures are not read, and each drop costs seconds (a sync and every tool read back) and
    slows every other process on the machine it shares, some twenty-five times a run."""
    if b.params.quick:
        return
    drop_caches()
    for argv in TOOLS:
        if shutil.which(argv[0]):
            subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=120)
