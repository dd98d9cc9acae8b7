"""Scenarios 1 and 2: readiness and the bytes it costs.

Readiness is the time from "start" (``lazyfs mount`` invoked, or the first layer's
download begun) until ``sh -c 'echo hi'`` and then ``python3 -c 'import json, sqlite3,
ssl'`` have run inside the image with ``chroot``, with the page cache dropped first. Modes,
taken turn about within each run so that every ratio compares figures of the same run:

- ``full_pull``: each gzip layer downloaded from the origin's web server and unpacked
  (``curl | tar -xz``, download and unpacking overlapping per layer, as a pull does);
- ``lazy_cold``: a fresh cache, ``--no-prefetch``: only what the programs read is fetched;
- ``lazy_cold_prefetch``: a fresh cache with the default background prefetch competing;
- ``lazy_recorded``: a fresh cache holding only the order recorded by one earlier mount
  (``lazyfs mount --record``), with the default prefetch, which fetches that order first;
- ``lazy_warm``: a complete cache (fresh mount, page cache dropped);
- ``lazy_warm_mounted``: a complete cache, the image mounted already (page cache dropped):
  the second container of an image on a node, whose mount the snapshotter shares, and the
  price of the FUSE read path alone;
- ``local_disk``: the image's tree on local disk.

Bytes are what crossed the link (the veth's receive counter, headers included) from start
to readiness, and lazyfs's own count of chunk bytes from the origin.
"""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

from bench.context import PY, SH, Bench, chroot, fresh_cold, run_programs, stats
from bench.harness import lazyfs, log, run


def recorded_available() -> str | None:
    """None when ``lazyfs mount`` can record a prefetch order, else why not."""
    text = lazyfs("mount", "--help").stdout
    if "--record" not in text:
        return "not available: `lazyfs mount` on this commit has no --record (learned prefetch)"
    return None


def _lazy(b: Bench, cache, *extra: str) -> dict[str, float]:
    fresh_cold(b)
    rx0 = b.link.rx_bytes()
    t0 = time.perf_counter()
    mnt = b.h.mount(b.image.lazy, cache, *extra)
    t_mount = time.perf_counter() - t0
    out = run_programs(mnt, t0)
    out["link_bytes"] = b.link.rx_bytes() - rx0
    st = b.h.status(mnt)
    out["mount_s"] = t_mount
    out["origin_bytes"] = st["bytes_by_source"].get("origin", 0)
    out["stored_bytes"] = st["image"]["stored_bytes"]
    b.h.umount(mnt)
    return out


def _full_pull(b: Bench) -> dict[str, float]:
    root = b.h.fresh("pulled")
    fresh_cold(b)
    rx0 = b.link.rx_bytes()
    t0 = time.perf_counter()
    for layer in b.image.layers:
        url = b.files_url(f"blobs/{layer['digest'].split(':', 1)[1]}")
        run("bash", "-o", "pipefail", "-c",
            f"curl -sSf '{url}' | tar -xzf - -C '{root}' --numeric-owner", timeout=1800)
    out = {"pull_s": time.perf_counter() - t0}
    out.update(run_programs(root, t0))
    out["link_bytes"] = b.link.rx_bytes() - rx0
    shutil.rmtree(root)
    return out


def _mounted(b: Bench, mnt) -> dict[str, float]:
    fresh_cold(b)
    return run_programs(mnt, time.perf_counter())


def _local(b: Bench) -> dict[str, float]:
    fresh_cold(b)
    return run_programs(b.image.rootfs, time.perf_counter())


def _recorded(b: Bench) -> dict[str, float]:
    """Record the programs' reads on one mount, then start cold with that order."""
    cache = b.h.fresh("cache-record")
    mnt = b.h.mount(b.image.lazy, cache, "--no-prefetch", "--record")
    chroot(mnt, SH)
    chroot(mnt, PY)
    b.h.umount(mnt)
    # A node gets the learned order from its own cache or from the registry (`lazyfs trace
    # push` attaches it as a referrer); here the trace alone is carried to a fresh cache.
    fresh = b.h.fresh("cache-recorded")
    fresh.chmod(0o700)  # a cache as lazyfs makes one: an open directory holding only traces is refused
    shutil.copytree(cache / "traces", fresh / "traces")
    out = _lazy(b, fresh)
    shutil.rmtree(cache)
    return out


