"""The amplification window (``lazyfs mount --amplify``) against the bytes a cold start
needs and the requests a cold walk of the whole tree makes.

    python3 bench/amplify.py [--quick] [--runs N] [--out DIR]
    run(quick, outdir) -> dict

The suite's image (``bench/image.py``; ``--quick``: this machine's python3) is served by
``lazyfs serve`` on loopback and mounted cold (a fresh cache, ``--no-prefetch``) once per
window and task, the windows taken turn about within each run: ``start`` runs ``PROGRAM``
in a chroot; ``tar`` reads every file (``tar -cf - . | wc -c``). For each it reports, as
medians of ``--runs``: bytes received, range requests, chunks that came as neighbours,
seconds, and for ``start`` the bytes as a ratio of window 0's, for ``tar`` the image's
stored bytes per request. Loopback on a loaded machine: the seconds say little; the bytes
and requests are the point. The default window is the largest whose start stays within
``START_LIMIT`` of window 0's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
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

from bench.harness import PROGRAM, PYTHON, lazyfs, log  # noqa: E402
from lazyfs.mountinfo import STATUS_XATTR  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402

WINDOWS = (0, 256 << 10, 512 << 10, 1 << 20, 2 << 20)
START_LIMIT = 1.3
"""A window may cost the cold start at most this many times window 0's bytes."""


def _task(task: str, mnt: Path) -> None:
    if task == "start":
        subprocess.run(["chroot", str(mnt), PYTHON, "-c", PROGRAM], check=True, capture_output=True)
    else:
        subprocess.run(["bash", "-o", "pipefail", "-c", f"tar -C '{mnt}' -cf - . | wc -c"],
                       check=True, capture_output=True)


def _one(ref: str, mnt: Path, cache: Path, window: int, task: str) -> dict[str, float]:
    shutil.rmtree(cache, ignore_errors=True)
    lazyfs("mount", ref, str(mnt), "--cache", str(cache), "--no-prefetch", "--record-window", "0",
           "--amplify", str(window))
    try:
        started = time.monotonic()
        _task(task, mnt)
        seconds = time.monotonic() - started
        st = json.loads(os.getxattr(mnt, STATUS_XATTR))
    finally:
        lazyfs("umount", str(mnt))
    f = st["fetch"]
    return {"seconds": seconds, "bytes_received": f["bytes_received"], "requests": f["requests"],
            "neighbours": f.get("neighbours", 0), "chunks_fetched": f["chunks_fetched"]}


def run(quick: bool, outdir: Path, *, runs: int | None = None) -> dict[str, Any]:
    """Measure, write ``outdir/amplify.json`` and return its contents."""
    from bench.image import debian_image, quick_image

    runs = runs or (3 if quick else 5)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-amplify-"))
    try:
        image = quick_image(work) if quick else debian_image()
        mnt = work / "mnt"
        mnt.mkdir()
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        with make_server(image.images, "127.0.0.1", 0) as server:
            ref = f"127.0.0.1:{server.port}/{image.lazy}:1"
            for i in range(runs):
                for task in ("start", "tar"):
                    for window in WINDOWS:
                        s = _one(ref, mnt, work / "cache", window, task)
                        samples.setdefault((task, window), []).append(s)
                        log(f"amplify run {i + 1}/{runs}: {task}, window {window >> 10} KiB: "
                            f"{s['bytes_received'] / 2**20:.2f} MiB in {s['requests']:g} requests, "
                            f"{s['seconds']:.2f} s")
        blobs = image.images / image.lazy / "blobs" / "sha256"
        stored = sum(p.stat().st_size for p in blobs.iterdir())
        rows = []
        for (task, window), ss in samples.items():
            row: dict[str, Any] = {"task": task, "window": window,
                                   **{k: statistics.median(s[k] for s in ss) for k in ss[0]},
                                   "seconds_runs": [s["seconds"] for s in ss]}
            rows.append(row)
        base = {r["task"]: r for r in rows if r["window"] == 0}
        for r in rows:
            if r["task"] == "start":
                r["bytes_vs_window_0"] = r["bytes_received"] / base["start"]["bytes_received"]
            else:
                r["stored_bytes_per_request"] = stored / max(r["requests"], 1)
                r["seconds_vs_window_0"] = r["seconds"] / base["tar"]["seconds"]
        fit = [r["window"] for r in rows if r["task"] == "start" and r["bytes_vs_window_0"] <= START_LIMIT]
        report = {"image": image.description, "program": PROGRAM, "runs": runs,
                  "image_stored_bytes": stored, "start_limit": START_LIMIT,
                  "largest_window_within_start_limit": max(fit), "rows": rows}
        (outdir / "amplify.json").write_text(json.dumps(report, indent=1) + "\n")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / time.strftime(
        "%Y-%m-%dT%H-%M-%SZ", time.gmtime()))
    args = ap.parse_args(argv)
    report = run(args.quick, args.out, runs=args.runs)
    for r in report["rows"]:
        extra = (f"{r['bytes_vs_window_0']:.2f}x window 0's bytes" if r["task"] == "start"
                 else f"{r['stored_bytes_per_request'] / 1024:.0f} KiB of image per request")
        print(f"{r['task']:>5} window {r['window'] >> 10:>5} KiB: {r['bytes_received'] / 2**20:6.2f} MiB "
              f"in {r['requests']:5g} requests ({r['neighbours']:g} neighbours), "
              f"{r['seconds']:.2f} s; {extra}")
    print(f"largest window within {START_LIMIT}x of window 0's start bytes: "
          f"{report['largest_window_within_start_limit'] >> 10} KiB")
    print(f"written to {args.out / 'amplify.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
