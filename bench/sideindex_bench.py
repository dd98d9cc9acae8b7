#!/usr/bin/env python3
"""The side index benchmark: an ordinary gzip image started lazily through its side index
(``lazyfs index``), side by side in one run with the same image converted to lazyfs format
and with a full pull, and the same figures over the checkpoint spacing.

The image is the suite's Debian image (``bench/image.py``: minbase + python3 +
python3-numpy, three gzip -6 layers), or with ``--quick`` this machine's python3 as a
two-layer image. A Debian ``docker-registry`` on loopback holds it as it is, once per
spacing (``side-<spacing>:1``, e.g. ``side-512k:1``, each with its side index attached by ``lazyfs index
--spacing``), and its lazyfs conversion (``lazy:1``); both are copied in from the cached
OCI layouts by skopeo. Measured, each run taking every case in turn:

size    each side index against the image's gzip layers (goal: at most 2%).
build   ``build_side_index`` on the image's OCI layout, in this process, against one
        ``gzip -dc`` of its layers (goal: at most 1.5x); zlib's inflate of the layers in
        this process is recorded beside it, the floor of any reader of gzip. The layers
        are read once before either is timed. ``index_command_s`` is ``lazyfs index``
        as a user runs it (pull from the registry, build, attach), once per spacing.
cold    ``lazyfs mount --no-prefetch`` into an empty cache + ``chroot MNT python3 -c
        PROGRAM`` (``registry_bench.lazy_run``) of the side-indexed image at each spacing
        and of the lazyfs image, and a full pull (skopeo copy + umoci unpack + the program,
        ``registry_bench.full_run``): seconds, and the bytes the registry sent (its access
        log: manifests, the side index or index, the chunk ranges). Goals at the default
        spacing: within 1.3x the lazyfs image's time and at most 2x its bytes. The same
        tree as a one-layer eStargz image (``bench.image.estargz_cached``, 4 MiB chunks),
        mounted with no side index, is the table's eStargz row.

Seconds are medians over the runs; each ratio is one of medians of this run. The page
cache is dropped before each cold start (not with ``--quick``, which keeps it, as the
other benchmarks' quick modes do). The load average is recorded before and after: the
machine may be shared.

    bench/sideindex_bench.py [--quick] [--runs N] [--spacings 512K,1M,2M,4M,8M] [--out DIR]
    from bench.sideindex_bench import run; run(quick=True, outdir=Path(...)) -> dict

Writes ``sideindex.json`` and ``sideindex.md`` to ``bench/results/<UTC date-time>/`` (or
``DIR``). Needs root (FUSE, chroot), docker-registry, skopeo and umoci (``tests/setup.sh``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import registry_bench  # noqa: E402
from bench.harness import log, stats  # noqa: E402
from bench.image import ESTARGZ_CHUNK, debian_image, estargz_cached, quick_image  # noqa: E402
from blockindex.format import DEFAULT_CHUNK_SIZE  # noqa: E402
from blockindex.oci import Layout  # noqa: E402
from blockindex.sideindex import DEFAULT_SPACING, MAX_SPACING, MIN_SPACING, build_side_index  # noqa: E402
from lazyfs.cli.common import human, size  # noqa: E402
from testkit.registryd import Registry  # noqa: E402

SPACINGS = (512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20)
QUICK_SPACINGS = (512 << 10, 2 << 20)
GOALS = {
    "index_vs_layers": 0.02,
    "build_vs_gunzip": 1.5,
    "cold_time_vs_lazy": 1.3,
    "cold_bytes_vs_lazy": 2.0,
}
"""Upper bounds, checked at the default spacing."""


def label(spacing: int) -> str:
    return f"{spacing >> 20}M" if spacing % (1 << 20) == 0 else f"{spacing >> 10}K"


def _repo(spacing: int) -> str:
    """The registry repository of the image indexed at ``spacing`` (names are lower case)."""
    return f"side-{label(spacing).lower()}"


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _gunzip(layers: list[Path]) -> None:
    for path in layers:
        with open(path, "rb") as f:
            subprocess.run(["gzip", "-dc"], stdin=f, stdout=subprocess.DEVNULL, check=True, timeout=600)


def _inflate(layers: list[Path]) -> None:
    for path in layers:
        d = zlib.decompressobj(wbits=31)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                d.decompress(block)


def _read(layers: list[Path]) -> None:
    for path in layers:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def _median(figures: dict[str, Any], key: str) -> float:
    return float(figures[key]["median"])


def _figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: stats([r[key] for r in results]) for key in results[0]}


def run(quick: bool, outdir: Path, runs: int | None = None,
        spacings: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run the benchmark; write ``outdir/sideindex.json`` and ``sideindex.md`` and return
    what the JSON holds."""
    runs = runs or (1 if quick else 3)
    spacings = tuple(sorted(set(spacings or (QUICK_SPACINGS if quick else SPACINGS))))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="lazyfs-sidebench-", dir="/var/tmp"))
    # the push record (fetcher/blobrepos.py) of this run's throwaway registry stays in `work`
    registry_bench.ENV["XDG_STATE_HOME"] = str(work / "state")
    registry = None
    try:
        image = quick_image(work) if quick else debian_image()
        layout_dir = image.images / image.pull
        manifest_digest = Layout(layout_dir).resolve("1")["digest"]
        layer_paths = [image.layer_path(layer) for layer in image.layers]
        registry = Registry(work, name="registry")
        served = registry_bench.Served(registry)
        host = registry.host
        log(f"sideindex: {image.description} into {host}")
        registry.skopeo_copy(f"oci:{image.images / image.lazy}:1", "lazy:1")
        registry.skopeo_copy(f"oci:{image.images / estargz_cached(image)}:1", "estargz:1")
        index_command_s: dict[int, float] = {}
        for spacing in spacings:
            registry.skopeo_copy(f"oci:{layout_dir}:1", f"{_repo(spacing)}:1")
            index_command_s[spacing] = _timed(lambda s=spacing: registry_bench.lazyfs(
                "index", f"docker://{host}/{_repo(s)}:1", "--spacing", str(s)))
        built: dict[int, Any] = {}
        build_s: dict[int, list[float]] = {s: [] for s in spacings}
        gunzip_s: list[float] = []
        inflate_s: list[float] = []
        cold: dict[str, list[dict[str, Any]]] = {"lazy": [], "estargz": [],
                                                 **{label(s): [] for s in spacings}}
        full: list[dict[str, Any]] = []
        for n in range(runs):  # interleaved, so drift on a shared machine hits every case alike
            log(f"sideindex: run {n + 1}/{runs}: build against gunzip")
            _read(layer_paths)
            gunzip_s.append(_timed(lambda: _gunzip(layer_paths)))
            inflate_s.append(_timed(lambda: _inflate(layer_paths)))
            for spacing in spacings:
                out = work / f"side-{label(spacing)}.sqlite"
                out.unlink(missing_ok=True)
                t = time.perf_counter()
                built[spacing] = build_side_index(layout_dir, manifest_digest, out,
                                                  chunk_size=DEFAULT_CHUNK_SIZE, spacing=spacing)
                build_s[spacing].append(time.perf_counter() - t)
            log(f"sideindex: run {n + 1}/{runs}: cold starts")
            cold["lazy"].append(registry_bench.lazy_run(f"{host}/lazy:1", served, work, f"lazy-{n}", quick))
            cold["estargz"].append(registry_bench.lazy_run(f"{host}/estargz:1", served, work,
                                                           f"estargz-{n}", quick))
            for spacing in spacings:
                name = label(spacing)
                cold[name].append(registry_bench.lazy_run(f"{host}/{_repo(spacing)}:1", served, work,
                                                          f"side-{name}-{n}", quick))
            full.append(registry_bench.full_run(f"{host}/{_repo(spacings[0])}:1", served, work,
                                                f"full-{n}", quick))
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)

    lazy, full_pull, esgz = _figures(cold["lazy"]), _figures(full), _figures(cold["estargz"])
    gunzip, inflate = stats(gunzip_s), stats(inflate_s)
    layer_bytes = sum(layer["size"] for layer in image.layers)
    rows = []
    for spacing in spacings:
        b, c, b_s = built[spacing], _figures(cold[label(spacing)]), stats(build_s[spacing])
        rows.append({
            "spacing": spacing, "label": label(spacing),
            "index_bytes": b.index_bytes, "index_vs_layers": b.index_bytes / layer_bytes,
            "checkpoints": b.checkpoints, "chunks": b.chunks,
            "build_s": b_s,
            "build_vs_gunzip": b_s["median"] / gunzip["median"],
            "build_vs_inflate": b_s["median"] / inflate["median"],
            "index_command_s": index_command_s[spacing],
            "cold": c,
            "cold_time_vs_lazy": _median(c, "total_s") / _median(lazy, "total_s"),
            "cold_bytes_vs_lazy": _median(c, "bytes") / _median(lazy, "bytes"),
            "cold_time_vs_full": _median(c, "total_s") / _median(full_pull, "total_s"),
            "cold_bytes_vs_full": _median(c, "bytes") / _median(full_pull, "bytes"),
        })
    at = next((r for r in rows if r["spacing"] == DEFAULT_SPACING), rows[0])
    result = {
        "benchmark": "sideindex",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]},
        "quick": quick,
        "runs": runs,
        "program": f"chroot ROOTFS {registry_bench.PYTHON} -c {registry_bench.PROGRAM!r}",
        "image": {"description": image.description, "layers": len(image.layers), "layer_bytes": layer_bytes,
                  "files": built[at["spacing"]].files,
                  "file_bytes": built[at["spacing"]].image_bytes},
        "baseline": {"gunzip_s": gunzip, "inflate_s": inflate},
        "lazy": lazy,
        "full_pull": full_pull,
        "estargz": {"cold": esgz, "chunk_size": ESTARGZ_CHUNK,
                    "cold_time_vs_lazy": _median(esgz, "total_s") / _median(lazy, "total_s"),
                    "cold_bytes_vs_lazy": _median(esgz, "bytes") / _median(lazy, "bytes"),
                    "cold_time_vs_full": _median(esgz, "total_s") / _median(full_pull, "total_s"),
                    "cold_bytes_vs_full": _median(esgz, "bytes") / _median(full_pull, "bytes")},
        "spacings": rows,
        "goals": {"spacing": at["spacing"], **{k: {"value": at[k], "at_most": bound, "met": at[k] <= bound}
                                              for k, bound in GOALS.items()}},
    }
    (outdir / "sideindex.json").write_text(json.dumps(result, indent=2) + "\n")
    (outdir / "sideindex.md").write_text(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    """The results as the README shows them: one table, then the goals."""
    mib = 1 << 20
    img = r["image"]
    host = r["host"]
    lines = [
        f"Side index benchmark, {r['runs']} run(s){' (quick)' if r['quick'] else ''}, {r['when']}: "
        f"{img['description']}; {human(img['layer_bytes'])} of gzip layers, "
        f"{human(img['file_bytes'])} in {img['files']} files. Cold start: `{r['program']}`, medians; "
        f"load average {host['loadavg_1m_before']:.1f} before, {host['loadavg_1m_after']:.1f} after "
        f"({host['cpus']} CPUs).",
        "",
        "| image | index | of layers | checkpoints | build | build / gunzip | cold start | vs lazyfs | "
        "bytes | vs lazyfs | vs full pull (time, bytes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lazy, full = r["lazy"], r["full_pull"]
    for row in r["spacings"]:
        c = row["cold"]
        lines.append(
            f"| side index, {row['label']} | {human(row['index_bytes'])} | "
            f"{100 * row['index_vs_layers']:.2f}% | "
            f"{row['checkpoints']} | {row['build_s']['median']:.2f} s | {row['build_vs_gunzip']:.2f}x | "
            f"{c['total_s']['median']:.2f} s | {row['cold_time_vs_lazy']:.2f}x | "
            f"{c['bytes']['median'] / mib:.1f} MiB | {row['cold_bytes_vs_lazy']:.2f}x | "
            f"{row['cold_time_vs_full']:.2f}x, {row['cold_bytes_vs_full']:.2f}x |")
    e = r["estargz"]
    lines.append(f"| eStargz, no side index ({e['chunk_size'] >> 20} MiB chunks) | | | | | | "
                 f"{e['cold']['total_s']['median']:.2f} s | {e['cold_time_vs_lazy']:.2f}x | "
                 f"{e['cold']['bytes']['median'] / mib:.1f} MiB | {e['cold_bytes_vs_lazy']:.2f}x | "
                 f"{e['cold_time_vs_full']:.2f}x, {e['cold_bytes_vs_full']:.2f}x |")
    lines.append(f"| lazyfs format | | | | | | {lazy['total_s']['median']:.2f} s | 1 | "
                 f"{lazy['bytes']['median'] / mib:.1f} MiB | 1 | "
                 f"{lazy['total_s']['median'] / full['total_s']['median']:.2f}x, "
                 f"{lazy['bytes']['median'] / full['bytes']['median']:.2f}x |")
    lines.append(f"| full pull (skopeo + umoci) | | | | | | {full['total_s']['median']:.2f} s | | "
                 f"{full['bytes']['median'] / mib:.1f} MiB | | 1 |")
    b = r["baseline"]
    commands = ", ".join(f"{row['label']} {row['index_command_s']:.1f} s" for row in r["spacings"])
    lines += ["", f"One `gzip -dc` of the layers: {b['gunzip_s']['median']:.2f} s; zlib's inflate in "
              f"Python: {b['inflate_s']['median']:.2f} s. `lazyfs index` as a user runs it (pull, build, "
              f"attach): {commands}.",
              "", f"Goals at {label(r['goals']['spacing'])} spacing:", ""]
    for key, goal in r["goals"].items():
        if key != "spacing":
            lines.append(f"- {key}: {goal['value']:.3f} (at most {goal['at_most']}): "
                         f"{'met' if goal['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def _spacings(text: str) -> tuple[int, ...]:
    out = tuple(size(s) for s in text.split(","))
    if not all(MIN_SPACING <= s <= MAX_SPACING for s in out):
        raise argparse.ArgumentTypeError(f"spacings must be from 64K to 1G, not {text}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small image, one run, page cache kept: for CI")
    ap.add_argument("--runs", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--spacings", type=_spacings,
                    help="checkpoint spacings, comma-separated (default 512K,1M,2M,4M,8M; quick 512K,2M)")
    ap.add_argument("--out", type=Path,
                    help="directory for the results (default bench/results/<UTC date-time>/)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (FUSE mounts, chroot, drop_caches)")
    if args.runs is not None and args.runs < 1:
        ap.error("--runs must be at least 1")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    out = args.out or ROOT / "bench" / "results" / stamp
    result = run(args.quick, out, args.runs, args.spacings)
    print(markdown(result))
    print(f"results: {out / 'sideindex.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
