"""Peers serve the chunks of images nobody converted: three mount processes on loopback
(separate caches and ports, each serving its cache) in front of a real registry, reading a
side-indexed gzip image and an eStargz image, take each chunk from the registry about
once between them and read every file right; a peer that answers wrong plain bytes is
caught by the chunk's digest and the read goes on to the next source."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from blockindex.format import CODEC_GZIP_MEMBER, CODEC_GZIP_SPAN
from blockindex.reader import IndexReader
from fetcher.peerwire import END, OK, frame, parse_batch_body
from testkit import imagegen
from testkit.estargz import push_estargz, write_estargz
from testkit.layermerge import merge
from testkit.registryd import Registry, needs_registry
from testkit.treecompare import compare_tree

from .conftest import lazyfs
from .test_estargz_registry import CHUNK, _whole_seconds
from .test_peers import Cluster, start_nodes, status

pytestmark = [needs_registry, pytest.mark.mount]

NODES = 3


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    return imagegen.build_rich_image(tmp_path_factory.mktemp("peerrich") / "rich.tar")


@pytest.fixture(scope="module")
def rich_estargz():
    layers = _whole_seconds(imagegen.rich_layers())
    return [write_estargz(layer, chunk_size=CHUNK) for layer in layers], merge(layers)


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.teardown()


def _layer_bytes(registry: Registry, layers: set[str]) -> int:
    """Bytes of ``layers`` the registry sent (every GET of them, ranges or whole)."""
    return sum(int(m[2]) for m in re.finditer(r'"GET \S+/blobs/(sha256:\w+) HTTP/[\d.]+" 20\d (\d+)',
                                               registry.log()) if m[1] in layers)


def _read_everywhere(points: list[Path], expected) -> list[str]:
    with ThreadPoolExecutor(len(points)) as pool:
        return [d for diffs in pool.map(lambda m: compare_tree(m, expected), points) for d in diffs]


def _index(cache: Path) -> IndexReader:
    [path] = (cache / "indexes").iterdir()
    return IndexReader(path)


def _side_indexed(registry: Registry, rich) -> str:
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    lazyfs("index", f"docker://{registry.host}/app:1", "--chunk-size", "64K", "--spacing", "64K")
    return f"{registry.host}/app:1"


def _origin_per_node(registry, cluster, tmp: Path, token_file: Path, ref: str, expected, codec: int
                     ) -> tuple[float, list[Path]]:
    """The layer bytes the registry sent to ``NODES`` nodes with peers reading every file,
    over what one node alone took before them (a node of its own, no peers)."""
    [alone] = start_nodes(cluster, ref, 1, tmp / "alone", token_file, peers=False)
    assert compare_tree(alone, expected) == []
    layers = {c.blob.digest for c in _index(tmp / "alone" / "cache0").all_chunks()}
    assert {c.codec for c in _index(tmp / "alone" / "cache0").all_chunks()} >= {codec}
    one = _layer_bytes(registry, layers)
    assert one > 0
    points = start_nodes(cluster, ref, NODES, tmp / "cluster", token_file, peers=True)
    assert _read_everywhere(points, expected) == []
    return (_layer_bytes(registry, layers) - one) / one, points


def _from_peers(points: list[Path], but: str = "-") -> int:
    """Bytes the mounts at ``points`` took from peers (other than ``but``)."""
    return sum(v for m in points for k, v in status(m)["bytes_by_source"].items()
               if k.startswith("peer ") and but not in k)


@pytest.fixture
def dirs(tmp_path):
    for d in ("alone", "cluster"):
        (tmp_path / d).mkdir()
    return tmp_path


def test_a_cluster_takes_a_side_indexed_image_from_the_registry_about_once(
        registry, rich, cluster, dirs, token_file):
    ref = _side_indexed(registry, rich)
    ratio, points = _origin_per_node(registry, cluster, dirs, token_file, ref, rich.expected, CODEC_GZIP_SPAN)
    assert ratio <= 1.4, f"{NODES} nodes took {ratio:.2f}x one node's layer bytes"
    assert _from_peers(points) > 0
    assert all(status(m)["fetch"]["peer_integrity_failures"] == 0 for m in points)


def test_a_cluster_takes_an_estargz_image_from_the_registry_about_once(
        registry, rich_estargz, cluster, dirs, token_file):
    blobs, expected = rich_estargz
    push_estargz(registry, dirs, blobs, "esgz:1")
    ref = f"{registry.host}/esgz:1"
    ratio, points = _origin_per_node(registry, cluster, dirs, token_file, ref, expected, CODEC_GZIP_MEMBER)
    assert ratio <= 1.4, f"{NODES} nodes took {ratio:.2f}x one node's layer bytes"
    assert _from_peers(points) > 0


class _PlainLiar(BaseHTTPRequestHandler):
    """Answers every chunk, alone or in a batch, with as many wrong bytes as its plain size."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        n = int(parse_qs(urlsplit(self.path).query)["size"][0])
        self.send_response(206)
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Range", f"bytes 0-{n - 1}/{n}")
        self.end_headers()
        self.wfile.write(os.urandom(n))

    def do_POST(self):  # noqa: N802
        chunks, _, _, _ = parse_batch_body(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        for c in chunks:
            self.wfile.write(b"".join(frame(c.digest, OK, 0, c.size, os.urandom(c.size))))
        self.wfile.write(b"".join(frame(bytes(32), END)))
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_peer_that_sends_wrong_plain_bytes_is_caught(registry, rich, cluster, tmp_path, token_file):
    ref = _side_indexed(registry, rich)
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _PlainLiar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    liar_url = f"http://127.0.0.1:{liar.server_address[1]}"
    try:
        points = start_nodes(cluster, ref, 2, tmp_path, token_file, peers=True, extra_peers=[liar_url])
        assert _read_everywhere(points, rich.expected) == []
    finally:
        liar.shutdown()
    assert any(liar_url in status(m)["peers"]["bad_peers"] for m in points)
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert f"peer {liar_url} sent wrong bytes" in logs
    assert all(status(m)["fetch"]["integrity_failures"] == 0 for m in points)
    assert _from_peers(points, but=liar_url) > 0  # the honest peers served what the liar did not
