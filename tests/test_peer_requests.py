"""Whatever bytes a caller sends the peer server, with the cluster token or without, they
end at most that caller's connection: never ``lazyfs peer``, never a ``mount --listen``.

Random request lines, targets, headers and framing go to the server in-process (many
examples, fast), to a ``lazyfs peer`` process, and the two requests that used to end a
mount go to a real one; after each, a good request must still be answered."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.store import ChunkStore
from lazyfs.peer import ChunkServer

from .conftest import ROOT
from .test_peers import files_of, free_ports

TOKEN = b"s3cret-cluster-token-0123456789"
AUTH = b"Bearer " + TOKEN
DIGEST = hashlib.sha256(b"the one chunk").digest()
DATA = random.Random(36).randbytes(2200)  # stored raw (lz4 does not pay): sent as it is
GOOD_PATH = b"/v1/chunks/" + DIGEST.hex().encode()
GOOD = b"GET " + GOOD_PATH + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH + b"\r\n\r\n"
# the two requests that ended a mount: urlsplit's ValueError, compare_digest's TypeError
ATTACKS = [b"GET //[::1/x HTTP/1.1\r\nAuthorization: " + AUTH + b"\r\n\r\n",
           GOOD.replace(b"\r\n\r\n", b"\r\nX-Lazyfs-Node: \xff\xfe\r\n\r\n")]


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, end the sending side, and return all the server answers until it
    closes (a server that hangs fails the test by the socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise
        except OSError:
            pass  # it answered and closed before taking everything (a head too large)
        out = b""
        try:
            while part := s.recv(65536):
                out += part
        except ConnectionResetError:
            pass  # closed with our unread bytes still in its buffer
        return out


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def assert_serves(port: int) -> None:
    answer = exchange(port, GOOD)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(DATA), answer[:200]


# -- what a hostile caller sends -------------------------------------------------------------

_junk = st.binary(max_size=40)
_text = st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass"))  # non-ASCII too
_methods = st.one_of(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"get", b"G\xffET", b"", b"*"]),
                     _junk)
_query = st.lists(
    st.tuples(st.sampled_from([b"blob", b"offset", b"stored", b"size", b"codec", b"repo", b"%zz", b""]),
              st.one_of(st.sampled_from([b"sha256:" + b"a" * 64, b"sha256:" + b"\xff" * 64, b"1", b"-1",
                                         b"9" * 5000, b"%ff%fe", b"%", b"%g0", b"[::1", b"127.0.0.1:1/x",
                                         b"\xd9\xa3"]),
                        _junk, _text)),
    max_size=6).map(lambda kv: b"&".join(k + b"=" + v for k, v in kv))
_targets = st.one_of(
    st.sampled_from([GOOD_PATH, b"//[::1/x", b"http://[::1/x", b"/v1/chunks/" + b"zz" * 32, b"/v1/chunks/%zz",
                     b"/v1/chunks/" + DIGEST.hex().upper().encode(), b"/v1/traces/sha256:" + b"0" * 64,
                     b"/v1/traces/%ff", b"*", b"", b"/" + b"a" * 20000, b"/v1/chunks/\xff\xfe"]),
    st.builds(lambda path, q: path + b"?" + q, st.sampled_from([GOOD_PATH, b"/", b"//[::1"]), _query),
    _junk, _text.map(lambda t: b"/" + t))
_versions = st.one_of(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""]),
                      _junk)
_headers = st.one_of(
    st.tuples(st.just(b"Authorization"),
              st.sampled_from([AUTH, b"Bearer wrong", b"\xff\xfe", AUTH + b"\xff", b""])),
    st.tuples(st.sampled_from([b"X-Lazyfs-Node", b"x-lazyfs-node"]),
              st.one_of(st.just(b"\xff\xfe"), _junk, _text)),
    st.tuples(st.just(b"Range"),
              st.one_of(st.sampled_from([b"bytes=0-", b"bytes=5-2", b"bytes=-5", b"bytes=\xc2\xb2-",
                                         b"bytes=" + b"9" * 5000 + b"-", b"chars=0-1", b"bytes=0-1,3-4",
                                         b"bytes=\xd9\xa3-", b"bytes=99999999-"]), _junk, _text)),
    st.tuples(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection", b"Host"]),
              st.one_of(st.sampled_from([b"0", b"5", b"chunked", b"close", b"-1", b"keep-alive"]), _junk)),
    st.tuples(st.sampled_from([b"", b" Host", b"Host ", b"\xff", b"A" * 20000]), _junk),
    st.tuples(_junk, _junk),
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.binary(max_size=400))
    if kind == 1:
        return draw(st.sampled_from([b"A", b"GET / HTTP/1.1\r\n"])) * draw(st.integers(16 << 10, 80 << 10))
    line = draw(_methods) + b" " + draw(_targets) + b" " + draw(_versions)
    if kind == 2:
        line = draw(_junk)
    headers = draw(st.lists(_headers, max_size=6))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"Authorization", AUTH))
    sep = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b"\n\r"]))
    colon = draw(st.sampled_from([b": "] * 6 + [b":", b" : ", b"", b":\t"]))
    head = sep.join([line, *(name + colon + value for name, value in headers)])
    end = draw(st.sampled_from([b"\r\n\r\n"] * 6 + [b"", b"\r\n", b"\n\n", b"\r\n\r\nGET"]))
    return head + end


# -- the server in-process, on its own trio loop in a thread --------------------------------

class ServerThread:
    """A ChunkServer serving one cached chunk; ``error`` is whatever ended its loop."""

    def __init__(self, store: ChunkStore) -> None:
        self.server = ChunkServer(store, TOKEN.decode(), node_id=os.urandom(8).hex())
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        async def main() -> None:
            listeners = await ChunkServer.listen_on("127.0.0.1", 0)
            self.port = listeners[0].socket.getsockname()[1]
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self.server.serve, listeners)
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def stop(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


@pytest.fixture
def served_chunk(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    assert ChunkStore(cache).put(DIGEST, DATA)
    return cache


@pytest.fixture
def in_process(served_chunk: Path) -> Iterator[ServerThread]:
    st_ = ServerThread(ChunkStore(served_chunk))
    yield st_
    st_.stop()


FUZZ = settings(max_examples=int(os.environ.get("LAZYFS_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("request_bytes", ATTACKS, ids=["bad-ipv6-target", "non-ascii-node-header"])
def test_the_requests_that_ended_a_mount_are_answered(in_process, request_bytes):
    # both are well-formed: no such path, and the chunk (the node id is not this node's)
    assert status_of(exchange(in_process.port, request_bytes)) in (404, 200)
    assert_serves(in_process.port)
    assert in_process.error is None


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/chunks/x HTTP/1.1\r\nAuthorization: " + AUTH + b"\r\nX-Lazyfs-Node \xff\r\n\r\n",
    b"GET /v1/chunks/\xff\xfe HTTP/1.1\r\nAuthorization: " + AUTH + b"\r\n\r\n",
    b"GET http://[::1/x HTTP/1.1\r\nAuthorization: " + AUTH + b"\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET " + GOOD_PATH + b" HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"GET " + GOOD_PATH + b" HTTP/1.1\r\n " + AUTH + b"\r\n\r\n",
])
def test_a_head_that_cannot_be_parsed_is_answered_400_and_its_connection_closed(in_process, request_bytes):
    with socket.create_connection(("127.0.0.1", in_process.port), timeout=15) as s:
        s.sendall(request_bytes)  # the sending side stays open: the server ends the connection
        answer = b""
        while part := s.recv(65536):
            answer += part
    head = answer.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nConnection: close" in head, answer
    assert in_process.server.stats.malformed == 1
    assert_serves(in_process.port)


def test_a_head_too_large_is_answered_400(in_process):
    answer = exchange(in_process.port, b"GET /" + b"a" * (20 << 10) + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"over" in answer
    assert_serves(in_process.port)


def test_an_unexpected_error_closes_that_connection_only_and_is_logged_once(served_chunk, caplog):
    class Failing(ChunkStore):
        fail = 1

        def get(self, digest):
            if self.fail:
                self.fail -= 1
                raise RuntimeError("a bug in the store")
            return super().get(digest)

    server = ServerThread(Failing(served_chunk))
    try:
        with caplog.at_level(logging.ERROR, logger="lazyfs.peer"):
            assert exchange(server.port, GOOD) == b""  # no answer: the connection is closed
            assert_serves(server.port)
    finally:
        server.stop()
    assert server.error is None
    assert server.server.stats.failed_connections == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "a bug in the store" in str(errors[0].exc_info[1])


def test_no_request_ends_the_in_process_server(in_process, caplog):
    @FUZZ
    @given(hostile_requests())
    def check(request_bytes: bytes) -> None:
        answer = exchange(in_process.port, request_bytes)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
        assert_serves(in_process.port)

    with caplog.at_level(logging.WARNING, logger="lazyfs.peer"):
        check()
    assert in_process.error is None
    # nothing a caller sends reaches the catch-all: every head is parsed or refused 400
    assert in_process.server.stats.failed_connections == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- a `lazyfs peer` process --------------------------------------------------------------------

def test_no_request_ends_lazyfs_peer(served_chunk, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    [port] = free_ports(1)
    log_path = tmp_path / "peer.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "peer", "--cache", str(served_chunk),
                                 "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file)],
                                cwd=ROOT, stderr=log_file)
    try:
        deadline = time.monotonic() + 20
        while "serving the chunks" not in log_path.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        for attack in ATTACKS:
            assert status_of(exchange(port, attack)) in (404, 200)

        @settings(FUZZ, max_examples=int(os.environ.get("LAZYFS_FUZZ_EXAMPLES", "60")))
        @given(hostile_requests())
        def check(request_bytes: bytes) -> None:
            answer = exchange(port, request_bytes)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
            assert proc.poll() is None, log_path.read_text()
            assert_serves(port)

        check()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    log_text = log_path.read_text()
    assert proc.returncode == 0, log_text
    assert "Traceback" not in log_text and "ERROR" not in log_text, log_text


# -- a real mount that serves its cache -----------------------------------------------------------

@pytest.mark.mount
def test_a_mount_that_listens_survives_the_requests_that_ended_it(served, mounts, tmp_path):
    image, _root, server = served
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    [port] = free_ports(1)
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--no-prefetch", "--listen", f"127.0.0.1:{port}",
                          "--token-file", str(token_file))
    for attack in ATTACKS:
        assert status_of(exchange(port, attack)) == 404  # (the chunk is not cached there)
    # the mount is still there and reads right, and its server still answers
    for f in files_of(image)[:3]:
        assert hashlib.sha256((mnt / os.fsdecode(f)).read_bytes()).hexdigest() == image.expected[f].sha256
    answer = exchange(port, GOOD)
    assert answer.startswith(b"HTTP/1.1 404 ") and b"not cached here" in answer
    assert "Traceback" not in mounts.log()