def scenario(b: Bench) -> dict[str, Any]:
    p = b.params
    log("readiness: filling a warm cache")
    warm = b.h.warm_cache(b.image.lazy)
    recorded_why = recorded_available()
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in (
        "full_pull", "lazy_cold", "lazy_cold_prefetch", "lazy_warm", "lazy_warm_mounted", "local_disk")}
    if recorded_why is None:
        rows["lazy_recorded"] = []
    mounted = b.h.mount(b.image.lazy, warm, "--no-prefetch")
    for i in range(p.runs):
        log(f"readiness run {i + 1}/{p.runs}")
        rows["full_pull"].append(_full_pull(b))
        rows["lazy_cold"].append(_lazy(b, b.h.fresh("cache-cold"), "--no-prefetch"))
        rows["lazy_cold_prefetch"].append(_lazy(b, b.h.fresh("cache-cold")))
        if "lazy_recorded" in rows:
            rows["lazy_recorded"].append(_recorded(b))
        rows["lazy_warm"].append(_lazy(b, warm, "--no-prefetch"))
        rows["lazy_warm_mounted"].append(_mounted(b, mounted))
        rows["local_disk"].append(_local(b))
    b.h.umount(mounted)
    modes: dict[str, Any] = {}
    for mode, runs in rows.items():
        modes[mode] = {k: stats([float(r[k]) for r in runs]) for k in runs[0]}
    if recorded_why is not None:
        modes["lazy_recorded"] = {"status": recorded_why}
    med = {m: {k: v["median"] for k, v in d.items() if isinstance(v, dict)} for m, d in modes.items()}
    ratios = {
        "cold_vs_full_pull": med["lazy_cold"]["python_s"] / med["full_pull"]["python_s"],
        "cold_sh_vs_full_pull": med["lazy_cold"]["sh_s"] / med["full_pull"]["sh_s"],
        "cold_prefetch_vs_full_pull": med["lazy_cold_prefetch"]["python_s"]
        / med["full_pull"]["python_s"],
        "warm_vs_local_disk": med["lazy_warm"]["python_s"] / med["local_disk"]["python_s"],
        "warm_minus_local_disk_s": med["lazy_warm"]["python_s"] - med["local_disk"]["python_s"],
        "warm_mounted_vs_local_disk": med["lazy_warm_mounted"]["python_s"] / med["local_disk"]["python_s"],
        "mount_s": med["lazy_warm"]["mount_s"],
    }
    if "python_s" in med.get("lazy_recorded", {}):
        ratios["recorded_vs_full_pull"] = med["lazy_recorded"]["python_s"] / med["full_pull"]["python_s"]
    readiness = {"programs": [" ".join(SH), " ".join(PY)], "modes": modes, "ratios": ratios,
                 "image": b.image.description}

    gzip_bytes = sum(int(layer["size"]) for layer in b.image.layers)
    stored = rows["lazy_cold"][0]["stored_bytes"]
    origin = statistics.median(r["origin_bytes"] for r in rows["lazy_cold"])
    link = statistics.median(r["link_bytes"] for r in rows["lazy_cold"])
    file_bytes = _tree_bytes(b)
    bytes_out = {
        "lazy_cold_origin_bytes": stats([float(r["origin_bytes"]) for r in rows["lazy_cold"]]),
        "link_bytes": {m: stats([float(r["link_bytes"]) for r in runs])
                       for m, runs in rows.items() if "link_bytes" in runs[0]},
        "image_stored_bytes": stored, "gzip_layers_bytes": gzip_bytes,
        "image_file_bytes": file_bytes,
        "ratios": {"cold_origin_vs_stored": origin / stored,
                   "cold_link_vs_stored": link / stored,
                   "cold_link_vs_full_pull_link": link
                   / statistics.median(r["link_bytes"] for r in rows["full_pull"]),
                   "cold_origin_vs_file_bytes": origin / file_bytes},
    }
    shutil.rmtree(warm)
    return {"readiness": readiness, "bytes": bytes_out}


def _tree_bytes(b: Bench) -> int:
    total = 0
    for path in b.image.rootfs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.lstat().st_size
    return total
