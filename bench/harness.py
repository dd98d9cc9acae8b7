"""What the mount benchmark stands on: its inputs (generated once, converted, cached in
``/var/tmp/lazyfs-bench-cache`` keyed by their parameters and the converter's source), the
harness that starts servers, mounts and memfs and tears every one of them down, and small
measuring tools. The scenarios themselves are in ``mount_bench.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memfs import pseudo_random  # noqa: E402
from blockindex.oci import MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json  # noqa: E402
from lazyfs import mountinfo  # noqa: E402
from lazyfs.mountinfo import STATUS_XATTR  # noqa: E402
from lazyfs.process import wait_gone  # noqa: E402
from testkit import imagegen  # noqa: E402

CACHE = Path("/var/tmp/lazyfs-bench-cache")
PROGRAM = "import json, sqlite3, ssl"
PYTHON = "/usr/bin/python3"
MEDIA_TYPE_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Params:
    """What one benchmark run measures."""

    runs: int = 5
    """Repetitions of every scenario."""
    seq_bytes: int = 256 << 20
    """Size of the file read sequentially and prefetched."""
    walk_files: int = 50_000
    """Files in the walked tree (100 to a directory)."""
    per_dir: int = 100
    quick: bool = False


QUICK = Params(runs=1, seq_bytes=16 << 20, walk_files=2_000, quick=True)


# -- small tools --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def lazyfs(*args: str) -> subprocess.CompletedProcess:
    """The command line, as a user runs it."""
    return run(sys.executable, "-m", "lazyfs", *args, cwd=ROOT)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def read_all(path: Path) -> int:
    """Read a file 1 MiB at a time into one reused buffer; return the bytes read."""
    buf = bytearray(1 << 20)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def resolve_in(root: Path, path: str) -> Path:
    """``path`` as seen from a chroot at ``root`` (absolute symlinks stay inside)."""
    current = root
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise RuntimeError(f"symlink loop at {candidate}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p] + parts
        elif part == "..":
            current = current.parent if current != root else root
        else:
            current = candidate
    return current


def readahead_kb(mnt: Path) -> int | None:
    entry = mountinfo.find(mnt)
    if entry is None:
        return None
    try:
        return int(Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb").read_text())
    except OSError:
        return None


def source_key() -> str:
    """Converted inputs depend on the converter: a change to blockindex/ converts again."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "blockindex").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


# -- inputs, cached across runs -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inputs:
    images: Path
    """Served by ``lazyfs serve``: one OCI layout per repository."""
    python: str
    """Repository of the converted python image."""
    pull: str
    """Repository holding the python image's layers as gzip blobs (the full pull)."""
    pull_layers: list[dict[str, Any]]
    seq: str
    walk: str


def _cached_convert(images: Path, repo: str, source: str) -> str:
    dest = images / repo
    if not (dest / "index.json").exists():
        tmp = images / f".{repo}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.monotonic()
        lazyfs("convert", source, f"oci:{tmp}:1")
        os.replace(tmp, dest)
        log(f"converted {repo} in {time.monotonic() - t:.1f}s")
    return repo


def _gzip_pull_layout(archive: Path, images: Path, repo: str) -> None:
    """The docker-archive's layers, each compressed with gzip -6, as an OCI layout: what a
    registry would serve for the original image."""
    dest = images / repo
    if (dest / "index.json").exists():
        return
    tmp = images / f".{repo}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    layout = Layout(tmp)
    layout.init()
    with tarfile.open(archive) as tf:
        [entry] = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        layers = []
        for name in entry["Layers"]:
            raw = tf.extractfile(name).read()  # type: ignore[union-attr]
            if raw[:2] != b"\x1f\x8b":
                raw = gzip.compress(raw, compresslevel=6, mtime=0)
            layers.append(layout.write_blob(raw, MEDIA_TYPE_GZIP_LAYER))
    config = layout.write_blob(b"{}", "application/vnd.oci.image.config.v1+json")
    manifest = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                               "config": config, "layers": layers})
    layout.tag(layout.write_blob(manifest, MEDIA_TYPE_OCI_MANIFEST), "1")
    os.replace(tmp, dest)


