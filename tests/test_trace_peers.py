"""Traces shared by peers: a node serves the traces in its cache by manifest digest to
callers with the cluster token; a cold mount with no trace of its own gets one from a peer
(the registry offering none), replays it, keeps it and serves it on; a peer that sends
garbage is logged and ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from cache.store import ChunkStore
from cache.trace import MAX_TRACE_BYTES, Run, Trace, TraceEntry, TraceError, TraceStore
from fetcher.errors import AuthError, NotFoundError, ServerError
from fetcher.peers import PeerClient
from lazyfs.learned import checked_trace
from lazyfs.peer import ChunkServer
from testkit.registryd import Registry, needs_registry
from testkit.waiting import listening, wait_until

from .conftest import ROOT, lazyfs
from .test_mount import index_of
from .test_peers import free_ports
from .test_trace_mount import make_rootfs, read_all
from .test_trace_mount import traced as _traced

traced = _traced  # the fixture: an image of 60 files, served, and a workload of 20

TOKEN = "s3cret-cluster-token-0123456789"
M = "sha256:" + "ab" * 32


def _trace(manifest: str, chunks: list[str]) -> Trace:
    entries = tuple(TraceEntry(chunk=c, file="f", offset=0, t=i / 10, bytes=10) for i, c in enumerate(chunks))
    return Trace(manifest, [Run("2026-01-01T00:00:00Z", 30.0, entries, "recorded")])


def test_trace_endpoint_serves_checked_traces_with_the_token(tmp_path):
    cache = tmp_path / "cache"
    store = ChunkStore(cache)
    TraceStore(cache).save(_trace(M, ["cd" * 32, "ef" * 32]))
    other = "sha256:" + "12" * 32
    TraceStore(cache).path(other).write_bytes(b"{rotten")  # a bad file here is not served

    async def main() -> None:
        server = ChunkServer(store, TOKEN)
        listeners = await ChunkServer.listen_on("127.0.0.1", 0)
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        client, stranger = PeerClient(TOKEN), PeerClient("not-the-cluster-token-000")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listeners)
            data = await client.fetch_trace(url, M, MAX_TRACE_BYTES)
            got = Trace.parse(bytes(data), M)
            assert [e.chunk for e in got.merged()] == ["cd" * 32, "ef" * 32]
            assert "source" not in json.loads(data)["runs"][0]  # provenance stays on the node
            with pytest.raises(AuthError):
                await stranger.fetch_trace(url, M, MAX_TRACE_BYTES)
            for missing in (other, "sha256:" + "00" * 32):
                with pytest.raises(NotFoundError):
                    await client.fetch_trace(url, missing, MAX_TRACE_BYTES)
            with pytest.raises(ServerError, match="over the 100-byte limit"):
                await client.fetch_trace(url, M, 100)
            with pytest.raises(ServerError, match="unexpected status 400"):
                await client.fetch_trace(url, "sha256:nothex", MAX_TRACE_BYTES)
            nursery.cancel_scope.cancel()
        await client.aclose()
        await stranger.aclose()
        s = server.stats
        assert (s.traces_served, s.unauthorized, s.not_found) == (2, 1, 2)  # the over-limit one too

    trio.run(main)


def test_checked_trace_keeps_only_chunks_of_the_image(traced, tmp_path, caplog):
    _rootfs, _work, _server, digest = traced
    index = index_of(tmp_path / "images", "app")
    mine = [c.hexdigest for c in list(index.all_chunks())[:3]]
    index.close()
    index_path = index.path
    mixed = _trace(digest, [mine[0], "00" * 32, mine[1], "11" * 32, mine[2]])
    got = checked_trace(mixed.to_json(sources=False), digest, index_path, "peer http://10.0.0.9:7070")
    assert [e.chunk for e in got.merged()] == mine
    assert got.runs[0].source == "peer http://10.0.0.9:7070"
    assert "names 2 chunks the image does not have" in caplog.text
    with pytest.raises(TraceError, match="none of its 2 chunks"):
        checked_trace(_trace(digest, ["00" * 32, "11" * 32]).to_json(), digest, index_path, "peer x")
    with pytest.raises(TraceError, match="names no chunks"):
        checked_trace(Trace(digest, [Run("", None, ())]).to_json(), digest, index_path, "peer x")
    with pytest.raises(TraceError, match="for image"):
        checked_trace(_trace(M, mine).to_json(), digest, index_path, "peer x")


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_trace_recorded_on_one_node_leads_the_cold_mount_of_another(traced, mounts, tmp_path):
    rootfs, work, server, digest = traced
    ref = f"127.0.0.1:{server.port}/app:1"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port_a, port_b = free_ports(2)
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"

    # node A: a cold run, fetch on read, recorded until unmounted (the run without a trace)
    cache_a = tmp_path / "cache-a"
    mnt, _ = mounts.mount(ref, "--no-prefetch", "--record", cache=cache_a, name="a")
    read_all(mnt, rootfs, work)
    without = mounts.status(mnt)["reads"]["chunk_misses"]
    assert without > 0
    lazyfs("umount", str(mnt))
    mounts.points.remove(mnt)
    recorded = json.loads(lazyfs("trace", "show", ref, "--cache", str(cache_a), "--json").stdout)
    assert [r["source"] for r in recorded["runs"]] == ["recorded"]

    # A's cache served by `lazyfs peer`
    peer = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(cache_a),
                             "--listen", f"127.0.0.1:{port_a}", "--token-file", str(token_file)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: listening(port_a), 30, "lazyfs peer listening", alive=peer)
        # no token (or a wrong one): 401 and no trace
        for token in (None, "wrong-token-wrong-token-0"):
            status, body = _get(f"{url_a}/v1/traces/{digest}", token)
            assert status == 401 and body == b"cluster token required\n"
        status, body = _get(f"{url_a}/v1/traces/{digest}", TOKEN)
        assert status == 200 and json.loads(body)["manifest"] == digest

        # node B: a fresh cache, A in its peers file, a registry with no referrer
        peers_b = tmp_path / "peers-b"
        peers_b.write_text(f"{url_a}\n{url_b}\n")
        cache_b = tmp_path / "cache-b"
        mnt_b, _ = mounts.mount(ref, "--prefetch", "trace", "--peers-file", str(peers_b),
                                "--listen", f"127.0.0.1:{port_b}", "--token-file", str(token_file),
                                cache=cache_b, name="b")
        wait_until(lambda: mounts.status(mnt_b)["trace"]["lead_state"] == "done", 60, "the learned order")
        read_all(mnt_b, rootfs, work)
        st = mounts.status(mnt_b)
    finally:
        peer.send_signal(signal.SIGTERM)
        peer.wait(timeout=10)
    t = st["trace"]
    assert t["lead_source"] == f"peer {url_a}"
    assert t["lead_chunks"] == recorded["chunks"]
    assert [r["source"] for r in t["lead_runs"]] == [f"peer {url_a}"]
    assert t["lead_misses"] == 0
    with_trace = st["reads"]["chunk_misses"]
    assert with_trace < without, (with_trace, without)
    print(f"\ndemand misses of the cold run: {without} without a trace, {with_trace} with A's")
    assert "Traceback" not in mounts.log("b")
    # B keeps it, says where it came from, and serves it on (from its mount's --listen)
    shown = lazyfs("trace", "show", ref, "--cache", str(cache_b)).stdout
    assert f"from peer {url_a}" in shown
    assert f"from peer {url_a}" in lazyfs("status", str(mnt_b)).stdout
    peers_c = tmp_path / "peers-c"
    peers_c.write_text(f"{url_b}\n")
    mnt_c, _ = mounts.mount(ref, "--prefetch", "trace", "--peers-file", str(peers_c),
                            "--token-file", str(token_file), cache=tmp_path / "cache-c", name="c")
    wait_until(lambda: mounts.status(mnt_c)["trace"]["lead_state"] == "done", 60, "the learned order")
    tc = mounts.status(mnt_c)["trace"]
    assert tc["lead_source"] == f"peer {url_b}" and tc["lead_chunks"] == recorded["chunks"]
    assert mounts.status(mnt_b)["peer_server"]["traces_served"] == 1


class _Garbage(BaseHTTPRequestHandler):
    """A peer whose traces are garbage of one kind (``kind``); it has no chunks."""

    kind = ""
    manifest = ""

    def do_GET(self):  # noqa: N802
        if not self.path.startswith("/v1/traces/"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.kind == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(MAX_TRACE_BYTES + 1))
            self.end_headers()
            return
        body = {
            "not-json": b"\x00{garbage",
            "not-a-trace": b'{"not": "a trace"}',
            "other-image": _trace("sha256:" + "77" * 32, ["aa" * 32]).to_json(),
            "other-chunks": _trace(self.manifest, [os.urandom(32).hex() for _ in range(5)]).to_json(),
        }[self.kind]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_peers_that_serve_garbage_traces_are_ignored(traced, mounts, tmp_path):
    rootfs, work, server, digest = traced
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    liars = {}
    for kind in ("not-json", "not-a-trace", "other-image", "other-chunks", "huge"):
        handler = type(f"Garbage_{kind}", (_Garbage,), {"kind": kind, "manifest": digest})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        liars[kind] = (f"http://127.0.0.1:{httpd.server_address[1]}", httpd)
    [down] = free_ports(1)  # nothing listens there
    try:
        peers = tmp_path / "peers"
        peers.write_text("".join(url + "\n" for url, _ in liars.values()) + f"http://127.0.0.1:{down}\n")
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/app:1", "--prefetch", "trace", "--record-window", "0",
                              "--peers-file", str(peers), "--token-file", str(token_file))
        wait_until(lambda: mounts.status(mnt)["trace"]["lead_state"] == "done", 60, "the learned order")
        read_all(mnt, rootfs, work[:4])  # reads work (from the origin)
        st = mounts.status(mnt)
    finally:
        for _, httpd in liars.values():
            httpd.shutdown()
    assert st["trace"]["lead_source"] is None and st["trace"]["lead_chunks"] == 0
    log = mounts.log()
    for kind, (url, _) in liars.items():
        if kind == "huge":
            assert f"could not get the trace of {digest} from peer {url}" in log
            assert "over the" in log
        else:
            assert f"peer {url} sent a trace of {digest} that is not usable" in log, kind
    assert "none of its 5 chunks is a chunk of this image" in log
    assert f"peer http://127.0.0.1:{down}: cannot connect" in log  # down: skipped
    assert "Traceback" not in log
    assert not (tmp_path / "cache" / "traces" / (digest.removeprefix("sha256:") + ".json")).exists()


@needs_registry
def test_a_peer_trace_and_the_registry_trace_merge_by_run(mounts, tmp_path):
    """The registry holds run 1 (pushed); peer A holds runs 1 and 2. A fresh node gets
    both, keeps run 1 once (under the registry's name) and run 2 from A."""
    registry = Registry(tmp_path, name="registry-peertrace")
    try:
        rootfs = tmp_path / "rootfs"
        work = make_rootfs(rootfs)
        ref = f"{registry.host}/app:1"
        lazyfs("convert", f"dir:{rootfs}", f"docker://{ref}", "--chunk-size", "64K")
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        cache_a = tmp_path / "cache-a"
        for i, files in enumerate((work[:8], work[4:])):
            mnt, _ = mounts.mount(ref, "--no-prefetch", "--record", cache=cache_a, name=f"a{i}")
            read_all(mnt, rootfs, files)
            lazyfs("umount", str(mnt))
            mounts.points.remove(mnt)
            if i == 0:
                lazyfs("trace", "push", ref, "--cache", str(cache_a))
            # runs are told apart by the second they were recorded in (the one just
            # unmounted was recorded by now): the next one is recorded in a later second
            done_at = int(time.time())
            wait_until(lambda: int(time.time()) > done_at, 5, "the next second")  # noqa: B023
        runs_a = json.loads(lazyfs("trace", "show", ref, "--cache", str(cache_a), "--json").stdout)["runs"]
        assert len(runs_a) == 2
        [port_a] = free_ports(1)
        url_a = f"http://127.0.0.1:{port_a}"
        peer = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(cache_a),
                                 "--listen", f"127.0.0.1:{port_a}", "--token-file", str(token_file)],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: listening(port_a), 30, "lazyfs peer listening", alive=peer)
            (tmp_path / "peers").write_text(url_a + "\n")
            mnt, _ = mounts.mount(ref, "--prefetch", "trace", "--record-window", "0", "--peers-file",
                                  str(tmp_path / "peers"), "--token-file", str(token_file),
                                  cache=tmp_path / "cache-b", name="b")
            wait_until(lambda: mounts.status(mnt)["trace"]["lead_state"] == "done", 60, "the learned order")
            t = mounts.status(mnt)["trace"]
        finally:
            peer.send_signal(signal.SIGTERM)
            peer.wait(timeout=10)
    finally:
        registry.stop()
    assert t["lead_source"] == f"registry+peer {url_a}"
    assert [(r["recorded"], r["source"]) for r in t["lead_runs"]] == [
        (runs_a[0]["recorded"], "registry"), (runs_a[1]["recorded"], f"peer {url_a}")]
    shown = json.loads(lazyfs("trace", "show", ref, "--cache", str(tmp_path / "cache-b"), "--json").stdout)
    assert [r["source"] for r in shown["runs"]] == ["registry", f"peer {url_a}"]
