"""The snapshotter benchmark (issue 5): pull plus run of one program through containerd,
lazily with the lazyfs snapshotter against a full pull with containerd's overlayfs
snapshotter, on the same machine from the same registry.

    lazy        ``lazyfs pull REF`` (manifest, config and index only) then ``ctr run
                --snapshotter lazyfs REF python3 -c PROGRAM``: the program's chunks are
                fetched as it reads them. The snapshotter runs with ``--no-prefetch``, so the
                bytes are what the program needed, not what a background fill adds.
    full_pull   ``ctr image pull --snapshotter overlayfs REF`` (every gzip layer downloaded
                and unpacked) then ``ctr run --snapshotter overlayfs REF python3 -c PROGRAM``.

Both sides run the same image (``--image``), the lazy one converted by lazyfs, the ordinary
one as gzip -6 layers with its own config:

    debian      the suite's image (``bench/image.py``): Debian minbase + python3 +
                python3-numpy, three layers, about 256 MiB of files; the default.
    python      this machine's python3 and its libraries (``tests/imagegen.py``, with .pyc
                files), about 25 MiB: what ``--quick`` runs, so that CI stays short.

Every measurement starts a fresh containerd (and snapshotter) with empty roots and
a dropped page cache, so each pull is cold; the modes take turns within each run. Seconds
are medians over the runs; bytes are what the registry (``lazyfs serve``, in this process)
sent during the pull and the run, from its access log.

    python3 bench/snapshotter_bench.py [--quick] [--image debian|python] [--runs N] [--out DIR]

Then, in each run, the figures of an image once it is there (``bench/snapshotter_reads.py``):

    lazy        ``lazyfs pull --snapshotter-address``: the pull a node makes, handed to the
                running snapshotter (grpc and the registry client loaded there).
    pull steps  in the first run only (mode ``lazy_in_process``): the pull made in the
                ``lazyfs pull`` process itself, as with no snapshotter socket, split into its
                steps (``bench/pull_phases.py``): interpreter, imports, registry,
                containerd's content store, the snapshot prepare and its parts, exit.
    complete    the lazy image filled by the snapshotter's prefetch, then ``tar -c`` of
                ``/usr`` and of the whole tree through lazyfs, overlayfs (the full pull's
                snapshot) and memfs (the same tree served from memory by pyfuse3); random
                4 KiB reads through lazyfs and overlayfs; the PSS of 1, 5 and 20 mounted
                images (distinct images of the same files, sharing their blobs on disk)
                and of a mount that has served the whole image.
    cold        ``lazyfs mount --no-prefetch`` into an empty cache and ``tar -c`` of the
                whole tree, with the registry's requests and bytes, against the full pull.

Ratios are taken within one run, then their median over the runs is reported; ``goals``
says which of the targets (``snapshotter_goals.GOALS``) each figure meets, beside what
stargz-snapshotter reached in an earlier side-by-side run (``snapshotter_goals.STARGZ``,
not measured here). The load average is recorded before, at the start of each run and
after: the machine may be shared.

``run(quick, outdir, image=None)`` is the entry point for a suite. Results go to
``bench/results/<UTC date-time>/snapshotter.json`` (or ``DIR``). Needs root, containerd,
ctr and runc.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import snapshotter_goals as goals  # noqa: E402
from bench import snapshotter_reads as reads  # noqa: E402
from bench.harness import (  # noqa: E402
    CACHE,
    MEDIA_TYPE_GZIP_LAYER,
    PROGRAM,
    PYTHON,
    _cached_convert,
    drop_caches,
    log,
    source_key,
    stats,
)
from bench.image import debian_image  # noqa: E402
from bench.pull_phases import mounted_time, prepare_parts, timed_pull  # noqa: E402
from blockindex.oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402
from testkit import containerdkit as kit  # noqa: E402
from testkit import imagegen  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Params:
    runs: int = 5
    """Repetitions of every mode."""
    modes: tuple[str, ...] = ("lazy", "full_pull", "lazy_in_process")
    """What is measured, in turn, in each run (``lazy_in_process`` in the first only: it is
    there for its steps)."""
    mount_counts: tuple[int, ...] = (1, 5, 20)
    """Images mounted at once when their mount processes' PSS is summed."""
    random_reads: int = 2000
    """4 KiB reads at random offsets of the complete image's larger files."""
    large_file_bytes: int = 256 << 10
    """What a larger file is, for the random reads."""


QUICK = Params(runs=1, mount_counts=(1, 2, 3), random_reads=200)
IMAGES = ("debian", "python")
"""What ``--image`` chooses from (the module's docstring says what each is)."""


