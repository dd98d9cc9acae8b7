"""The prefetch's cost: CPU seconds of the mount process per GiB prefetched, fill rate, and
4 KiB read latency while it runs, for this tree and a baseline revision side by side.

On a shared machine wall time swings with the neighbours' load; the CPU time of the
mount process (``utime + stime`` from ``/proc/PID/stat``) from mounted to ``prefetch
complete`` does not, so it is the figure to compare. Every run mounts a fresh cache
from ``lazyfs serve`` on loopback, or with ``--link default`` (1 Gbit/s, 2 ms) or ``wan``
from the suite's origin behind a capped veth (``bench/link.py``), where curl fetching
the same blobs one after another gives what the link carries; the trees alternate run
by run, so both see the same load. Each tree runs as the user runs it (``python3 -m
lazyfs`` with the tree as its working directory), the baseline from ``git archive REV``.

    python3 bench/prefetch_cpu.py                      # this tree against where it left main
    python3 bench/prefetch_cpu.py --baseline HEAD~3 --runs 5 --mib 300
    python3 bench/prefetch_cpu.py --no-baseline --runs 1 --mib 40
    python3 bench/prefetch_cpu.py --link default    # over the suite's 1 Gbit/s link

The image is generated (seeded, cached in ``/var/tmp/lazyfs-bench-cache``): files with
sizes drawn like a distribution's (many small files, a long tail of large ones), about
half of their bytes compressible text, half random; converted with the default 1 MiB
chunks. Results go to ``bench/results/<UTC time>/prefetch_cpu.json``; a table is printed.
Needs root (FUSE).
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.context import percentiles, timed_pread  # noqa: E402
from bench.harness import free_port, log, wait_port  # noqa: E402
from bench.link import PROFILES, Link  # noqa: E402
from lazyfs.mountinfo import STATUS_XATTR  # noqa: E402

CACHE = Path("/var/tmp/lazyfs-bench-cache")
_TICK = os.sysconf("SC_CLK_TCK")
_WORDS = [w.encode() for w in (
    "the of and to in is that for it as with was on be by this are or from at an not "
    "import def return class self none true false if else elif while for try except "
    "usr lib share bin etc python3 debian package version license copyright config "
    "library module function object value string number list dict error warning").split()]


def _text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(_WORDS, k=64)) + b"\n"
    return bytes(out[:n])


def make_rootfs(dest: Path, total: int, seed: int = 6) -> int:
    """Files of log-normal sizes (median 6 KiB, at most 8 MiB) until ``total`` bytes;
    each 4 KiB block text or random bytes, half and half. Returns the file count."""
    rng = random.Random(seed)
    written = count = 0
    while written < total:
        size = min(int(rng.lognormvariate(8.7, 1.9)) + 1, 8 << 20, total - written)
        d = dest / f"d{count // 200:03d}"
        d.mkdir(parents=True, exist_ok=True)
        data = bytearray()
        while len(data) < size:
            step = min(4096, size - len(data))
            data += _text(rng, step) if rng.random() < 0.5 else rng.randbytes(step)
        (d / f"f{count:05d}").write_bytes(data)
        written += size
        count += 1
    return count


def prepare_image(mib: int) -> tuple[Path, str]:
    """A layout dir holding repository ``prefetch-<mib>`` (tag 1), converted once."""
    images = CACHE / "prefetch-cpu"
    repo = f"prefetch-{mib}"
    if (images / repo / "index.json").exists():
        return images, repo
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        files = make_rootfs(rootfs, mib << 20)
        log(f"image: {files} files, {mib} MiB; converting")
        out = Path(tmp) / "layout"
        subprocess.run([sys.executable, "-m", "lazyfs", "convert", f"dir:{rootfs}", f"oci:{out}:1"],
                       cwd=ROOT, check=True, capture_output=True)
        os.replace(out, images / repo)
    return images, repo


def cpu_seconds(pid: int) -> tuple[float, float]:
    """``(user, system)`` CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


