"""An image's index through the peers: nodes starting one image at once take one copy of
the index from the origin (its owner's), a peer that lies about it is caught by its digest,
and a node never asks the origin while a peer is still fetching it for it.

Real mount processes on loopback in front of the test registry (``server.requests``
counts what the origin answered); the lying and slow peers are plain HTTP servers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blockindex.oci import Layout
from fetcher.peers import rendezvous
from testkit.waiting import listening, wait_until

from .conftest import ROOT
from .test_peers import (
    Cluster,
    files_of,
    free_ports,
    origin_range_bytes,
    read_all,
    read_everywhere,
    rich_ref,
    start_nodes,
    status,
    unique_stored_bytes,
)

pytestmark = pytest.mark.mount


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.teardown()


def index_blob(root: Path) -> tuple[str, int, bytes]:
    """The digest, size and bytes of the rich image's index."""
    layout = Layout(root / "rich")
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    desc = manifest["layers"][0]
    return desc["digest"], desc["size"], layout.blob_path(desc["digest"]).read_bytes()


def index_gets(server, digest: str) -> int:
    """Whole-blob GETs of the index the origin answered."""
    return sum(1 for method, path, _rng, status in server.requests
               if method == "GET" and path.endswith(f"/blobs/{digest}") and status == 200)


class Nodes:
    """Nodes as containerd nodes run them: each its own cache and ``lazyfs peer`` (started
    first, as the daemon it is), then one mount per node at once, whose peers are the
    ``lazyfs peer`` URLs and which knows its own (``--advertise``)."""

    def __init__(self, tmp: Path, token_file: Path) -> None:
        self.tmp = tmp
        self.token_file = token_file
        self.daemons: list[subprocess.Popen] = []
        self.mounts = Cluster()

    def start(self, server, n: int) -> list[Path]:
        ports = free_ports(n)
        self.urls = [f"http://127.0.0.1:{p}" for p in ports]
        peers_file = self.tmp / "peers"
        peers_file.write_text("".join(u + "\n" for u in self.urls))
        for i, port in enumerate(ports):
            with open(self.tmp / f"peer{i}.log", "w") as log:
                self.daemons.append(subprocess.Popen(
                    [sys.executable, "-m", "lazyfs", "peer", "--cache", str(self.tmp / f"cache{i}"),
                     "--listen", f"127.0.0.1:{port}", "--token-file", str(self.token_file)],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log))
        for port, proc in zip(ports, self.daemons, strict=True):
            wait_until(lambda port=port: listening(port), 30, "lazyfs peer listening", alive=proc)
        procs, points = [], []
        for i, url in enumerate(self.urls):
            mnt = self.tmp / f"node{i}"
            mnt.mkdir()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "lazyfs", "mount", f"127.0.0.1:{server.port}/rich:1", str(mnt),
                 "--cache", str(self.tmp / f"cache{i}"), "--timeout", "10", "--no-prefetch",
                 "--log-file", str(self.tmp / f"node{i}.log"), "--peers-file", str(peers_file),
                 "--token-file", str(self.token_file), "--advertise", url],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            points.append(mnt)
        for p, mnt in zip(procs, points, strict=True):
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            self.mounts.pids[mnt] = int(re.search(r"\(pid (\d+),", out)[1])
        return points

    def stop(self) -> None:
        self.mounts.teardown()
        for proc in self.daemons:
            proc.send_signal(signal.SIGTERM)
        for proc in self.daemons:
            proc.wait(timeout=10)

    def log(self) -> str:
        return "".join(f.read_text() for f in sorted(self.tmp.glob("*.log")))


@pytest.fixture
def nodes(tmp_path, token_file):
    n = Nodes(tmp_path, token_file)
    yield n
    n.stop()


def test_a_cluster_takes_one_index_and_one_copy_of_each_chunk_from_the_origin(origin, nodes):
    image, root, server = origin
    digest, size, _ = index_blob(root)
    unique = unique_stored_bytes(root)
    points = nodes.start(server, 4)
    assert index_gets(server, digest) == 1, server.requests
    assert read_everywhere(points, image) == []
    from_peers = sum(v for m in points for k, v in status(m)["bytes_by_source"].items()
                     if k.startswith("peer "))
    assert from_peers >= 3 * size  # the three nodes that do not own it got it from a peer
    sent = origin_range_bytes(server)
    assert sent <= 1.1 * unique, f"origin sent {sent} chunk bytes for {unique} unique"


class _BlobPeer(BaseHTTPRequestHandler):
    """A peer that answers blob requests with ``body`` (after ``delay`` seconds)."""

    body = b""
    delay = 0.0
    asked: list[str]

    def do_GET(self):  # noqa: N802
        self.asked.append(self.path)
        time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _owning_peer(digest: str, node_url: str, body: bytes,
                 delay: float) -> tuple[ThreadingHTTPServer, list[str]]:
    """A ``_BlobPeer`` on a port that makes it the owner of ``digest`` before ``node_url``."""
    asked: list[str] = []
    handler = type("Peer", (_BlobPeer,), {"body": body, "delay": delay, "asked": asked})
    key = bytes.fromhex(digest.partition(":")[2])
    for _ in range(50):
        peer = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        url = f"http://127.0.0.1:{peer.server_address[1]}"
        if rendezvous(key, [url, node_url])[0] == url:
            threading.Thread(target=peer.serve_forever, daemon=True).start()
            return peer, asked
        peer.server_close()
    raise AssertionError("no port made the peer the owner")


@pytest.mark.parametrize("lies", [True, False], ids=["lying", "slow"])
def test_the_index_owner_is_asked_first_and_checked(origin, cluster, tmp_path, token_file, lies):
    """The peer that owns the index is asked for it, alone: the origin is not asked while
    it is sending (slowly). A peer whose index does not match its digest is caught, marked
    bad, and the index comes from the origin; either way the mount serves the right tree."""
    image, root, server = origin
    digest, size, data = index_blob(root)
    [port] = free_ports(1)
    node_url = f"http://127.0.0.1:{port}"
    body = bytes(b ^ 0xFF for b in data[:64]) + data[64:] if lies else data
    peer, asked = _owning_peer(digest, node_url, body, delay=0 if lies else 1.5)
    peer_url = f"http://127.0.0.1:{peer.server_address[1]}"
    try:
        [mnt] = start_nodes(cluster, rich_ref(server), 1, tmp_path, token_file, peers=True,
                            extra_peers=[peer_url], ports=[port])
    finally:
        peer.shutdown()
    assert [p.split("?")[0] for p in asked] == [f"/v1/blobs/{digest}"]
    assert f"size={size}" in asked[0]
    st = status(mnt)
    if lies:
        assert index_gets(server, digest) == 1
        assert peer_url in st["peers"]["bad_peers"]
        log = (tmp_path / "node0.log").read_text()
        assert f"peer {peer_url} sent wrong bytes for blob {digest}" in log
    else:
        assert index_gets(server, digest) == 0
        assert st["bytes_by_source"][f"peer {peer_url}"] >= size
    assert read_all(mnt, image, files_of(image)) == []
