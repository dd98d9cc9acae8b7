"""Shared fixtures: real servers on loopback, small OCI layouts, real FUSE mounts torn
down by pid."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockindex.convert import convert  # noqa: E402
from blockindex.oci import MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json  # noqa: E402
from lazyfs.process import wait_exited  # noqa: E402
from lazyfs.serve import ServerHandle, make_server  # noqa: E402
from testkit import imagegen  # noqa: E402
from testkit.registryd import Registry  # noqa: E402
from testkit.waiting import wait_until  # noqa: E402


def pytest_collection_modifyitems(config, items):
    can_mount = os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3")
    for item in items:
        if "mount" in item.keywords and not can_mount:
            item.add_marker(pytest.mark.skip(reason="real mounts need root, /dev/fuse, fusermount3"))


@pytest.fixture(autouse=True, scope="session")
def _own_state_dir(tmp_path_factory):
    """Pushes record which repositories hold which blobs (fetcher/blobrepos.py) under
    $XDG_STATE_HOME: keep this run's record in its own directory, not in ~."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


def lazyfs(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the lazyfs command line as a user would."""
    done = subprocess.run([sys.executable, "-m", "lazyfs", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"lazyfs {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


class Mounts:
    """Mounts made by a test, unmounted (and their processes killed) at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.points: list[Path] = []

    def mount(self, ref: str, *extra: str, name: str = "mnt", cache: Path | None = None,
              check: bool = True) -> tuple[Path, subprocess.CompletedProcess]:
        mnt = self.tmp / name
        mnt.mkdir(exist_ok=True)
        cache = cache or self.tmp / "cache"
        done = lazyfs("mount", ref, str(mnt), "--cache", str(cache), "--timeout", "10",
                      "--log-file", str(self.tmp / f"{name}.log"), *extra, check=check)
        if done.returncode == 0:
            self.points.append(mnt)
        return mnt, done

    def status(self, mnt: Path) -> dict:
        return json.loads(lazyfs("status", str(mnt), "--json").stdout)

    def wait_complete(self, mnt: Path, timeout: float = 120) -> dict:
        return wait_until(lambda: (st := self.status(mnt))["prefetch"]["complete"] and st, timeout,
                          "the prefetch completing", interval=0.2,
                          detail=lambda: self.status(mnt)["prefetch"])

    def log(self, name: str = "mnt") -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def unmount_all(self) -> None:
        for mnt in self.points:
            pid = None
            try:
                pid = self.status(mnt)["pid"]
            except Exception:
                pass
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            if pid:
                _kill(pid)
        self.points.clear()


def _kill(pid: int) -> None:
    """Wait for a mount process to stop running, then SIGKILL it. A foreground mount the
    test started is its child, a zombie until the test reaps it: it counts as stopped
    (``exited``), or every such teardown would wait out the whole 10 s."""
    if not wait_exited(pid, 10):
        wait_exited(pid, 10, kill=True)


@pytest.fixture
def mounts(tmp_path):
    m = Mounts(tmp_path)
    yield m
    m.unmount_all()


@dataclasses.dataclass
class Image:
    layout: Layout
    manifest: bytes
    manifest_digest: str
    blobs: dict[str, bytes]  # digest -> bytes (the layers)

    @property
    def big(self) -> str:
        return max(self.blobs, key=lambda d: len(self.blobs[d]))


def build_image(path: Path, tag: str = "1", big_size: int = 300_000) -> Image:
    layout = Layout(path)
    layout.init()
    payloads = [os.urandom(big_size), b"hello world"]
    layers = [layout.write_blob(p, "application/octet-stream") for p in payloads]
    config = layout.write_blob(b"{}", "application/vnd.oci.image.config.v1+json")
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": config, "layers": layers,
    })
    desc = layout.write_blob(manifest, MEDIA_TYPE_OCI_MANIFEST)
    layout.tag(desc, tag)
    return Image(layout, manifest, desc["digest"],
                 {d["digest"]: p for d, p in zip(layers, payloads, strict=True)})


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Image]:
    root = tmp_path / "root"
    return {name: build_image(root / name) for name in ("app", "team/app")}


