#!/usr/bin/env python3
"""The registry benchmark (issue 3): start a program from an image in a real registry,
lazily against a full pull, side by side in one run.

A Debian ``docker-registry`` on loopback holds the python image (``testkit/imagegen.py``:
this machine's python3 with its libraries, as a two-layer image; skopeo pushes it with gzip
layers, as registries usually hold images) and its lazy conversion. Each run, in turn:

lazy   ``lazyfs mount REGISTRY/python:1-lazy`` with a fresh cache (no prefetch, so the
       bytes are what the program needed) + ``chroot MNT python3 -c PROGRAM``.
full   ``skopeo copy docker://REGISTRY/python:1 oci:DIR`` + ``umoci unpack`` of its layers
       into a rootfs + the same program in it (chroot).

Reported: seconds (total and per step) as median/min/max over the runs, and the bytes the
registry sent (summed from its access log: every response, manifests included), with the
ratios lazy/full taken between medians of this run. The page cache is dropped before each
step of a full run (not in quick mode, which is for CI on a shared machine).

    bench/registry_bench.py                  # 5 runs; JSON to bench/results/<UTC time>/registry.json
    bench/registry_bench.py --quick --out DIR   # 1 run, for tests
    from bench.registry_bench import run; run(quick=True, outdir=Path(...)) -> dict

Needs root (FUSE, chroot), docker-registry, skopeo and umoci (``tests/setup.sh``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit import imagegen  # noqa: E402
from testkit.registryd import Registry  # noqa: E402

PROGRAM = "import json, sqlite3, ssl"
PYTHON = "/usr/bin/python3"
INPUT_CACHE = Path("/var/tmp/lazyfs-bench-cache/inputs")
_SIZE_RE = re.compile(r'"(?:GET|HEAD) \S+ HTTP/[\d.]+" \d+ (\d+)')


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(*cmd: str, **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


ENV: dict[str, str] = {}


def lazyfs(*args: str) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-m", "lazyfs", *args, cwd=ROOT, env={**os.environ, **ENV})


def _drop_caches(quick: bool) -> None:
    if not quick:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Served:
    """The registry's access log read as byte counts: bytes sent since a mark."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._mark = 0

    def mark(self) -> None:
        self._mark = len(self.registry.log())

    def since(self) -> int:
        return sum(int(m[1]) for m in _SIZE_RE.finditer(self.registry.log()[self._mark:]))


def lazy_run(ref: str, served: Served, work: Path, n: int | str, quick: bool) -> dict[str, Any]:
    """Mount ``ref`` with a fresh cache and no prefetch, run the program in it: seconds and
    the bytes the registry sent."""
    cache, mnt = work / f"lazy-cache-{n}", work / f"lazy-mnt-{n}"
    mnt.mkdir()
    _drop_caches(quick)
    served.mark()
    try:
        mount_s = _timed(lambda: lazyfs("mount", ref, str(mnt), "--cache", str(cache), "--no-prefetch",
                                        "--log-file", str(work / f"lazy-{n}.log")))
        program_s = _timed(lambda: _run("chroot", str(mnt), PYTHON, "-c", PROGRAM))
        nbytes = served.since()
    finally:
        subprocess.run([sys.executable, "-m", "lazyfs", "umount", str(mnt)], capture_output=True,
                       cwd=ROOT, timeout=60)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {"mount_s": mount_s, "program_s": program_s, "total_s": mount_s + program_s, "bytes": nbytes}