class Tree:
    """One source tree of lazyfs, run as ``python3 -m lazyfs`` from its root."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root

    def lazyfs(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "lazyfs", *args], cwd=self.root,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"lazyfs {args[0]} ({self.name}) exited {done.returncode}: "
                               f"{done.stderr.strip()[-300:]}")
        return done.stdout

    def mount(self, ref: str, mnt: Path, cache: Path, *extra: str) -> int:
        host = ref.split("/", 1)[0]
        if not host.startswith("127."):
            extra = ("--insecure-registry", host, *extra)
        out = self.lazyfs("mount", ref, str(mnt), "--cache", str(cache),
                          "--log-file", f"{mnt}.log", *extra)
        return int(out.split("(pid ", 1)[1].split(",", 1)[0])


def status(mnt: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mnt, STATUS_XATTR))


def sample(rootfs_files: list[tuple[str, int]], n: int, seed: int = 7) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    picks = rng.sample(rootfs_files, min(n, len(rootfs_files)))
    return [(p, rng.randrange(0, max(1, size // 4096)) * 4096) for p, size in picks]


def image_files(mnt: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, _dirs, names in os.walk(mnt):
        for name in names:
            p = os.path.join(dirpath, name)
            size = os.lstat(p).st_size
            if size >= 4096:
                out.append((p, size))
    out.sort()
    return out


def fill_run(tree: Tree, ref: str, work: Path, blob_bytes: int) -> dict[str, float]:
    """Mount a fresh cache, prefetch to completion, nothing else reading."""
    cache, mnt = work / "cache", work / "mnt"
    mnt.mkdir()
    pid = tree.mount(ref, mnt, cache)
    try:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        deadline = t0 + 1800
        while not status(mnt)["prefetch"]["complete"]:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{tree.name}: prefetch did not complete in 1800 s")
            time.sleep(0.05)
        took, cpu1 = time.perf_counter() - t0, cpu_seconds(pid)
    finally:
        tree.lazyfs("umount", str(mnt))
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    gib = blob_bytes / (1 << 30)
    return {"seconds": took, "cpu_seconds": user + system, "cpu_s_per_gib": (user + system) / gib,
            "user_s_per_gib": user / gib, "system_s_per_gib": system / gib,
            "mb_per_s": blob_bytes / took / 1e6}


def busy_run(tree: Tree, ref: str, work: Path, reads: list[tuple[str, int]],
             *extra: str) -> list[float]:
    """4 KiB reads at the sample's places while the prefetch runs (those that finish
    before it does), or with ``--no-prefetch`` (each one a fetch)."""
    cache, mnt = work / "cache", work / "mnt"
    mnt.mkdir()
    tree.mount(ref, mnt, cache, *extra)
    out: list[float] = []
    try:
        for rel, off in reads:
            took = timed_pread(mnt, rel, off)
            if not extra and status(mnt)["prefetch"]["complete"]:
                break
            out.append(took)
    finally:
        tree.lazyfs("umount", str(mnt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=300, help="image size in MiB of file bytes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reads", type=int, default=400, help="4 KiB reads per latency run")
    ap.add_argument("--baseline", help="git revision to compare with (default: the merge base "
                    "of HEAD and main)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--link", choices=["loopback", *PROFILES], default="loopback",
                    help="where the origin is: lazyfs serve on loopback, or behind a capped link")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    images, repo = prepare_image(args.mib)
    layout = json.loads((images / repo / "index.json").read_text())
    mdesc = layout["manifests"][0]["digest"].split(":", 1)
    manifest = json.loads((images / repo / "blobs" / mdesc[0] / mdesc[1]).read_bytes())
    blob_bytes = sum(int(x["size"]) for x in manifest["layers"][1:])
    # not in /tmp: on this machine's ext4 (no journal) creating a file scans past the
    # inodes freed in its block group in the last 30 s, and every test run's /tmp churn
    # lands in the same groups, so the caches' system time would measure the neighbours
    work = Path(tempfile.mkdtemp(prefix="work-", dir=images))
    trees = [Tree("this", ROOT)]
    if not args.no_baseline:
        base = work / "baseline"
        base.mkdir()
        spec = args.baseline or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True,
                                               capture_output=True, text=True).stdout.strip()
        rev = subprocess.run(["git", "rev-parse", "--short", spec], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        trees.insert(0, Tree(f"baseline {rev}", base))
    link: Link | None = None
    server: subprocess.Popen | None = None
    results: dict[str, dict[str, list]] = {t.name: {"fill": [], "busy": [], "idle": []} for t in trees}
    curls: list[float] = []
    try:
        if args.link == "loopback":
            host, port = "127.0.0.1", free_port()
            server = subprocess.Popen([sys.executable, "-m", "lazyfs", "serve", str(images), "--listen",
                                       f"{host}:{port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            wait_port(port)
        else:
            link = Link(PROFILES[args.link])
            link.open()
            host, port = link.peer_ip, link.start_origin(images, {}).oci
        ref = f"{host}:{port}/{repo}:1"
        curl = ["curl", "-sSf"]
        for layer in manifest["layers"][1:]:
            curl += [f"http://{host}:{port}/v2/{repo}/blobs/{layer['digest']}", "-o", "/dev/null"]
        n = 0

        def fresh() -> Path:
            nonlocal n
            n += 1
            d = work / f"run{n}"
            d.mkdir()
            return d

        # the sample of places to read, from a mount with no prefetch
        d = fresh()
        (d / "mnt").mkdir()
        trees[-1].mount(ref, d / "mnt", d / "cache", "--no-prefetch")
        try:
            reads = [(os.path.relpath(p, d / "mnt"), off)
                     for p, off in sample(image_files(d / "mnt"), args.reads)]
        finally:
            trees[-1].lazyfs("umount", str(d / "mnt"))
        shutil.rmtree(d)
        for i in range(args.runs):
            t = time.perf_counter()
            subprocess.run(curl, check=True, timeout=600)
            curls.append(blob_bytes / (time.perf_counter() - t) / 1e6)
            for tree in trees:
                log(f"run {i + 1}/{args.runs}: {tree.name}")
                for kind, fn in (("fill", lambda d, t=tree: fill_run(t, ref, d, blob_bytes)),
                                 ("busy", lambda d, t=tree: busy_run(t, ref, d, reads)),
                                 ("idle", lambda d, t=tree: busy_run(t, ref, d, reads, "--no-prefetch"))):
                    # caches stay until the end: on ext4 without a journal, creating files
                    # just after deleting thousands costs far more system time, and the
                    # next run would pay for this one's cleanup
                    results[tree.name][kind].append(fn(fresh()))
                f = results[tree.name]["fill"][-1]
                log(f"  {f['cpu_s_per_gib']:.1f} CPU s/GiB ({f['user_s_per_gib']:.1f} user), "
                    f"{f['mb_per_s']:.0f} MB/s, "
                    f"{len(results[tree.name]['busy'][-1])} reads while prefetching")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        if link is not None:
            link.close()
        for t in trees[:-1]:
            shutil.rmtree(t.root, ignore_errors=True)

    out: dict[str, Any] = {"image_mib": args.mib, "blob_bytes": blob_bytes, "runs": args.runs,
                           "link": link.describe() if link else "loopback, lazyfs serve",
                           "curl_mb_per_s": statistics.median(curls),
                           "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "trees": {}}
    for name, r in results.items():
        fills = r["fill"]
        busy = [x for run in r["busy"] for x in run]
        idle = [x for run in r["idle"] for x in run]
        out["trees"][name] = {
            key: statistics.median(f[key] for f in fills)
            for key in ("cpu_s_per_gib", "user_s_per_gib", "system_s_per_gib", "mb_per_s",
                        "seconds", "cpu_seconds")
        } | {"fills": fills,
             "read_ms_while_prefetching": _ms(percentiles(busy)) if busy else None,
             "read_ms_idle_no_prefetch": _ms(percentiles(idle))}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    dest = args.out or ROOT / "bench" / "results" / stamp
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "prefetch_cpu.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"image: {args.mib} MiB of files, {blob_bytes / 1e6:.0f} MB stored; {args.link}; "
          f"curl {out['curl_mb_per_s']:.0f} MB/s; medians of {args.runs} runs")
    print("| tree | CPU s/GiB stored (user + system) | MB/s stored | "
          "4 KiB read p50 / p99 while prefetching | idle |")
    print("| --- | --- | --- | --- | --- |")
    for name, t in out["trees"].items():
        b, i = t["read_ms_while_prefetching"], t["read_ms_idle_no_prefetch"]
        busy_s = f"{b['p50']:.1f} / {b['p99']:.1f} ms (n={b['n']})" if b else "prefetch finished first"
        print(f"| {name} | {t['cpu_s_per_gib']:.1f} ({t['user_s_per_gib']:.1f} + "
              f"{t['system_s_per_gib']:.1f}) | {t['mb_per_s']:.0f} | {busy_s} | "
              f"{i['p50']:.1f} / {i['p99']:.1f} ms |")
    print(f"-> {dest / 'prefetch_cpu.json'}")
    shutil.rmtree(work, ignore_errors=True)


def _ms(p: dict[str, float]) -> dict[str, float]:
    return {k: (round(v * 1000, 2) if k != "n" else v) for k, v in p.items()}


if __name__ == "__main__":
    main()
