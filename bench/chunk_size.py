"""Where the bytes fetched before readiness come from: the chunk size and the mount's
readahead, against what the program itself reads.

    python3 bench/chunk_size.py [--quick] [--runs N] [--out DIR]
    run(quick, outdir) -> dict

The suite's image rootfs (``bench/image.py``; ``--quick``: this machine's python3) is
converted with 1 MiB (the default), 512 KiB and 256 KiB chunks; each is served by
``lazyfs serve`` on loopback and mounted cold (``--no-prefetch``), and ``PROGRAM`` runs in
a chroot. For each chunk size and readahead (1024 KiB, what a mount sets; 128 KiB, the
kernel's default for FUSE; 32 KiB; ``--quick``: 1 MiB and 256 KiB chunks, 1024 and 32 KiB
readahead) it reports, as medians of ``--runs``: bytes received,
range requests, chunks fetched, the bytes the program read through the mount (FUSE
reads: what the kernel asked for, readahead included), and seconds to run the program.
Loopback: the seconds say little about a real link; the bytes are the point.
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
from lazyfs import mountinfo  # noqa: E402
from lazyfs.mountinfo import STATUS_XATTR  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402

CHUNK_SIZES = ("1M", "512K", "256K")
READAHEAD_KIB = (1024, 128, 32)
QUICK_CHUNK_SIZES = ("1M", "256K")
QUICK_READAHEAD_KIB = (1024, 32)
"""``--quick`` (CI) measures only the ends of each range: four mounts of two conversions,
not nine of three; the comparisons a smoke test can make hold between the ends."""


def _one(images: Path, mnt: Path, cache: Path, readahead: int) -> dict[str, Any]:
    shutil.rmtree(cache, ignore_errors=True)
    with make_server(images, "127.0.0.1", 0) as server:
        lazyfs("mount", f"127.0.0.1:{server.port}/img:1", str(mnt), "--cache", str(cache),
               "--no-prefetch", "--record-window", "0")
        try:
            entry = mountinfo.find(mnt)
            assert entry is not None
            for _ in range(50):  # the mount raises its readahead once INIT is answered: then set ours
                if mountinfo.readahead_path(entry).read_text().strip() == "1024":
                    break
                time.sleep(0.02)
            if not mountinfo.set_readahead(entry, readahead):
                raise RuntimeError(f"cannot set the readahead of {mnt} to {readahead} KiB")
            started = time.monotonic()
            subprocess.run(["chroot", str(mnt), PYTHON, "-c", PROGRAM], check=True, capture_output=True)
            seconds = time.monotonic() - started
            st = json.loads(os.getxattr(mnt, STATUS_XATTR))
        finally:
            lazyfs("umount", str(mnt))
    return {"seconds": seconds, "bytes_received": st["fetch"]["bytes_received"],
            "requests": st["fetch"]["requests"], "chunks_fetched": st["fetch"]["chunks_fetched"],
            "fuse_read_bytes": st["reads"]["bytes_read"], "fuse_reads": st["reads"]["reads"]}


def run(quick: bool, outdir: Path, *, runs: int | None = None) -> dict[str, Any]:
    """Measure, write ``outdir/chunk_size.json`` and return its contents."""
    from bench.image import debian_image, quick_image

    runs = runs or (1 if quick else 3)
    sizes, readaheads = (QUICK_CHUNK_SIZES, QUICK_READAHEAD_KIB) if quick else (CHUNK_SIZES, READAHEAD_KIB)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-chunksize-"))
    try:
        image = quick_image(work) if quick else debian_image()
        rootfs = image.rootfs if image.rootfs.is_dir() else None
        if rootfs is None:  # the quick image has no rootfs directory: convert its gzip layout
            source = f"oci:{image.images / image.pull}:1"
        else:
            source = f"dir:{rootfs}"
        mnt = work / "mnt"
        mnt.mkdir()
        rows = []
        image_bytes = None
        for size in sizes:
            images = work / f"images-{size}"
            out = lazyfs("convert", source, f"oci:{images / 'img'}:1", "--chunk-size", size).stdout
            log(f"chunk_size: {size}: {out.splitlines()[0]}")
            for readahead in readaheads:
                samples = [_one(images, mnt, work / "cache", readahead) for _ in range(runs)]
                row = {"chunk_size": size, "readahead_kib": readahead,
                       **{k: statistics.median(s[k] for s in samples) for k in samples[0]}}
                rows.append(row)
                log(f"chunk_size: {size}, readahead {readahead} KiB: "
                    f"{row['bytes_received'] / 2**20:.1f} MiB received in {row['requests']:g} requests, "
                    f"the program read {row['fuse_read_bytes'] / 2**20:.1f} MiB, {row['seconds']:.2f} s")
            stored = sum(p.stat().st_size for p in (images / "img" / "blobs" / "sha256").iterdir())
            image_bytes = image_bytes or stored
        report = {"image": image.description, "program": PROGRAM, "runs": runs,
                  "chunk_sizes": list(sizes), "readaheads_kib": list(readaheads),
                  "stored_bytes_1M": image_bytes, "rows": rows}
        (outdir / "chunk_size.json").write_text(json.dumps(report, indent=1) + "\n")
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
        print(f"{r['chunk_size']:>5} readahead {r['readahead_kib']:>4} KiB: "
              f"{r['bytes_received'] / 2**20:5.1f} MiB received, {r['requests']:4g} requests, "
              f"{r['chunks_fetched']:4g} chunks; program read {r['fuse_read_bytes'] / 2**20:5.1f} MiB "
              f"in {r['fuse_reads']:g} FUSE reads; {r['seconds']:.2f} s")
    print(f"written to {args.out / 'chunk_size.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