def full_run(ref: str, served: Served, work: Path, n: int | str, quick: bool) -> dict[str, Any]:
    """Pull ``ref`` whole (skopeo), unpack it (umoci), run the program in it."""
    layout, bundle = work / f"full-oci-{n}", work / f"full-bundle-{n}"
    _drop_caches(quick)
    served.mark()
    pull_s = _timed(lambda: _run("skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                 f"docker://{ref}", f"oci:{layout}:1", timeout=600))
    nbytes = served.since()
    unpack_s = _timed(lambda: _run("umoci", "unpack", "--image", f"{layout}:1", str(bundle), timeout=600))
    program_s = _timed(lambda: _run("chroot", str(bundle / "rootfs"), PYTHON, "-c", PROGRAM))
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    return {"pull_s": pull_s, "unpack_s": unpack_s, "program_s": program_s,
            "total_s": pull_s + unpack_s + program_s, "bytes": nbytes}


def run(quick: bool, outdir: Path, runs: int | None = None) -> dict[str, Any]:
    """Run the benchmark; write ``outdir/registry.json`` and return what it holds."""
    runs = runs or (1 if quick else 5)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-regbench-", dir="/var/tmp"))
    # the push record (fetcher/blobrepos.py) of this run's throwaway registry stays in `work`
    ENV["XDG_STATE_HOME"] = str(work / "state")
    registry = None
    try:
        tar = imagegen.build_python_image(work / "python.tar", cache_dir=INPUT_CACHE, with_pyc=True)
        registry = Registry(work, name="registry")
        registry.skopeo_copy(f"docker-archive:{tar}", "python:1")
        t = time.perf_counter()
        lazyfs("convert", f"docker://{registry.host}/python:1", f"docker://{registry.host}/python:1-lazy")
        convert_s = time.perf_counter() - t
        info = json.loads(lazyfs("images", f"{registry.host}/python:1-lazy", "--json").stdout)
        original = json.loads(_run("skopeo", "inspect", "--raw", "--tls-verify=false",
                                   f"docker://{registry.host}/python:1").stdout)
        gzip_bytes = sum(layer["size"] for layer in original["layers"])
        served = Served(registry)
        lazy: list[dict[str, Any]] = []
        full: list[dict[str, Any]] = []
        for n in range(runs):  # interleaved, so drift on a shared machine hits both alike
            _log(f"run {n + 1}/{runs}: lazy")
            lazy.append(lazy_run(f"{registry.host}/python:1-lazy", served, work, n, quick))
            _log(f"run {n + 1}/{runs}: full pull")
            full.append(full_run(f"{registry.host}/python:1", served, work, n, quick))
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)

    def figures(results: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: _summary([r[key] for r in results]) for key in results[0]}

    scen = {"lazy": figures(lazy), "full_pull": figures(full)}
    scen["ratios"] = {
        "lazy_vs_full_total": scen["lazy"]["total_s"]["median"] / scen["full_pull"]["total_s"]["median"],
        "lazy_vs_full_bytes": scen["lazy"]["bytes"]["median"] / scen["full_pull"]["bytes"]["median"],
    }
    result = {
        "benchmark": "registry",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": quick,
        "runs": runs,
        "program": f"chroot ROOTFS {PYTHON} -c {PROGRAM!r}",
        "image": {"gzip_layers_bytes": gzip_bytes, "lazy_stored_bytes": info.get("stored_bytes"),
                  "file_bytes": info.get("file_bytes"), "files": info.get("files"),
                  "chunks": info.get("chunks"), "convert_s": convert_s},
        "scenarios": scen,
    }
    path = outdir / "registry.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result, path)
    return result


def _print_table(result: dict[str, Any], path: Path) -> None:
    s = result["scenarios"]
    mib = 1 << 20
    rows = [
        ("lazy: mount", s["lazy"]["mount_s"]["median"], ""),
        ("lazy: program", s["lazy"]["program_s"]["median"], ""),
        ("lazy: total", s["lazy"]["total_s"]["median"], f"{s['lazy']['bytes']['median'] / mib:.1f} MiB"),
        ("full: skopeo copy", s["full_pull"]["pull_s"]["median"], ""),
        ("full: umoci unpack", s["full_pull"]["unpack_s"]["median"], ""),
        ("full: program", s["full_pull"]["program_s"]["median"], ""),
        ("full: total", s["full_pull"]["total_s"]["median"],
         f"{s['full_pull']['bytes']['median'] / mib:.1f} MiB"),
    ]
    print(f"registry benchmark, {result['runs']} run(s), medians "
          "(scenario: seconds, bytes from the registry)")
    for name, secs, extra in rows:
        print(f"  {name:<20} {secs:7.2f} s  {extra}")
    r = s["ratios"]
    print(f"  lazy/full: {r['lazy_vs_full_total']:.2f}x the time, {r['lazy_vs_full_bytes']:.2f}x the bytes")
    print(f"results: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run, page cache kept: for CI")
    ap.add_argument("--runs", type=int, help="repetitions (default 5, quick 1)")
    ap.add_argument("--out", type=Path, help="directory for registry.json "
                    "(default bench/results/<UTC date-time>/)")
    args = ap.parse_args()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    out = args.out or ROOT / "bench" / "results" / stamp
    run(args.quick, out, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
