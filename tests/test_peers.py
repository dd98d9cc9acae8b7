"""Peers for real: several mount processes on loopback (separate caches and ports) in front
of one counting origin; a standalone ``lazyfs peer``; a lying peer; a killed peer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blockindex.codec import decode_verified
from blockindex.oci import Layout
from lazyfs.process import wait_gone
from testkit.treecompare import compare_tree
from testkit.waiting import listening, wait_until

from .conftest import PEER_TOKEN, ROOT, lazyfs
from .test_mount import index_of

pytestmark = pytest.mark.mount

TOKEN = PEER_TOKEN


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def origin_range_bytes(server) -> int:
    """Bytes of chunk blobs the origin sent: the sum of the Range lengths it answered."""
    total = 0
    for _method, path, rng, status in server.requests:
        if "/blobs/" in path and rng and status == 206:
            first, last = rng.removeprefix("bytes=").split("-")
            total += int(last) - int(first) + 1
    return total


def index_size(root: Path) -> int:
    layout = Layout(root / "rich")
    return json.loads(layout.read_blob(layout.resolve("1")["digest"]))["layers"][0]["size"]


def unique_stored_bytes(root: Path) -> int:
    return sum(c.stored_size for c in index_of(root).all_chunks())


class Cluster:
    """Mount processes started together and torn down together (in parallel: one at a
    time through ``lazyfs status`` costs seconds per node on a loaded 2-core machine)."""

    def __init__(self) -> None:
        self.pids: dict[Path, int] = {}

    def teardown(self) -> None:
        for mnt in self.pids:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for pid in self.pids.values():
            wait_gone(pid, 10, kill=True)


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.teardown()


def rich_ref(server) -> str:
    return f"127.0.0.1:{server.port}/rich:1"


def start_nodes(cluster: Cluster, ref: str, n: int, tmp: Path, token_file: Path, *, peers: bool,
                extra_peers: Sequence[str] = (), ports: list[int] | None = None) -> list[Path]:
    """Mount ``ref`` on ``n`` nodes at once; with ``peers`` each also serves its cache
    (on ``ports``, default free ones)."""
    ports = ports or free_ports(n)
    peers_file = tmp / "peers"
    peers_file.write_text("".join(f"http://127.0.0.1:{p}\n" for p in ports)
                          + "".join(u + "\n" for u in extra_peers))
    procs, points = [], []
    for i, port in enumerate(ports):
        mnt = tmp / f"node{i}"
        mnt.mkdir()
        args = ["mount", ref, str(mnt), "--cache", str(tmp / f"cache{i}"),
                "--timeout", "10", "--no-prefetch", "--log-file", str(tmp / f"node{i}.log")]
        if peers:
            args += ["--peers-file", str(peers_file), "--listen", f"127.0.0.1:{port}",
                     "--token-file", str(token_file)]
        procs.append(subprocess.Popen([sys.executable, "-m", "lazyfs", *args], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        points.append(mnt)
    for p, mnt in zip(procs, points, strict=True):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        cluster.pids[mnt] = int(re.search(r"\(pid (\d+),", out)[1])
    return points


def status(mnt: Path) -> dict:
    """What ``lazyfs status --json`` prints, without starting a process per call."""
    return json.loads(os.getxattr(mnt, "user.lazyfs.status"))


def files_of(image) -> list[bytes]:
    return sorted(p for p, e in image.expected.items() if e.kind == "file" and e.size)


def read_all(mnt: Path, image, files: list[bytes]) -> list[str]:
    """Read every file; return the problems (wrong bytes or errors)."""
    bad = []
    for f in files:
        try:
            digest = hashlib.sha256((mnt / os.fsdecode(f)).read_bytes()).hexdigest()
        except OSError as exc:
            bad.append(f"{mnt.name}/{f!r}: {exc}")
            continue
        if digest != image.expected[f].sha256:
            bad.append(f"{mnt.name}/{f!r}: wrong bytes")
    return bad


def read_everywhere(points: list[Path], image) -> list[str]:
    files = files_of(image)
    with ThreadPoolExecutor(len(points)) as pool:
        results = list(pool.map(lambda m: read_all(m, image, files), points))
    return [b for r in results for b in r]


NODES = 6


def test_a_cluster_asks_the_origin_about_once_per_chunk(origin, mounts, cluster, tmp_path, token_file):
    image, root, server = origin
    unique = unique_stored_bytes(root)
    points = start_nodes(cluster, rich_ref(server), NODES, tmp_path, token_file, peers=True)
    assert read_everywhere(points, image) == []
    sent = origin_range_bytes(server)
    fetch = [{k: status(m)["fetch"][k] for k in ("bytes_received", "peer_chunks", "hedged",
                                                         "hedge_wins", "peer_failures")} for m in points]
    assert sent <= 1.1 * unique, f"origin sent {sent} bytes for {unique} unique: {fetch}"
    st = mounts.status(points[0])
    assert set(st["bytes_by_source"]) >= {"cache", "origin"}
    assert any(k.startswith("peer http://127.0.0.1:") for k in st["bytes_by_source"])
    total_from_peers = sum(v for m in points for k, v in status(m)["bytes_by_source"].items()
                           if k.startswith("peer "))
    assert total_from_peers > 0
    print(f"\n{NODES} nodes with peers: origin sent {sent} bytes for {unique} unique "
          f"({sent / unique:.2f}x)")


def test_without_peers_every_node_asks_the_origin(origin, cluster, tmp_path, token_file):
    image, root, server = origin
    unique = unique_stored_bytes(root)
    # 4 nodes, not 6, to keep the suite short: ~4x still shows the test above can fail
    points = start_nodes(cluster, rich_ref(server), 4, tmp_path, token_file, peers=False)
    assert read_everywhere(points, image) == []
    sent = origin_range_bytes(server)
    assert sent > 3 * unique
    print(f"\n4 nodes without peers: origin sent {sent} bytes for {unique} unique "
          f"({sent / unique:.2f}x)")


def test_a_peer_killed_in_the_middle_fails_no_read(origin, cluster, tmp_path, token_file):
    image, _root, server = origin
    points = start_nodes(cluster, rich_ref(server), 2, tmp_path, token_file, peers=True)
    victim = cluster.pids[points[0]]
    files = files_of(image)
    half = len(files) // 2
    # the victim reads half the files (so it owns and holds chunks), then dies
    assert read_all(points[0], image, files[:half]) == []
    killer = threading.Timer(0.05, os.kill, (victim, signal.SIGKILL))
    killer.start()
    try:
        assert read_all(points[1], image, files) == []
    finally:
        killer.join()


class _Liar(BaseHTTPRequestHandler):
    """Answers every chunk request with the right length of wrong bytes."""

    def do_GET(self):  # noqa: N802
        n = int(self.path.split("stored=")[1].split("&")[0])
        body = os.urandom(n)
        self.send_response(206)
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Range", f"bytes 0-{n - 1}/{n}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_lying_peer_is_caught_reported_and_avoided(origin, cluster, tmp_path, token_file):
    image, _root, server = origin
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    liar_url = f"http://127.0.0.1:{liar.server_address[1]}"
    try:
        points = start_nodes(cluster, rich_ref(server), 2, tmp_path, token_file, peers=True,
                             extra_peers=[liar_url])
        assert read_everywhere(points, image) == []
    finally:
        liar.shutdown()
    reported = [m for m in points if liar_url in status(m)["peers"]["bad_peers"]]
    assert reported
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert f"peer {liar_url} sent wrong bytes" in logs


def test_lazyfs_peer_serves_only_with_the_token(origin, tmp_path, token_file):
    _image, root, server = origin
    chunk = max(index_of(root).all_chunks(), key=lambda c: c.stored_size)
    [port] = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(tmp_path / "cache0"),
                             "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        # the peer's cache is empty: the query says where the chunk lies, so it fetches it
        url = (f"http://127.0.0.1:{port}/v1/chunks/{chunk.hexdigest}?blob={chunk.blob.digest}"
               f"&offset={chunk.offset}&stored={chunk.stored_size}&size={chunk.size}"
               f"&codec={chunk.codec}&repo=127.0.0.1:{server.port}/rich")
        before = origin_range_bytes(server)
        wait_until(lambda: listening(port), 20, "lazyfs peer listening", alive=proc)
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token-0"}):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
            assert e.value.code == 401
            assert e.value.read() == b"cluster token required\n"
        ok = urllib.request.urlopen(urllib.request.Request(
            url, headers={"Authorization": f"Bearer {TOKEN}"}), timeout=5)
        assert ok.status == 200 and int(ok.headers["X-Lazyfs-Size"]) == chunk.size
        assert int(ok.headers["X-Lazyfs-Codec"]) == chunk.codec
        decode_verified(chunk, ok.read())
        # the 401s fetched nothing; the one good request fetched the chunk once
        assert origin_range_bytes(server) - before == chunk.stored_size
        bare = urllib.request.Request(url.split("?")[0], headers={"Authorization": f"Bearer {TOKEN}"})
        for _ in range(100):  # now from its cache (written just after the answer)
            try:
                again = urllib.request.urlopen(bare, timeout=5)
                break
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
                time.sleep(0.02)
        assert decode_verified(chunk, again.read())
        assert origin_range_bytes(server) - before == chunk.stored_size
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()


def test_peer_errors_are_one_line(tmp_path, token_file):
    bad = lazyfs("peer", "--listen", "127.0.0.1:1", "--token-file", str(tmp_path / "none"),
                 "--cache", str(tmp_path / "c"), check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("lazyfs: error: cannot read token file")
    assert len(bad.stderr.splitlines()) == 1
    (tmp_path / "mnt").mkdir()
    bad = lazyfs("mount", "127.0.0.1:1/x:1", str(tmp_path / "mnt"), "--peers-file", "/nonexistent",
                 "--token-file", str(token_file), check=False)
    assert bad.returncode == 2 and "peers file /nonexistent does not exist" in bad.stderr
    for args, message in ((["--advertise", "http://127.0.0.1:7070"], "--advertise needs --peers-file"),
                          (["--peers-file", str(token_file), "--token-file", str(token_file),
                            "--advertise", "127.0.0.1"], "--advertise: not a peer URL")):
        bad = lazyfs("mount", "127.0.0.1:1/x:1", str(tmp_path / "mnt"), *args, check=False)
        assert bad.returncode == 2 and bad.stderr.startswith(f"lazyfs: error: {message}"), bad.stderr
        assert len(bad.stderr.splitlines()) == 1
    print(json.dumps({"ok": True}))


def test_a_second_node_prefetches_from_the_first_not_the_origin(origin, mounts, tmp_path, token_file):
    """Issue 4: node A prefetches the image from the origin; node B, mounted afterwards
    with A as its peer, fills its whole cache from A. Chunks A owns are asked of A; chunks
    B owns are asked of the runner-up (A, with two nodes) cache-only."""
    image, root, server = origin
    unique = unique_stored_bytes(root)
    ports = free_ports(2)
    peers_file = tmp_path / "peers"
    peers_file.write_text("".join(f"http://127.0.0.1:{p}\n" for p in ports))
    ref = f"127.0.0.1:{server.port}/rich:1"
    points = []
    for name, port in zip(("a", "b"), ports, strict=True):
        mnt, _ = mounts.mount(ref, "--peers-file", str(peers_file), "--listen", f"127.0.0.1:{port}",
                              "--token-file", str(token_file), name=name, cache=tmp_path / f"cache-{name}")
        points.append(mnt)
        mounts.wait_complete(mnt, timeout=60)
        if name == "a":
            # B is not up yet: A finds it down and fetches B's chunks from the origin itself
            after_a = origin_range_bytes(server)
            assert after_a >= unique
    a, b = points
    extra = origin_range_bytes(server) - after_a
    st = mounts.status(b)
    from_a = st["bytes_by_source"][f"peer http://127.0.0.1:{ports[0]}"]
    print(f"\nsecond node: origin sent {extra} more bytes ({extra / unique:.2%} of {unique} unique); "
          f"{from_a} from the first node; fetch {st['fetch']}")
    assert extra == 0, st["fetch"]
    assert st["bytes_by_source"]["origin"] == 0
    assert from_a == unique + index_size(root)  # the index came from A too
    assert compare_tree(b, image.expected) == []
    assert origin_range_bytes(server) == after_a + extra  # reading B's files came from its cache


def _start(cluster: Cluster, server, tmp: Path, name: str, *args: str) -> Path:
    """One mount process (background, as a user starts it) with extra arguments."""
    mnt = tmp / name
    mnt.mkdir()
    done = lazyfs("mount", f"127.0.0.1:{server.port}/rich:1", str(mnt), "--cache", str(tmp / f"cache-{name}"),
                  "--timeout", "10", "--log-file", str(tmp / f"{name}.log"), *args)
    cluster.pids[mnt] = int(re.search(r"\(pid (\d+),", done.stdout)[1])
    return mnt


def test_advertise_names_a_node_that_listens_on_every_address(origin, cluster, tmp_path, token_file):
    """Both nodes listen on 0.0.0.0 and the peers file names them by 127.0.0.1. Node a
    says so with --advertise and never asks itself; node b does not, asks itself once,
    is told so by its own server (508) and learns its name."""
    image, root, server = origin
    unique = unique_stored_bytes(root)
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    peers_file = tmp_path / "peers"
    peers_file.write_text("".join(u + "\n" for u in urls))
    common = ["--no-prefetch", "--peers-file", str(peers_file), "--token-file", str(token_file)]
    a = _start(cluster, server, tmp_path, "a", *common, "--listen", f"0.0.0.0:{ports[0]}",
               "--advertise", urls[0])
    b = _start(cluster, server, tmp_path, "b", *common, "--listen", f"0.0.0.0:{ports[1]}")
    # a asked b for the image's index when b owns it, before b listened: a skips b for its
    # first backoff, fetching b's chunks from the origin meanwhile (b fetches them too)
    wait_until(lambda: status(a)["peers"]["peers"][urls[1]]["avoided_for"] == 0, 10,
               "a to stop skipping b", interval=0.1)
    assert read_everywhere([a, b], image) == []
    sa, sb = status(a), status(b)
    assert sa["peers"]["self"] == urls[0] and sa["peer_server"]["from_self"] == 0
    assert sb["peers"]["self"] == urls[1] and sb["peer_server"]["from_self"] >= 1
    assert "is this node" in (tmp_path / "b.log").read_text()
    # each served the other: with two nodes, each chunk came from the origin about once
    assert sa["peer_server"]["chunks_served"] > 0 and sb["peer_server"]["chunks_served"] > 0
    assert origin_range_bytes(server) <= 1.1 * unique
    # plain `lazyfs status` shows bytes by source: cache, the other peer, origin
    text = lazyfs("status", str(a)).stdout
    fetched = next(line for line in text.splitlines() if line.strip().startswith("fetched"))
    assert "origin" in fetched and "cache" in fetched and f"peer {urls[1]}" in fetched
    assert f"this node {urls[0]}" in text


def test_lazyfs_peer_advertise(tmp_path, token_file):
    [port] = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(tmp_path / "c"),
                             "--listen", f"0.0.0.0:{port}", "--advertise", f"127.0.0.1:{port}",
                             "--token-file", str(token_file)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        line = ""
        while "serving the chunks" not in line:
            assert time.monotonic() < deadline and proc.poll() is None
            line = proc.stderr.readline()
        assert line.rstrip().endswith(f"as http://127.0.0.1:{port}")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chunks/{'ab' * 32}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 404  # serves (an empty cache) at the advertised address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    bad = lazyfs("peer", "--listen", "127.0.0.1:0", "--advertise", "ftp://x", "--token-file",
                 str(token_file), "--cache", str(tmp_path / "c"), check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("lazyfs: error: --advertise: not a peer URL")
    assert len(bad.stderr.splitlines()) == 1


def test_a_changed_peers_file_is_read_again(origin, mounts, cluster, tmp_path, token_file):
    """Node b starts with a peers file naming itself alone; once a (with the whole image
    cached) is added to the file, b's reads come from a, not the origin."""
    image, root, server = origin
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    (tmp_path / "peers-a").write_text(urls[0] + "\n")
    a = _start(cluster, server, tmp_path, "a", "--peers-file", str(tmp_path / "peers-a"),
               "--listen", f"127.0.0.1:{ports[0]}", "--token-file", str(token_file))
    mounts.wait_complete(a, timeout=60)
    before = origin_range_bytes(server)
    peers_b = tmp_path / "peers-b"
    peers_b.write_text(urls[1] + "\n")
    b = _start(cluster, server, tmp_path, "b", "--no-prefetch", "--peers-file", str(peers_b),
               "--listen", f"127.0.0.1:{ports[1]}", "--token-file", str(token_file))
    assert list(status(b)["peers"]["peers"]) == [urls[1]]
    peers_b.write_text(f"# a joined\n{urls[1]}\n{urls[0]}\n")
    wait_until(lambda: urls[0] in status(b)["peers"]["peers"], 30, "the peers file read again", interval=0.2)
    assert read_all(b, image, files_of(image)) == []
    st = status(b)
    # b's own chunks come from the origin (it owns them); a's come from a
    assert st["bytes_by_source"][f"peer {urls[0]}"] > 0
    assert origin_range_bytes(server) - before == st["bytes_by_source"]["origin"]
    assert st["bytes_by_source"]["origin"] < unique_stored_bytes(root)