@pytest.fixture
def server(tmp_path: Path, images: dict[str, Image]) -> Iterator[ServerHandle]:
    handle = make_server(tmp_path / "root", "127.0.0.1", 0, access_log=tmp_path / "access.log")
    with handle:
        yield handle


# -- the rich test image, converted once and served per test -----------------------------


@pytest.fixture(scope="session")
def rich(tmp_path_factory):
    """The rich two-layer test image, converted once, with small chunks so that files
    span several chunks."""
    tmp = tmp_path_factory.mktemp("rich")
    image = imagegen.build_rich_image(tmp / "rich.tar")
    convert(f"docker-archive:{image.path}", f"oci:{tmp / 'images' / 'rich'}:1", chunk_size=64 << 10)
    return image, tmp / "images"


def serve_copy(images: Path, tmp_path: Path) -> Iterator[tuple[Path, ServerHandle]]:
    """A private copy of a directory of converted images, served on an ephemeral loopback
    port until the generator is closed."""
    root = tmp_path / "images"
    shutil.copytree(images, root)
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    try:
        yield root, server
    finally:
        server.close()


@pytest.fixture
def served(rich, tmp_path):
    """A private copy of the converted images, served on an ephemeral loopback port."""
    image, images = rich
    for root, server in serve_copy(images, tmp_path):
        yield image, root, server


PEER_TOKEN = "s3cret-cluster-token-0123456789"
"""The cluster token of the peer tests' nodes."""


@pytest.fixture
def origin(served):
    """The rich image served per test (the peer tests' origin; a module may define its own)."""
    return served


@pytest.fixture
def token_file(tmp_path):
    """A file holding ``PEER_TOKEN``."""
    f = tmp_path / "token"
    f.write_text(PEER_TOKEN + "\n")
    return f


# -- the benchmark suite's quick run, once a session ---------------------------------------


@dataclasses.dataclass(frozen=True)
class QuickSuite:
    done: subprocess.CompletedProcess
    out: Path
    """The results directory: suite.json, summary.md, the plots, and one directory per node
    benchmark (``out/soak/soak.json``, ...)."""

    def result(self) -> dict:
        path = self.out / "suite.json"
        assert path.exists(), f"bench/run --quick exited {self.done.returncode}:\n{self.done.stderr[-3000:]}"
        return json.loads(path.read_text())

    def node(self, name: str) -> dict:
        """What the node benchmark ``bench/<name>.py`` returned to the suite; it must have run."""
        got = self.result()["scenarios"]["nodes"][name]
        assert got["status"] == "ok", (f"bench/{name}.py in the suite: {got['status']}\n"
                                       f"{self.done.stderr[-3000:]}")
        return got["result"]


@pytest.fixture(scope="session")
def quick_suite(tmp_path_factory) -> QuickSuite:
    """``bench/run --quick`` (every scenario of the benchmark suite on tiny inputs), run once
    a session. Its nodes scenario calls the peers, registry, snapshotter and soak benchmarks'
    ``run(quick=True, outdir)``, exactly what their own tests check, so those tests read the
    suite's outputs rather than run each benchmark a second time (a few minutes on two cores).
    Tests using it need ``@pytest.mark.timeout(1300)``: the first one waits for the run."""
    out = tmp_path_factory.mktemp("quick-suite")
    done = subprocess.run([str(ROOT / "bench" / "run"), "--no-setup", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    return QuickSuite(done, out)


@pytest.fixture
def registry(tmp_path):
    """Debian's docker-registry on loopback, stopped after the test (``testkit.registryd``)."""
    r = Registry(tmp_path)
    yield r
    r.stop()