def prepare_inputs(params: Params, work: Path) -> Inputs:
    images = CACHE / "images"
    images.mkdir(parents=True, exist_ok=True)
    key = source_key()

    tar = imagegen.build_python_image(work / "python.tar", cache_dir=CACHE / "inputs",
                                      with_pyc=True)
    pykey = hashlib.sha256(tar.read_bytes()).hexdigest()[:12]
    python = _cached_convert(images, f"python-{pykey}-{key}", f"docker-archive:{tar}")
    pull = f"pull-{pykey}"
    _gzip_pull_layout(tar, images, pull)
    layout = Layout(images / pull)
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    tar.unlink()

    seq = f"seq-{params.seq_bytes}-{key}"
    if not (images / seq / "index.json").exists():
        rootfs = work / "seq-rootfs"
        (rootfs / "data").mkdir(parents=True)
        with open(rootfs / "data" / "big", "wb") as f:
            piece = 64 << 20
            for off in range(0, params.seq_bytes, piece):
                f.write(pseudo_random(min(piece, params.seq_bytes - off), seed=off))
        _cached_convert(images, seq, f"dir:{rootfs}")
        shutil.rmtree(rootfs)

    walk = f"many-{params.walk_files}-{params.per_dir}-{key}"
    if not (images / walk / "index.json").exists():
        many = imagegen.build_many_files_image(work / "many.tar", n=params.walk_files,
                                               per_dir=params.per_dir)
        _cached_convert(images, walk, f"tar:{many}")
        many.unlink()
    return Inputs(images, python, pull, manifest["layers"], seq, walk)


# -- the harness: every process and mount it starts, torn down at the end -----------------

class Harness:
    def __init__(self, work: Path, inputs: Inputs | None, host: str = "127.0.0.1") -> None:
        self.work = work
        self.inputs = inputs  # type: ignore[assignment]
        self.host = host
        """Where the origin listens: loopback, or the far end of a bench/link.py link."""
        self.port = 0
        self.procs: list[subprocess.Popen] = []
        self.mounts: dict[Path, int | None] = {}  # mountpoint -> mount process pid
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        path = self.work / f"{name}-{self._n}"
        path.mkdir()
        return path

    def start_server(self) -> None:
        self.port = free_port()
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "lazyfs", "serve", str(self.inputs.images),
             "--listen", f"127.0.0.1:{self.port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(self.port)

    def ref(self, repo: str) -> str:
        return f"{self.host}:{self.port}/{repo}:1"

    def blob_url(self, repo: str, digest: str) -> str:
        return f"http://{self.host}:{self.port}/v2/{repo}/blobs/{digest}"

    def mount(self, repo: str, cache: Path, *extra: str) -> Path:
        mnt = self.fresh("mnt")
        if self.host != "127.0.0.1":
            extra = ("--insecure-registry", f"{self.host}:{self.port}", *extra)
        out = lazyfs("mount", self.ref(repo), str(mnt), "--cache", str(cache),
                     "--log-file", str(mnt) + ".log", *extra)
        pid = int(out.stdout.split("(pid ", 1)[1].split(",", 1)[0]) if "(pid " in out.stdout \
            else None
        self.mounts[mnt] = pid
        return mnt

    def status(self, mnt: Path) -> dict[str, Any]:
        """What ``lazyfs status --json`` prints: the root's status xattr, read in-process
        so it can be polled every few milliseconds."""
        return json.loads(os.getxattr(mnt, STATUS_XATTR))

    def umount(self, mnt: Path) -> None:
        lazyfs("umount", str(mnt))
        self.mounts.pop(mnt, None)

    def memfs(self, file_size: int = 0, tree: int = 0, per_dir: int = 100, *,
              from_dir: Path | None = None, loop: str = "pyfuse3") -> Path:
        """bench/memfs.py mounted, serving its synthetic files or a copy of ``from_dir``."""
        mnt = self.fresh("memfs")
        shape = ["--from-dir", str(from_dir)] if from_dir is not None else [
            "--file-size", str(file_size), "--tree", str(tree), "--per-dir", str(per_dir)]
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "memfs.py"), str(mnt), *shape,
                                 "--loop", loop],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        self.mounts[mnt] = None
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"memfs did not start (exit {proc.poll()})")
        return mnt

    def warm_cache(self, repo: str) -> Path:
        """A cache holding the whole image: mount with prefetch, wait, unmount."""
        cache = self.fresh("cache-warm")
        mnt = self.mount(repo, cache)
        wait_complete(self, mnt, timeout=600)
        self.umount(mnt)
        return cache

    def close(self) -> None:
        for mnt, pid in list(self.mounts.items()):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            if pid:
                _stop_pid(pid)
        self.mounts.clear()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _stop_pid(pid: int) -> None:
    wait_gone(pid, 10, kill=True)


def wait_complete(h: Harness, mnt: Path, timeout: float = 300, poll: float = 0.01) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = h.status(mnt)
        if st["prefetch"]["complete"]:
            return st
        time.sleep(poll)
    raise RuntimeError(f"prefetch of {mnt} did not complete in {timeout}s: {st['prefetch']}")


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bdi(mnt: Path) -> Path:
    entry = mountinfo.find(mnt)
    assert entry is not None
    return Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")
