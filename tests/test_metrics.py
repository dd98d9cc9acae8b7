"""Prometheus metrics (``--metrics``): scraped from a real mount after reads, the counters
move as the reads did and agree with ``lazyfs status``; ``serve`` and ``peer`` answer too."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache.store import ChunkStore
from lazyfs.metrics import Metrics
from lazyfs.serve import make_server
from testkit.waiting import stop_process, wait_until
from tests.cachekit import install, make_image
from tests.conftest import ROOT, lazyfs


@pytest.fixture(scope="module")
def metric_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics") / "images"
    files = make_image(root, "m", {"one.bin": 700_000, "two.bin": 200_000}, seed=31)
    return root, files


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.mount
def test_mount_metrics_follow_the_reads(metric_image, mounts, tmp_path):
    root, files = metric_image
    server = make_server(root, "127.0.0.1", 0)
    server.start()
    try:
        ref = f"127.0.0.1:{server.port}/m:1"
        mnt, _ = mounts.mount(ref, "--no-prefetch", "--metrics", "127.0.0.1:0")
        url = mounts.status(mnt)["metrics"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
        before = scrape(url)
        assert value(before, "lazyfs_reads_total") == 0
        assert (mnt / "one.bin").read_bytes() == files["one.bin"]
        m, st = scrape(url), mounts.status(mnt)
        r, f = st["reads"], st["fetch"]
        n = len(files["one.bin"])
        assert value(m, "lazyfs_reads_total") == r["reads"] > 0
        assert value(m, "lazyfs_read_bytes_total") == r["bytes_read"] >= n
        assert value(m, "lazyfs_cache_misses_total") == r["chunk_misses"] > 0
        assert value(m, "lazyfs_bytes_total", source="origin") == f["bytes_received"] >= n
        assert value(m, "lazyfs_bytes_total", source="cache") == 0
        assert value(m, "lazyfs_cache_hits_total", tier="memory") == r["chunk_hits_memory"]
        timed = sum(value(m, "lazyfs_read_seconds_count", source=s) for s in ("memory", "cache", "network"))
        assert timed == r["reads"] - r["failed_reads"]
        assert value(m, "lazyfs_read_seconds_count", source="network") > 0
        assert value(m, "lazyfs_fetch_seconds_count", source="origin") == f["requests"]
        assert value(m, "lazyfs_prefetch_total_bytes") == st["prefetch"]["total_bytes"] > n
        assert value(m, "lazyfs_errors_total", kind="eio") == 0
        assert value(m, "lazyfs_cache_full") == 0
        mounts.unmount_all()

        # the same file again through a new mount: from the cache disk, nothing from the origin
        mnt, _ = mounts.mount(ref, "--no-prefetch", "--metrics", "127.0.0.1:0", name="again")
        url = mounts.status(mnt)["metrics"]
        assert (mnt / "one.bin").read_bytes() == files["one.bin"]
        m = scrape(url)
        assert value(m, "lazyfs_bytes_total", source="origin") == 0
        assert value(m, "lazyfs_cache_misses_total") == 0
        assert value(m, "lazyfs_bytes_total", source="cache") >= n
        assert value(m, "lazyfs_cache_hits_total", tier="cache") > 0
        assert value(m, "lazyfs_read_seconds_count", source="cache") > 0
        assert value(m, "lazyfs_read_seconds_count", source="network") == 0
    finally:
        server.close()


def _started(argv: list[str]) -> tuple[subprocess.Popen, str, str]:
    """Start a lazyfs daemon; wait for its "metrics at URL" log line. Returns the process,
    the metrics URL and everything it logged until then."""
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", *argv], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    seen = ""
    while True:
        line = proc.stderr.readline()  # the subprocess's own startup bounds this; pytest's timeout too
        if not line:
            break
        seen += line
        if found := re.search(r"metrics at (http://\S+)", line):
            return proc, found.group(1), seen
    proc.kill()
    raise AssertionError(f"lazyfs {' '.join(argv)} never logged its metrics URL:\n{seen}")


def _stop(proc: subprocess.Popen) -> None:
    stop_process(proc, sig=signal.SIGINT)
    proc.stderr.close()


def test_serve_peer_and_snapshotter_metrics(metric_image, tmp_path):
    root, _ = metric_image
    proc, url, seen = _started(["serve", str(root), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    try:
        served = re.search(r"serving OCI layouts under \S+ at (http://\S+)", seen).group(1)
        assert urllib.request.urlopen(f"{served}/v2/", timeout=10).status == 200
        # the server counts a response once its body is sent, after the client has it
        m = wait_until(lambda: value(got := scrape(url), "lazyfs_serve_requests_total", status="200") and got,
                       10, "the request counted", detail=lambda: scrape(url))
        assert value(m, "lazyfs_serve_requests_total", status="200") == 1
        assert value(m, "lazyfs_serve_bytes_total") > 0
    finally:
        _stop(proc)
    # a peer with a cache of one unmounted image and a limit far below it: evicts, and says so
    cache = tmp_path / "cache"
    install(root, "m", cache)
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    proc, url, _ = _started(["peer", "--cache", str(cache), "--listen", "127.0.0.1:0",
                             "--token-file", str(token), "--metrics", "127.0.0.1:0", "--cache-size", "100K"])
    try:
        m = wait_until(lambda: value(got := scrape(url), "lazyfs_cache_evicted_entries_total") and got,
                       60, "the peer evicting", interval=0.2)
        assert value(m, "lazyfs_peer_server_requests_total", result="ok") == 0
        assert value(m, "lazyfs_cache_limit_bytes") == 100 << 10
        assert value(m, "lazyfs_cache_size_bytes") <= 90 << 10
        assert ChunkStore(cache).usage()[1] <= 90 << 10
    finally:
        _stop(proc)
    proc, url, _ = _started(["snapshotter", "--address", str(tmp_path / "snap.sock"),
                             "--root", str(tmp_path / "snaproot"), "--metrics", "127.0.0.1:0"])
    try:
        assert ("lazyfs_snapshots", ()) in scrape(url)
    finally:
        _stop(proc)
    done = lazyfs("serve", str(root), "--listen", "127.0.0.1:0", "--metrics", "nonsense", check=False)
    assert done.returncode == 2 and "HOST:PORT" in done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_metrics_url_names_the_bound_address(host):
    """The URL is the address the endpoint bound (a text host, IPv6 in brackets, the port
    the kernel chose), and it answers."""
    metrics = Metrics()
    metrics.add_source(lambda: [("gauge", "up", "always 1", {"host": host}, 1.0)])
    url = metrics.serve(host, 0)
    shown = f"[{host}]" if ":" in host else host
    assert re.fullmatch(rf"http://{re.escape(shown)}:[1-9][0-9]*/metrics", url), url
    assert value(scrape(url), "lazyfs_up", host=host) == 1.0


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_a_metrics_endpoint_open_beyond_loopback_is_warned_of(host, warned, caplog):
    metrics = Metrics()
    with caplog.at_level("WARNING", logger="lazyfs.metrics"):
        metrics.serve(host, 0)
    assert ("without authentication or TLS" in caplog.text) == warned, caplog.text