def run(quick: bool, outdir: Path, image: str | None = None) -> dict[str, Any]:
    """Measure, write ``outdir/snapshotter.json`` and return what it holds. ``image`` is
    one of ``IMAGES``; by default the python image when ``quick``, else the Debian one."""
    return measure(QUICK if quick else Params(), outdir, image or default_image(quick))


def default_image(quick: bool) -> str:
    return "python" if quick else "debian"


# -- inputs ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inputs:
    name: str
    """Which of ``IMAGES``."""
    description: str
    images: Path
    """Served by the registry: one OCI layout per repository."""
    lazy: str
    """Repository of the converted image."""
    plain: str
    """Repository of the same image as gzip layers with its real config."""
    lazy_stored_bytes: int
    gzip_layers_bytes: int
    variants: list[str]
    """Repositories of distinct images holding the lazy image's files (and one more)."""


def _plain_layout(archive: Path, images: Path, repo: str) -> None:
    """The docker-archive as an ordinary OCI image with gzip -6 layers and its own config
    (containerd checks the diff ids when it unpacks)."""
    dest = images / repo
    if (dest / "index.json").exists():
        return
    tmp = images / f".{repo}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    layout = Layout(tmp)
    layout.init()
    with tarfile.open(archive) as tf:
        [entry] = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = layout.write_blob(tf.extractfile(entry["Config"]).read(),  # type: ignore[union-attr]
                                   MEDIA_TYPE_OCI_CONFIG)
        layers = []
        for name in entry["Layers"]:
            raw = tf.extractfile(name).read()  # type: ignore[union-attr]
            if raw[:2] != b"\x1f\x8b":
                raw = gzip.compress(raw, compresslevel=6, mtime=0)
            layers.append(layout.write_blob(raw, MEDIA_TYPE_GZIP_LAYER))
    manifest = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                               "config": config, "layers": layers})
    layout.tag(layout.write_blob(manifest, MEDIA_TYPE_OCI_MANIFEST), "1")
    os.replace(tmp, dest)


def _layer_bytes(images: Path, repo: str) -> int:
    layout = Layout(images / repo)
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    return sum(int(d["size"]) for d in manifest["layers"])


def prepare_inputs(work: Path, variants: int, image: str) -> Inputs:
    """The image in both forms, and ``variants`` more lazy images of its files (each
    converted once, kept beside it, sharing its blobs by hard links)."""
    if image == "debian":
        # built, converted and cached by the suite's code, in its cache, where its plain
        # form (debian-gzip) has the config with the layers' diff ids that containerd checks
        debian = debian_image()
        images, lazy, plain, description = debian.images, debian.lazy, debian.pull, debian.description
    elif image == "python":
        images = CACHE / "images"
        images.mkdir(parents=True, exist_ok=True)
        tar = imagegen.build_python_image(work / "python.tar", cache_dir=CACHE / "inputs", with_pyc=True)
        pykey = hashlib.sha256(tar.read_bytes()).hexdigest()[:12]
        lazy = _cached_convert(images, f"python-{pykey}-{source_key()}", f"docker-archive:{tar}")
        plain = f"ctrd-python-{pykey}"
        _plain_layout(tar, images, plain)
        tar.unlink()
        description = "this machine's python3 and its libraries (tests/imagegen.py, with .pyc files)"
    else:
        raise RuntimeError(f"unknown image {image!r}: one of {', '.join(IMAGES)}")
    repos = reads.variant_repos(images, plain, lazy, variants, work)
    return Inputs(image, description, images, lazy, plain, _layer_bytes(images, lazy),
                  _layer_bytes(images, plain), repos)


# -- one measurement ------------------------------------------------------------------------

