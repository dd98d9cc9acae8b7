"""The benchmark suite (issue 6): lazyfs on a real image over a capped link, side by side
with a full pull, local disk, the in-memory pyfuse3 ceiling and other lazy filesystems.

    bench/run                      # set-up, then the full suite (about 15 minutes)
    bench/run --quick              # the same code on tiny inputs (about a minute)
    bench/run --profile wan        # 100 Mbit/s, 30 ms instead of 1 Gbit/s, 2 ms
    bench/run --mbit 500 --rtt-ms 10 --runs 3 --only readiness,prefetch

Scenarios, each in its own module: ``readiness`` (1, 2: readiness and bytes), ``prefetch``
(3), ``throughput`` (4), ``decompress`` (5), ``nodes`` (6: the other benchmark modules),
``others`` (7: rclone and httpdirfs). Results: ``bench/results/<UTC date-time>/`` (or
``--out``) gets ``suite.json``, ``summary.md`` and PNG plots. Needs root (FUSE, chroot,
network namespaces, drop_caches). Inputs are cached in ``/var/cache/lazyfs-bench``.
Exit status: 0, or 1 when a scenario failed (the others still ran and are reported).
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
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import decompress, nodes, others, prefetch, readiness, report, throughput  # noqa: E402
from bench.context import FULL, QUICK, Bench, SuiteParams  # noqa: E402
from bench.harness import Harness, log, source_key  # noqa: E402
from bench.image import CACHE, ImageSet, convert_cached, debian_image, quick_image  # noqa: E402
from bench.link import PROFILES, Link  # noqa: E402
from bench.memfs import pseudo_random  # noqa: E402
from testkit import imagegen  # noqa: E402

SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "readiness": readiness.scenario,  # also "bytes"
    "prefetch": prefetch.scenario,
    "throughput": throughput.scenario,
    "decompress": decompress.scenario,
    "others": others.scenario,
}


def prepare_extra(image: ImageSet, p: SuiteParams, work: Path) -> tuple[str, Path, str]:
    """The sequential-read file (converted, and on local disk) and the many-files image."""
    key = source_key()
    seq_dir = CACHE / f"seq-{p.seq_bytes}"
    if not (seq_dir / "data" / "big").exists():
        tmp = seq_dir.with_name(seq_dir.name + f".{os.getpid()}.tmp")
        (tmp / "data").mkdir(parents=True)
        with open(tmp / "data" / "big", "wb") as f:
            piece = 64 << 20
            for off in range(0, p.seq_bytes, piece):
                f.write(pseudo_random(min(piece, p.seq_bytes - off), seed=off))
        os.replace(tmp, seq_dir)
    seq = f"seq-{p.seq_bytes}-{key}"
    convert_cached(image.images, seq, f"dir:{seq_dir}")
    walk = f"many-{p.walk_files}-{p.per_dir}-{key}"
    if not (image.images / walk / "index.json").exists():
        many = imagegen.build_many_files_image(work / "many.tar", n=p.walk_files, per_dir=p.per_dir)
        convert_cached(image.images, walk, f"tar:{many}")
        many.unlink()
    return seq, seq_dir, walk


def run_suite(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    params = QUICK if args.quick else FULL
    if args.runs:
        params = dataclasses.replace(params, runs=args.runs)
    profile = dataclasses.replace(PROFILES[args.profile],
                                  **({"mbit": args.mbit} if args.mbit else {}),
                                  **({"rtt_ms": args.rtt_ms} if args.rtt_ms is not None else {}))
    only = set(args.only.split(",")) if args.only else set(SCENARIOS) | {"nodes"}
    started = time.monotonic()
    load_before = os.getloadavg()
    Path("/var/tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-suite-", dir="/var/tmp"))
    scenarios: dict[str, Any] = {}
    failed: list[str] = []
    try:
        image = quick_image(work) if params.quick else debian_image()
        seq, seq_dir, walk = prepare_extra(image, params, work)
        with Link(profile) as link:
            origin = link.start_origin(image.images, {**image.trees, "seq": seq_dir})
            h = Harness(work, None, host=link.peer_ip)
            h.port = origin.oci
            b = Bench(params=params, work=work, out=out_dir, link=link, origin=origin, h=h,
                      image=image, seq=seq, seq_dir=seq_dir, walk=walk)
            try:
                for name, fn in SCENARIOS.items():
                    if name not in only:
                        continue
                    log(f"== scenario {name}")
                    try:
                        got = fn(b)
                        scenarios.update(got if name == "readiness" else {name: got})
                    except Exception as exc:  # noqa: BLE001 (reported; the other scenarios run)
                        traceback.print_exc()
                        failed.append(name)
                        scenarios[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
                        if name == "readiness":
                            scenarios["bytes"] = {"status": "failed with readiness"}
                    h.close()  # whatever a scenario left mounted
            finally:
                h.close()
            link_info = link.describe()
        if "nodes" in only:
            log("== scenario nodes")
            scenarios["nodes"] = nodes.run_all(params.quick, out_dir)
            failed += [n for n, r in scenarios["nodes"].items() if r["status"].startswith("failed")]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "meta": {
            "utc": args.stamp, "host": platform.node(), "kernel": platform.release(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "commit": _git_commit(),
            "note": args.note, "link": link_info, "image": image.description,
            "params": dataclasses.asdict(params), "seconds": round(time.monotonic() - started, 1),
            "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0],
            "failed": failed,
        },
        "scenarios": scenarios,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny inputs, one run (for CI)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default",
                    help="default: 1 Gbit/s, 2 ms round trip; wan: 100 Mbit/s, 30 ms")
    ap.add_argument("--mbit", type=float, help="link bandwidth in Mbit/s (overrides the profile)")
    ap.add_argument("--rtt-ms", type=float, help="round trip in ms (overrides the profile)")
    ap.add_argument("--runs", type=int, help="repetitions of each scenario (default 5, quick 1)")
    ap.add_argument("--only", help=f"comma-separated scenarios of: {', '.join([*SCENARIOS, 'nodes'])}")
    ap.add_argument("--out", type=Path, help="results directory (default bench/results/<UTC time>)")
    ap.add_argument("--note", default="", help="a line about the machine, kept in the results")
    ap.add_argument("--keep", action="store_true", help="leave the work directory behind")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so mounts, the origin and the network namespace go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        ap.error("needs root (FUSE mounts, chroot, network namespaces, drop_caches)")
    if args.only and (bad := set(args.only.split(",")) - set(SCENARIOS) - {"nodes"}):
        ap.error(f"unknown scenario(s): {', '.join(sorted(bad))}")
    if args.runs is not None and args.runs < 1:
        ap.error("--runs must be at least 1")
    args.stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    out_dir = args.out or ROOT / "bench" / "results" / args.stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_suite(args, out_dir)
    (out_dir / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = report.write(result, out_dir)
    print(summary)
    print(f"\n{out_dir}  ({result['meta']['seconds']}s)")
    if result["meta"]["failed"]:
        print(f"failed: {', '.join(result['meta']['failed'])}", file=sys.stderr)
        return 1
    return 0


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    return None


if __name__ == "__main__":
    raise SystemExit(main())
