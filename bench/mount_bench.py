"""The mount benchmark (issue 2): lazyfs against a full pull, curl and a pyfuse3 ceiling, on
loopback. (The full suite over a capped link is ``bench/run``, ``bench/suite.py``.)

Every figure is measured side by side in one run on loopback, each scenario repeated
(``--runs``, 5 by default), reported as median with min/max, and every ratio is taken
between medians of the same run:

1. readiness   ``lazyfs mount`` (background: returns when the rootfs is there) to the first
               byte of a file and to a finished program (``chroot MNT python3 -c 'import
               json, sqlite3, ssl'``), cold (fresh cache, page cache dropped) and warm (cache
               complete), against a full pull: curl the image's gzip layers from the same
               server piped into ``tar xzf``, then the same program; and against the program
               on an already-extracted rootfs (local disk).
2. bytes       what the cold program fetched from the origin, against the image's stored
               size and the gzip layers' size.
3. seq read    a large incompressible file read 1 MiB at a time: cold (from the server, no
               prefetch), warm (cache complete, page cache dropped, fresh mount), hot (second
               read, page cache), each against ``bench/memfs.py`` serving the same size from
               memory with the same mount options and readahead call.
4. prefetch    mount to ``prefetch complete`` for that image, against curl fetching the
               same blobs from the same server in sequence.
5. walk        ``find MNT -printf '%s'`` (an lstat of every entry) over a 50,000-file tree,
               fresh mount after dropping caches, against memfs serving the same shape.

    python3 bench/mount_bench.py   # after tests/setup.sh; on loopback, the default runs
    python3 bench/mount_bench.py --runs 3 --out /tmp/results
    python3 bench/mount_bench.py --quick      # tiny inputs, 1 run: for CI

Results go to ``bench/results/<UTC date-time>/mount.json`` (or ``--out DIR``), and a table
is printed. Needs root (FUSE, chroot, drop_caches). Generated inputs are cached in
``/var/tmp/lazyfs-bench-cache``, keyed by their parameters and the converter's source.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
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

from bench.harness import (  # noqa: E402
    PROGRAM,
    PYTHON,
    QUICK,
    Harness,
    Params,
    bdi,
    drop_caches,
    lazyfs,
    log,
    prepare_inputs,
    read_all,
    readahead_kb,
    resolve_in,
    run,
    stats,
    timed,
    wait_complete,
)
from blockindex.oci import Layout  # noqa: E402

# -- the scenarios --------------------------------------------------------------------------

def chroot_program(root: Path) -> None:
    run("chroot", str(root), PYTHON, "-c", PROGRAM, timeout=300)


def first_byte(root: Path) -> None:
    with open(resolve_in(root, PYTHON), "rb", buffering=0) as f:
        if len(f.read(1)) != 1:
            raise RuntimeError("empty read")


def lazy_readiness(h: Harness, cache: Path) -> dict[str, float]:
    drop_caches()
    t0 = time.perf_counter()
    mnt = h.mount(h.inputs.python, cache, "--no-prefetch")
    t_mount = time.perf_counter()
    first_byte(mnt)
    t_byte = time.perf_counter()
    chroot_program(mnt)
    t_prog = time.perf_counter()
    st = h.status(mnt)
    h.umount(mnt)
    return {"mount_s": t_mount - t0, "first_byte_s": t_byte - t0, "program_s": t_prog - t0,
            "origin_bytes": st["bytes_by_source"]["origin"],
            "stored_bytes": st["image"]["stored_bytes"]}


def pull_into(h: Harness, root: Path) -> None:
    """Pull the original image: every gzip layer streamed from the server into tar, so
    download and gunzip+untar overlap as in a real pull. (The python image has no
    whiteouts, so plain extraction in layer order gives the merged tree.)"""
    for layer in h.inputs.pull_layers:
        url = h.blob_url(h.inputs.pull, layer["digest"])
        run("bash", "-o", "pipefail", "-c",
            f"curl -sSf '{url}' | tar -xzf - -C '{root}' --numeric-owner")


def full_pull(h: Harness) -> dict[str, float]:
    root = h.fresh("pulled")
    drop_caches()
    t0 = time.perf_counter()
    pull_into(h, root)
    t_pull = time.perf_counter()
    first_byte(root)
    t_byte = time.perf_counter()
    chroot_program(root)
    t_prog = time.perf_counter()
    shutil.rmtree(root)
    return {"pull_s": t_pull - t0, "first_byte_s": t_byte - t0, "program_s": t_prog - t0}


def local_disk(root: Path) -> float:
    drop_caches()
    return timed(lambda: chroot_program(root))


def scenario_readiness(h: Harness, p: Params) -> dict[str, Any]:
    log("readiness: preparing the warm cache and a pulled rootfs")
    warm = h.warm_cache(h.inputs.python)
    local = h.fresh("local-rootfs")
    pull_into(h, local)
    cold: list[dict[str, float]] = []
    hot: list[dict[str, float]] = []
    pulls: list[dict[str, float]] = []
    disk: list[float] = []
    for i in range(p.runs):
        log(f"readiness run {i + 1}/{p.runs}")
        cold.append(lazy_readiness(h, h.fresh("cache-cold")))
        pulls.append(full_pull(h))
        hot.append(lazy_readiness(h, warm))
        disk.append(local_disk(local))
    shutil.rmtree(local)

    def col(rows: list[dict[str, float]], key: str) -> dict[str, Any]:
        return stats([r[key] for r in rows])

    out: dict[str, Any] = {
        "program": f"chroot MNT {PYTHON} -c '{PROGRAM}'",
        "lazy_cold": {k: col(cold, k) for k in ("mount_s", "first_byte_s", "program_s")},
        "lazy_warm": {k: col(hot, k) for k in ("mount_s", "first_byte_s", "program_s")},
        "full_pull": {k: col(pulls, k) for k in ("pull_s", "first_byte_s", "program_s")},
        "local_disk": {"program_s": stats(disk)},
    }
    med = {name: {k: v["median"] for k, v in out[name].items()}
           for name in ("lazy_cold", "lazy_warm", "full_pull", "local_disk")}
    out["ratios"] = {
        "cold_first_byte_vs_full_pull": med["lazy_cold"]["first_byte_s"]
        / med["full_pull"]["first_byte_s"],
        "cold_program_vs_full_pull": med["lazy_cold"]["program_s"] / med["full_pull"]["program_s"],
        "warm_program_vs_full_pull": med["lazy_warm"]["program_s"] / med["full_pull"]["program_s"],
        "warm_program_vs_local_disk": med["lazy_warm"]["program_s"]
        / med["local_disk"]["program_s"],
    }
    gzip_bytes = sum(int(layer["size"]) for layer in h.inputs.pull_layers)
    origin = [float(r["origin_bytes"]) for r in cold]
    stored = cold[0]["stored_bytes"]
    out_bytes = {
        "origin_bytes": stats(origin), "image_stored_bytes": stored,
        "gzip_layers_bytes": gzip_bytes,
        "ratios": {"vs_stored": statistics.median(origin) / stored,
                   "vs_gzip_layers": statistics.median(origin) / gzip_bytes},
    }
    return {"readiness": out, "bytes": out_bytes}


def scenario_seq_read(h: Harness, p: Params, memfs: Path) -> dict[str, Any]:
    log("seq read: preparing the warm cache")
    warm = h.warm_cache(h.inputs.seq)
    gb = p.seq_bytes / 1e9
    cold, warm_r, hot, ceil, ceil_hot, ceil_ra = [], [], [], [], [], []
    ra: dict[str, int | None] = {}

    def read_gbps(path: Path) -> float:
        n = 0

        def go() -> None:
            nonlocal n
            n = read_all(path)
        took = timed(go)
        if n != p.seq_bytes:
            raise RuntimeError(f"{path}: read {n} bytes, expected {p.seq_bytes}")
        return gb / took

    for i in range(p.runs):
        log(f"seq read run {i + 1}/{p.runs}")
        mnt = h.mount(h.inputs.seq, h.fresh("cache-cold"), "--no-prefetch")
        drop_caches()
        cold.append(read_gbps(mnt / "data" / "big"))
        ra["lazyfs"] = readahead_kb(mnt)  # after a read: FUSE_INIT has been answered
        h.umount(mnt)

        mnt = h.mount(h.inputs.seq, warm, "--no-prefetch")
        drop_caches()
        warm_r.append(read_gbps(mnt / "data" / "big"))
        hot.append(read_gbps(mnt / "data" / "big"))
        h.umount(mnt)

        drop_caches()
        ceil.append(read_gbps(memfs / "file"))
        ra["memfs"] = readahead_kb(memfs)
        ceil_hot.append(read_gbps(memfs / "file"))
        # what pyfuse3 gives when 1 MiB readahead is in effect (set after FUSE_INIT)
        knob = bdi(memfs)
        before = knob.read_text().strip()
        knob.write_text("1024")
        drop_caches()
        ceil_ra.append(read_gbps(memfs / "file"))
        knob.write_text(before)

    out: dict[str, Any] = {
        "bytes": p.seq_bytes, "read": "1 MiB readinto a reused buffer",
        "readahead_kb_in_effect": ra,
        "cold_gbps": stats(cold), "warm_gbps": stats(warm_r), "hot_gbps": stats(hot),
        "ceiling_gbps": stats(ceil), "ceiling_hot_gbps": stats(ceil_hot),
        "ceiling_1mib_readahead_gbps": stats(ceil_ra),
    }
    m = {k: v["median"] for k, v in out.items() if isinstance(v, dict) and "median" in v}
    out["ratios"] = {
        "cold_vs_ceiling": m["cold_gbps"] / m["ceiling_gbps"],
        "warm_vs_ceiling": m["warm_gbps"] / m["ceiling_gbps"],
        "hot_vs_ceiling_hot": m["hot_gbps"] / m["ceiling_hot_gbps"],
        "warm_vs_ceiling_1mib_readahead": m["warm_gbps"] / m["ceiling_1mib_readahead_gbps"],
    }
    return out


def scenario_prefetch(h: Harness, p: Params) -> dict[str, Any]:
    layout = Layout(h.inputs.images / h.inputs.seq)
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    index_digest = manifest["layers"][0]["digest"]
    blobs = [layer for layer in manifest["layers"] if layer["digest"] != index_digest]
    blob_bytes = sum(int(b["size"]) for b in blobs)
    curl = ["curl", "-sSf"]
    for b in blobs:
        curl += [h.blob_url(h.inputs.seq, b["digest"]), "-o", "/dev/null"]
    run(*curl)  # the server's files into the page cache for both sides
    pre, pre_ready, curls = [], [], []
    total = 0
    for i in range(p.runs):
        log(f"prefetch run {i + 1}/{p.runs}")
        cache = h.fresh("cache-prefetch")
        t0 = time.perf_counter()
        mnt = h.mount(h.inputs.seq, cache)
        t_ready = time.perf_counter()
        st = wait_complete(h, mnt)
        t_done = time.perf_counter()
        total = st["prefetch"]["total_bytes"]
        pre.append(total / 1e9 / (t_done - t0))
        pre_ready.append(total / 1e9 / (t_done - t_ready))
        cli = json.loads(lazyfs("status", str(mnt), "--json").stdout)
        if not cli["prefetch"]["complete"]:
            raise RuntimeError("lazyfs status --json disagrees: prefetch not complete")
        h.umount(mnt)
        shutil.rmtree(cache)
        curls.append(blob_bytes / 1e9 / timed(lambda: run(*curl)))
    out: dict[str, Any] = {
        "prefetch_bytes": total, "blob_bytes": blob_bytes, "blobs": len(blobs),
        "prefetch_gbps": stats(pre), "prefetch_after_mount_gbps": stats(pre_ready),
        "curl_gbps": stats(curls),
    }
    out["ratios"] = {
        "prefetch_vs_curl": out["prefetch_gbps"]["median"] / out["curl_gbps"]["median"],
        "prefetch_after_mount_vs_curl": out["prefetch_after_mount_gbps"]["median"]
        / out["curl_gbps"]["median"],
    }
    return out


def walk(root: Path) -> float:
    drop_caches()
    return timed(lambda: run("find", str(root), "-printf", "%s"))


def scenario_walk(h: Harness, p: Params, memfs: Path) -> dict[str, Any]:
    cache = h.fresh("cache-walk")
    lazy, ceil = [], []
    for i in range(p.runs):
        log(f"walk run {i + 1}/{p.runs}")
        mnt = h.mount(h.inputs.walk, cache, "--no-prefetch")
        lazy.append(walk(mnt / "many"))
        h.umount(mnt)
        ceil.append(walk(memfs / "many"))
    entries = p.walk_files + -(-p.walk_files // p.per_dir) + 1
    out: dict[str, Any] = {"entries": entries, "walk": "find DIR -printf '%s' (lstat of all)",
                           "lazyfs_s": stats(lazy), "ceiling_s": stats(ceil)}
    out["ratios"] = {"lazyfs_vs_ceiling": out["lazyfs_s"]["median"] / out["ceiling_s"]["median"]}
    return out


# -- the report -----------------------------------------------------------------------------

def table(r: dict[str, Any]) -> str:
    s = r["scenarios"]
    rows: list[tuple[str, str, str, str, str]] = []

    def sec(st: dict[str, Any]) -> tuple[str, str]:
        return f"{st['median']:.3f} s", f"{st['min']:.3f}-{st['max']:.3f}"

    def rate(st: dict[str, Any]) -> tuple[str, str]:
        return f"{st['median']:.2f} GB/s", f"{st['min']:.2f}-{st['max']:.2f}"

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if "readiness" in s:
        rd, rt = s["readiness"], s["readiness"]["ratios"]
        rows.append(("ready: lazy cold, mount returns", *sec(rd["lazy_cold"]["mount_s"]), "", ""))
        rows.append(("ready: lazy cold, first byte", *sec(rd["lazy_cold"]["first_byte_s"]),
                     f"{rt['cold_first_byte_vs_full_pull']:.2f}x full pull",
                     f"<1x: {verdict(rt['cold_first_byte_vs_full_pull'] < 1)}"))
        rows.append(("ready: lazy cold, program done", *sec(rd["lazy_cold"]["program_s"]),
                     f"{rt['cold_program_vs_full_pull']:.2f}x full pull",
                     f"<1x: {verdict(rt['cold_program_vs_full_pull'] < 1)}"))
        rows.append(("ready: full pull, pulled", *sec(rd["full_pull"]["pull_s"]), "", ""))
        rows.append(("ready: full pull, program done", *sec(rd["full_pull"]["program_s"]), "",
                     ""))
        rows.append(("ready: lazy warm, program done", *sec(rd["lazy_warm"]["program_s"]),
                     f"{rt['warm_program_vs_local_disk']:.2f}x local disk", ""))
        rows.append(("ready: local disk, program done", *sec(rd["local_disk"]["program_s"]),
                     "", ""))
        b = s["bytes"]
        o = b["origin_bytes"]
        rows.append(("bytes fetched by the program", f"{o['median'] / 2**20:.1f} MiB",
                     f"{o['min'] / 2**20:.1f}-{o['max'] / 2**20:.1f}",
                     f"{b['ratios']['vs_stored']:.1%} of {b['image_stored_bytes'] / 2**20:.1f} "
                     f"MiB stored, {b['ratios']['vs_gzip_layers']:.1%} of "
                     f"{b['gzip_layers_bytes'] / 2**20:.1f} MiB gzip", ""))
    if "seq_read" in s:
        q, rt = s["seq_read"], s["seq_read"]["ratios"]
        size = f"{q['bytes'] >> 20} MiB"
        rows.append((f"seq read {size}: cold", *rate(q["cold_gbps"]),
                     f"{rt['cold_vs_ceiling']:.2f} of ceiling", ""))
        rows.append((f"seq read {size}: warm", *rate(q["warm_gbps"]),
                     f"{rt['warm_vs_ceiling']:.2f} of ceiling",
                     f">=0.5: {verdict(rt['warm_vs_ceiling'] >= 0.5)}"))
        rows.append((f"seq read {size}: hot", *rate(q["hot_gbps"]),
                     f"{rt['hot_vs_ceiling_hot']:.2f} of ceiling hot", ""))
        rows.append(("seq read: memfs ceiling", *rate(q["ceiling_gbps"]),
                     f"readahead {q['readahead_kb_in_effect'].get('memfs')} KiB", ""))
        rows.append(("seq read: memfs ceiling hot", *rate(q["ceiling_hot_gbps"]), "", ""))
        rows.append(("seq read: memfs, 1 MiB readahead", *rate(q["ceiling_1mib_readahead_gbps"]),
                     f"warm is {rt['warm_vs_ceiling_1mib_readahead']:.2f} of it", ""))
    if "prefetch" in s:
        pf, rt = s["prefetch"], s["prefetch"]["ratios"]
        rows.append(("prefetch to complete (from mount)", *rate(pf["prefetch_gbps"]),
                     f"{rt['prefetch_vs_curl']:.2f} of curl",
                     f">=0.5: {verdict(rt['prefetch_vs_curl'] >= 0.5)}"))
        rows.append(("prefetch (from mount returned)", *rate(pf["prefetch_after_mount_gbps"]),
                     f"{rt['prefetch_after_mount_vs_curl']:.2f} of curl", ""))
        rows.append(("curl, same blobs in sequence", *rate(pf["curl_gbps"]), "", ""))
    if "walk" in s:
        w, rt = s["walk"], s["walk"]["ratios"]
        rows.append((f"walk {w['entries']} entries: lazyfs", *sec(w["lazyfs_s"]),
                     f"{rt['lazyfs_vs_ceiling']:.2f}x ceiling",
                     f"<=1.5x: {verdict(rt['lazyfs_vs_ceiling'] <= 1.5)}"))
        rows.append(("walk: memfs ceiling", *sec(w["ceiling_s"]), "", ""))
    head = ("scenario", "median", "min-max", "ratio", "goal")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(5)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
             for row in [head, tuple("-" * w for w in widths), *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="repetitions of each scenario (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one run (for CI)")
    parser.add_argument("--out", type=Path, help="directory for mount.json "
                        "(default bench/results/<UTC date-time>)")
    parser.add_argument("--keep", action="store_true", help="leave the work directory behind")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (FUSE mounts, chroot, drop_caches)")
    params = QUICK if args.quick else Params()
    if args.runs:
        params = dataclasses.replace(params, runs=args.runs)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    out_dir = args.out or ROOT / "bench" / "results" / stamp
    started = time.monotonic()
    load_before = os.getloadavg()
    Path("/var/tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-bench-", dir="/var/tmp"))
    h: Harness | None = None
    try:
        inputs = prepare_inputs(params, work)
        h = Harness(work, inputs)
        h.start_server()
        memfs = h.memfs(params.seq_bytes, params.walk_files, params.per_dir)
        scenarios: dict[str, Any] = {}
        scenarios.update(scenario_readiness(h, params))
        scenarios["seq_read"] = scenario_seq_read(h, params, memfs)
        scenarios["prefetch"] = scenario_prefetch(h, params)
        scenarios["walk"] = scenario_walk(h, params, memfs)
    finally:
        if h is not None:
            h.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "meta": {
            "utc": stamp, "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "commit": _git_commit(), "params": dataclasses.asdict(params),
            "seconds": round(time.monotonic() - started, 1),
            # other work on the machine skews every figure (ratios less: both sides of a
            # ratio are measured turn about within each run)
            "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0],
        },
        "scenarios": scenarios,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "mount.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    busy = max(load_before[0], os.getloadavg()[0])
    if busy > (os.cpu_count() or 1) * 0.5:
        print(f"\nwarning: load average {busy:.1f} on {os.cpu_count()} CPUs: other work "
              "shared the machine, absolute figures are low and noisy")
    print(f"\n{path}  ({result['meta']['seconds']}s, {params.runs} run(s) each)")
    return 0


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    return None


if __name__ == "__main__":
    raise SystemExit(main())