class AccessLog:
    """Bytes the registry sent, from its access log (``time method path range status bytes``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, mark: int) -> tuple[int, int]:
        """(bytes sent, requests) since ``mark``."""
        with open(self.path, "rb") as f:
            f.seek(mark)
            lines = f.read().decode().splitlines()
        sent = sum(int(line.split()[5]) for line in lines if len(line.split()) == 6)
        return sent, len(lines)

    def times_since(self, mark: int) -> list[float]:
        """When each request since ``mark`` was answered (wall clock)."""
        with open(self.path, "rb") as f:
            f.seek(mark)
            return [float(line.split()[0]) for line in f.read().decode().splitlines() if line.strip()]


def _ctr(sock: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(["ctr", "-a", str(sock), *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _wait_containerd(sock: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["ctr", "-a", str(sock), "version"], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"containerd on {sock} does not answer")
        time.sleep(0.1)


def measure_once(mode: str, n: int, work: Path, ref_lazy: str, ref_plain: str, access: AccessLog) -> dict:
    d = work / f"{mode}-{n}"
    d.mkdir()
    procs = kit.Procs()
    lazy = mode in ("lazy", "lazy_in_process")
    try:
        snap_sock = d / "s.sock"
        if lazy:
            kit.start_snapshotter(procs, snap_sock, d / "lazyfs", d / "snapshotter.log", "--no-prefetch")
        _proc, sock = kit.start_containerd(procs, d, kit.containerd_config(d, d / "c.sock", snap_sock))
        _wait_containerd(sock)
        drop_caches()
        mark = access.mark()
        t0 = time.perf_counter()
        if mode == "lazy_in_process":
            pulled = timed_pull(sock, ref_lazy, d / "pull.json")
        elif lazy:
            handed = subprocess.run([sys.executable, "-m", "lazyfs", "pull", "--address", str(sock),
                                     "--snapshotter-address", str(snap_sock), ref_lazy],
                                    capture_output=True, text=True, cwd=ROOT, timeout=600)
            if handed.returncode != 0:
                raise RuntimeError(f"lazyfs pull exited {handed.returncode}: {handed.stderr.strip()}")
        else:
            _ctr(sock, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref_plain)
        t1 = time.perf_counter()
        out = _ctr(sock, "run", "--rm", "--snapshotter", "lazyfs" if lazy else "overlayfs",
                   ref_lazy if lazy else ref_plain, f"bench-{n}", PYTHON, "-c", f"{PROGRAM}; print('ok')")
        t2 = time.perf_counter()
        extra: dict[str, Any] = {}
        if mode == "lazy_in_process":  # the mount is up by now (the pull may not wait for it)
            [mount_log] = [p for p in (d / "lazyfs" / "logs").glob("*.log") if p.name != "mount-parent.log"]
            extra = {"steps": pulled["steps"], "prepare_parts": prepare_parts(
                pulled["prepare_window"], access.times_since(mark), mounted_time(mount_log))}
        if out.stdout.strip() != "ok":
            raise RuntimeError(f"the program printed {out.stdout!r}")
        sent, requests = access.since(mark)
        return {"pull_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0,
                "registry_bytes": sent, "registry_requests": requests, **extra}
    finally:
        kit.teardown(d, procs)
        shutil.rmtree(d, ignore_errors=True)


# -- the run ----------------------------------------------------------------------------------

def measure(params: Params, outdir: Path, image: str = "debian") -> dict[str, Any]:
    if os.geteuid() != 0:
        raise RuntimeError("the snapshotter benchmark needs root (containerd, FUSE, drop_caches)")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"the snapshotter benchmark needs {tool} (tests/setup.sh installs it)")
    started = time.monotonic()
    load_before = os.getloadavg()
    load_runs: list[tuple[float, float, float]] = []
    Path("/var/tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lzsb-", dir="/var/tmp"))  # short: socket paths
    samples: dict[str, list[dict]] = {mode: [] for mode in params.modes}
    complete: list[dict] = []
    cold: list[dict] = []
    try:
        inputs = prepare_inputs(work, max(params.mount_counts) - 1, image)
        access = AccessLog(work / "access.log")
        with make_server(inputs.images, "127.0.0.1", 0, access_log=access.path) as server:
            ref_lazy = f"127.0.0.1:{server.port}/{inputs.lazy}:1"
            ref_plain = f"127.0.0.1:{server.port}/{inputs.plain}:1"
            for n in range(1, params.runs + 1):
                load_runs.append(os.getloadavg())
                log(f"run {n}: load average {' '.join(f'{x:.2f}' for x in load_runs[-1])}")
                for mode in params.modes:
                    if mode == "lazy_in_process" and n > 1:
                        continue
                    sample = measure_once(mode, n, work, ref_lazy, ref_plain, access)
                    log(f"run {n} {mode}: {sample['total_s']:.2f}s, "
                        f"{sample['registry_bytes'] / (1 << 20):.1f} MiB from the registry")
                    samples[mode].append(sample)
                variants = [f"127.0.0.1:{server.port}/{v}:1" for v in inputs.variants]
                c = reads.measure_complete(
                    work / f"complete-{n}", images=inputs.images, ref_lazy=ref_lazy, ref_plain=ref_plain,
                    plain=inputs.plain, variant_refs=variants, mount_counts=params.mount_counts,
                    random_reads=params.random_reads, large_file=params.large_file_bytes)
                complete.append(c)
                log(f"run {n} complete image: tar /usr lazyfs {c['tar_usr_s_lazyfs']:.2f}s, "
                    f"overlayfs {c['tar_usr_s_overlayfs']:.2f}s, memfs {c['tar_usr_s_memfs']:.2f}s")
                cold.append(reads.measure_cold(work / f"cold-{n}", port=server.port, repo=inputs.lazy,
                                               access=access))
                log(f"run {n} cold tree read: {cold[-1]['total_s']:.2f}s, "
                    f"{cold[-1]['registry_requests']} requests")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    result: dict[str, Any] = {
        "meta": {
            "utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ"), "host": platform.node(),
            "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "containerd": _version(["containerd", "--version"]), "params": dataclasses.asdict(params),
            "program": f"{PYTHON} -c '{PROGRAM}'", "seconds": round(time.monotonic() - started, 1),
            "loadavg_1m_before": load_before[0], "loadavg_1m_after": load_after[0],
            "loadavg": {"before": load_before, "runs": load_runs, "after": load_after,
                        "note": "1, 5 and 15 minute load averages (2 cores; a shared machine)"},
        },
        "image": {"name": inputs.name, "description": inputs.description,
                  "lazy_stored_bytes": inputs.lazy_stored_bytes,
                  "gzip_layers_bytes": inputs.gzip_layers_bytes,
                  "variants_own_bytes": reads.own_bytes(inputs.images, inputs.variants)},
        "context": {"stargz_ratios": goals.STARGZ, "stargz_source": goals.STARGZ_SOURCE},
        "modes": {mode: _summary(s) for mode, s in samples.items()},
        "complete": goals.complete_figures(complete, params.mount_counts),
        "cold": goals.cold_figures(cold, inputs.lazy_stored_bytes),
    }
    modes = result["modes"]
    if "lazy_in_process" in modes:
        result["pull_breakdown"] = goals.pull_breakdown(samples["lazy_in_process"])
    if "lazy" in modes and "full_pull" in modes:
        lazy, full = modes["lazy"], modes["full_pull"]
        result["ratios"] = {
            "total_lazy_vs_full_pull": lazy["total_s"]["median"] / full["total_s"]["median"],
            "bytes_lazy_vs_full_pull": lazy["registry_bytes"]["median"] / full["registry_bytes"]["median"],
            **goals.run_ratios(samples["lazy"], samples["full_pull"], complete, cold),
        }
        result["goals"] = goals.goals(result)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "snapshotter.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _summary(samples: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {key: stats([s[key] for s in samples]) for key in ("pull_s", "run_s", "total_s")}
    for key in ("registry_bytes", "registry_requests"):
        values = [s[key] for s in samples]
        out[key] = {"median": statistics.median(values), "runs": values}
    return out


def _version(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def table(result: dict[str, Any]) -> str:
    rows = ["mode            pull s   run s   total s   MiB from registry   requests"]
    for mode, m in result["modes"].items():
        rows.append(f"{mode:<15} {m['pull_s']['median']:6.2f}  {m['run_s']['median']:6.2f}  "
                    f"{m['total_s']['median']:8.2f}   {m['registry_bytes']['median'] / (1 << 20):17.1f}   "
                    f"{m['registry_requests']['median']:8.0f}")
    image = result["image"]
    rows.append(f"image: {image.get('name', 'python')}: {image.get('description', '')}")
    rows.append(f"  {image['lazy_stored_bytes'] / (1 << 20):.1f} MiB lazy (index + chunk blobs), "
                f"{image['gzip_layers_bytes'] / (1 << 20):.1f} MiB gzip layers")
    if "loadavg" in result["meta"]:
        load = result["meta"]["loadavg"]
        rows.append("load average (1 min) before, at each run, after: " + ", ".join(
            f"{x[0]:.2f}" for x in (load["before"], *load["runs"], load["after"])))
    for name, value in (result.get("ratios") or {}).items():
        rows.append(f"{name}: {value['median'] if isinstance(value, dict) else value:.3f}")
    if "goals" in result:
        rows.extend(goals.table(result))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each mode")
    parser.add_argument("--image", choices=IMAGES, help="debian: the suite's Debian + python3 + "
                        "numpy image (default); python: the small python image (default with --quick)")
    parser.add_argument("--runs", type=int, help="repetitions of each mode (default 5)")
    parser.add_argument("--out", type=Path, help="directory for snapshotter.json "
                        "(default bench/results/<UTC date-time>)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (containerd, FUSE mounts, drop_caches)")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    params = QUICK if args.quick else Params()
    if args.runs:
        params = dataclasses.replace(params, runs=args.runs)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    outdir = args.out or ROOT / "bench" / "results" / stamp
    try:
        result = measure(params, outdir, args.image or default_image(args.quick))
    except RuntimeError as exc:
        print(f"snapshotter_bench: error: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    print(f"\n{outdir / 'snapshotter.json'}  ({result['meta']['seconds']}s, {params.runs} run(s) each, "
          f"{result['image']['name']} image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
