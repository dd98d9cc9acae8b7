"""Scenario 3: the background prefetch against the link it runs over.

- time from ``lazyfs mount`` to ``prefetch complete`` for the whole image, as a rate of
  stored (compressed) bytes, the bytes that cross the link, against the link's nominal
  rate and against curl fetching the same chunk blobs one after another over the same link
  (what the link really carries, per-request round trips included);
- read latency of random 4 KiB reads (a fixed sample of the image's files and offsets):
  while the prefetch runs, against the same reads with no prefetch (each one a fetch), and
  against the same reads once the cache is complete (page cache dropped).
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from bench.context import Bench, fresh_cold, percentiles, sample_files, stats, timed_pread
from bench.harness import log, run, wait_complete
from blockindex.oci import Layout


def _blob_urls(b: Bench) -> tuple[list[str], int]:
    layout = Layout(b.image.images / b.image.lazy)
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    blobs = manifest["layers"][1:]  # the first layer is the index
    return [b.h.blob_url(b.image.lazy, x["digest"]) for x in blobs], sum(int(x["size"]) for x in blobs)


def scenario(b: Bench) -> dict[str, Any]:
    p = b.params
    urls, blob_bytes = _blob_urls(b)
    curl = ["curl", "-sSf"]
    for url in urls:
        curl += [url, "-o", "/dev/null"]
    sample = sample_files(b.image.rootfs, p.latency_reads)
    fill, fill_mounted, curls, link_bytes = [], [], [], []
    busy: list[float] = []
    idle: list[float] = []
    cached: list[float] = []
    total = 0
    for i in range(p.runs):
        log(f"prefetch run {i + 1}/{p.runs}")
        # to completion, nothing else reading
        cache = b.h.fresh("cache-prefetch")
        fresh_cold(b)
        rx0 = b.link.rx_bytes()
        t0 = time.perf_counter()
        mnt = b.h.mount(b.image.lazy, cache)
        t_mounted = time.perf_counter()
        st = wait_complete(b.h, mnt, timeout=3600, poll=0.02)
        t_done = time.perf_counter()
        link_bytes.append(float(b.link.rx_bytes() - rx0))
        total = st["prefetch"]["total_bytes"]
        # rates in stored (lz4) bytes, what crosses the link and what curl fetches below;
        # the prefetch's own total counts the chunks' uncompressed bytes
        fill.append(blob_bytes / (t_done - t0))
        fill_mounted.append(blob_bytes / (t_done - t_mounted))
        fresh_cold(b)
        cached += [timed_pread(mnt, path, off) for path, off in sample]
        b.h.umount(mnt)
        shutil.rmtree(cache)

        t = time.perf_counter()
        run(*curl, timeout=3600)
        curls.append(blob_bytes / (time.perf_counter() - t))

        # reads while the prefetch runs: only those that finished before it did count
        cache = b.h.fresh("cache-busy")
        fresh_cold(b)
        mnt = b.h.mount(b.image.lazy, cache)
        for path, off in sample:
            took = timed_pread(mnt, path, off)
            if b.h.status(mnt)["prefetch"]["complete"]:
                break
            busy.append(took)
        b.h.umount(mnt)
        shutil.rmtree(cache)

        cache = b.h.fresh("cache-idle")
        fresh_cold(b)
        mnt = b.h.mount(b.image.lazy, cache, "--no-prefetch")
        idle += [timed_pread(mnt, path, off) for path, off in sample]
        b.h.umount(mnt)
        shutil.rmtree(cache)

    nominal = b.link.profile.bytes_per_s
    out: dict[str, Any] = {
        "image_uncompressed_bytes": total, "blob_bytes": blob_bytes, "blobs": len(urls),
        "rates_in": "stored bytes (the chunk blobs, as on the wire) per second",
        "link_nominal_bytes_per_s": nominal,
        "fill_bytes_per_s": stats(fill), "fill_from_mounted_bytes_per_s": stats(fill_mounted),
        "curl_bytes_per_s": stats(curls), "link_bytes": stats(link_bytes),
        "read_latency_s": {
            "while_prefetching": percentiles(busy) if busy else {"status": "prefetch finished first"},
            "idle_no_prefetch": percentiles(idle),
            "cache_complete": percentiles(cached),
        },
    }
    med = out["fill_bytes_per_s"]["median"]
    out["ratios"] = {"fill_vs_link": med / nominal,
                     "fill_vs_curl": med / out["curl_bytes_per_s"]["median"],
                     "curl_vs_link": out["curl_bytes_per_s"]["median"] / nominal}
    if busy:
        lat = out["read_latency_s"]
        for pct in ("p50", "p99"):
            out["ratios"][f"busy_{pct}_vs_idle_{pct}"] = (lat["while_prefetching"][pct]
                                                         / lat["idle_no_prefetch"][pct])
    return out
