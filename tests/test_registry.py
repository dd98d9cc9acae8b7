"""The registry client against the real local server, and against scripted transports
for what a healthy server never does (errors, auth, wrong ranges)."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from blockindex.oci import (
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Layout,
    canonical_json,
    host_platform,
)
from fetcher.errors import (
    AuthError,
    FetchError,
    IntegrityError,
    NotFoundError,
    ServerError,
    UnreachableError,
)
from fetcher.imageref import ImageRef
from fetcher.registry import RegistryClient, RetryPolicy, resolve_image_manifest, tls_context
from lazyfs.serve import ServerHandle
from lazyfs.snapshotter import client as snapshotter_client
from testkit import treecompare

from .conftest import Image

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, max_retry_after=0.05)


def _mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.05)


def run(server_url: str, name: str, fn: Callable[[RegistryClient], Any],
        timing: dict[str, float] | None = None, **kw: Any) -> Any:
    """Run ``fn`` with a client. With ``timing``, trio's clock is a mock that jumps ahead
    whenever every task waits, and ``timing["elapsed"]`` is the virtual time the call
    took: deadlines are checked exactly, without waiting for them."""
    ref = ImageRef.parse(server_url.removeprefix("http://") + f"/{name}:1")

    async def main() -> Any:
        start = trio.current_time()
        try:
            async with RegistryClient(ref, retry=FAST_RETRY, **kw) as client:
                return await fn(client)
        finally:
            if timing is not None:
                timing["elapsed"] = trio.current_time() - start

    return trio.run(main, clock=_mock_clock() if timing is not None else None)


# -- against the real server ------------------------------------------------------------


@pytest.mark.parametrize("name", ["app", "team/app"])
def test_manifest_by_tag_and_digest(server: ServerHandle, images: dict[str, Image],
                                    name: str) -> None:
    image = images[name]

    async def both(client: RegistryClient) -> tuple[Any, Any]:
        return await client.get_manifest(), await client.get_manifest(image.manifest_digest)

    by_tag, by_digest = run(server.url, name, both)
    assert by_tag == by_digest
    assert by_tag.data == image.manifest
    assert by_tag.media_type == MEDIA_TYPE_OCI_MANIFEST
    assert by_tag.digest == image.manifest_digest


def test_read_blob_and_ranges(server: ServerHandle, images: dict[str, Image]) -> None:
    image = images["app"]
    data = image.blobs[image.big]
    cases = [(0, 1), (0, len(data)), (1, 100), (len(data) - 7, 7), (65535, 70000)]

    async def reads(client: RegistryClient) -> tuple[bytes, list[bytes]]:
        whole = await client.read_blob(image.big)
        parts = [bytes(await client.read_range(image.big, o, n)) for o, n in cases]
        assert await client.read_range(image.big, 5, 0) == b""
        return whole, parts

    whole, parts = run(server.url, "app", reads)
    assert whole == data
    assert parts == [data[o : o + n] for o, n in cases]
    ranges = [r[2] for r in server.requests if r[2]]
    assert ranges == [f"bytes={o}-{o + n - 1}" for o, n in cases]


@pytest.mark.parametrize(
    ("name", "call", "message"),
    [
        ("nope", lambda c: c.get_manifest(), "nope: no manifest 1"),
        ("app", lambda c: c.get_manifest("2"), "app: no manifest 2"),
        ("app", lambda c: c.read_blob("sha256:" + "0" * 64), "no blob sha256:000"),
        ("app", lambda c: c.read_range("sha256:" + "0" * 64, 0, 1), "no blob sha256:000"),
    ],
)
def test_unknown_is_not_found(server: ServerHandle, images: dict[str, Image], name: str,
                              call: Callable[[RegistryClient], Any], message: str) -> None:
    with pytest.raises(NotFoundError, match=message):
        run(server.url, name, call)


def test_range_past_end_is_server_error(server: ServerHandle, images: dict[str, Image]) -> None:
    image = images["app"]
    size = len(image.blobs[image.big])
    with pytest.raises(ServerError, match="past the end"):
        run(server.url, "app", lambda c: c.read_range(image.big, size, 10))
    with pytest.raises(ServerError):  # starts inside, runs past: a short 206
        run(server.url, "app", lambda c: c.read_range(image.big, size - 5, 10))


def test_corrupt_blob_is_integrity_error(server: ServerHandle, images: dict[str, Image]) -> None:
    image = images["app"]
    path = image.layout.blob_path(image.big)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    with pytest.raises(IntegrityError, match="does not match"):
        run(server.url, "app", lambda c: c.read_blob(image.big))


def test_blob_over_max_size_refused(server: ServerHandle, images: dict[str, Image]) -> None:
    image = images["app"]
    with pytest.raises(ServerError, match="limit"):
        run(server.url, "app", lambda c: c.read_blob(image.big, max_size=1000))


def test_manifest_digest_mismatch_is_integrity_error(server: ServerHandle,
                                                     images: dict[str, Image]) -> None:
    image = images["app"]
    image.layout.blob_path(image.manifest_digest).write_bytes(image.manifest + b" ")
    with pytest.raises(IntegrityError):
        run(server.url, "app", lambda c: c.get_manifest(image.manifest_digest))


@pytest.mark.mount
def test_a_mount_of_a_multi_platform_image_fetches_its_index_once(served, mounts):
    image, root, server = served
    layout = Layout(root / "rich")
    target = layout.resolve("1")
    index = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [
        {**target, "digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": "mips"}},
        {**target, "platform": dict(zip(("os", "architecture"), host_platform().split("/"), strict=True))},
    ]})
    layout.tag(layout.write_blob(index, MEDIA_TYPE_OCI_INDEX), "multi")
    ref = f"127.0.0.1:{server.port}/rich:multi"

    def manifest_gets() -> list[str]:
        return [path for method, path, _, _ in server.requests if "/manifests/" in path]

    mnt, _ = mounts.mount(ref, "--no-prefetch")
    assert treecompare.compare_tree(mnt, image.expected) == []
    assert manifest_gets() == ["/v2/rich/manifests/multi", f"/v2/rich/manifests/{target['digest']}"]
    # the snapshotter's pull resolves it the same way
    server.requests.clear()
    assert snapshotter_client._fetch(ImageRef.parse(ref))[1] == target["digest"]
    assert manifest_gets() == ["/v2/rich/manifests/multi", f"/v2/rich/manifests/{target['digest']}"]


def test_resolve_image_manifest_follows_an_index(server: ServerHandle,
                                                 images: dict[str, Image]) -> None:
    image = images["app"]
    target = {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": image.manifest_digest,
              "size": len(image.manifest)}
    index = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [
        {**target, "digest": "sha256:" + "1" * 64, "platform": {"os": "linux",
                                                                "architecture": "arm64"}},
        {**target, "platform": {"os": "linux", "architecture": "amd64"}},
    ]})
    image.layout.tag(image.layout.write_blob(index, MEDIA_TYPE_OCI_INDEX), "multi")
    ref = ImageRef.parse(server.url.removeprefix("http://") + "/app:multi")

    async def main() -> Any:
        async with RegistryClient(ref) as client:
            assert (await client.get_manifest()).media_type == MEDIA_TYPE_OCI_INDEX
            found = await resolve_image_manifest(client, ref)
            with pytest.raises(NotFoundError, match="linux/s390x"):
                await resolve_image_manifest(client, ref, "linux/s390x")
            return found

    assert trio.run(main).digest == image.manifest_digest


# -- unreachable and silent sources -----------------------------------------------------


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_unreachable_at_once() -> None:
    timing: dict[str, float] = {}
    with pytest.raises(UnreachableError, match="cannot reach registry 127.0.0.1"):
        run(f"127.0.0.1:{unused_port()}", "app", lambda c: c.get_manifest(), timing)
    assert timing["elapsed"] < 1  # no retries with backoff: the caller can fail over


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes | None], int]]:
    """A TCP server answering every request with fixed bytes (None: never answering)."""
    socks: list[socket.socket] = []

    def start(answer: bytes | None) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        socks.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                socks.append(conn)
                conn.recv(65536)
                if answer is not None:
                    conn.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for s in socks:
        s.close()


def test_silent_server_is_unreachable_within_timeout(raw_server: Any) -> None:
    port = raw_server(None)
    timing: dict[str, float] = {}
    with pytest.raises(UnreachableError, match="did not answer"):
        run(f"127.0.0.1:{port}", "app", lambda c: c.get_manifest(), timing, timeout=0.5)
    assert timing["elapsed"] == pytest.approx(0.5, abs=0.1)


def test_a_server_that_trickles_a_blob_is_given_up(tmp_path: Path, monkeypatch: Any) -> None:
    """Each wait for bytes is short, but a byte every 50 ms would hold a download (convert
    from a registry) forever: under LOW_SPEED's floor for its window, it is given up."""
    import fetcher.bodies as bodies

    monkeypatch.setattr(bodies, "LOW_SPEED", (1000, 1.0))
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        until = time.monotonic() + 8  # then a cut-off body: without the guard the test fails, not hangs
        while not stop.wait(0.05) and time.monotonic() < until:
            try:
                conn.sendall(b"x")
            except OSError:
                return
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(UnreachableError, match="under 0 KiB in 1 s; given up"):
            run(f"127.0.0.1:{listener.getsockname()[1]}", "app",
                lambda c: c.download_blob("sha256:" + "0" * 64, str(tmp_path / "blob")), timeout=5)
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - started < 5
    assert not list(tmp_path.iterdir())  # no partial file left


def test_416_with_a_lying_content_length_fails_fast(raw_server: Any) -> None:
    # docker-registry's 416 declares a body it never sends.
    port = raw_server(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 1000\r\n"
                      b"Content-Range: bytes */10\r\n\r\n")
    timing: dict[str, float] = {}
    with pytest.raises(ServerError, match="past the end"):
        run(f"127.0.0.1:{port}", "app", lambda c: c.read_range("sha256:" + "0" * 64, 10, 5),
            timing, timeout=5)
    assert timing["elapsed"] < 1  # the wrong Content-Length is not waited for


# -- scripted answers (httpx.MockTransport) ----------------------------------------------

DATA = bytes(range(256)) * 40
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
REF = ImageRef.parse("registry.example/team/app:1")


def run_mock(handler: Callable[[httpx.Request], httpx.Response],
             fn: Callable[[RegistryClient], Any], timing: dict[str, float] | None = None,
             **kw: Any) -> Any:
    """Like ``run``, against ``httpx.MockTransport(handler)``."""
    async def main() -> Any:
        start = trio.current_time()
        client = RegistryClient(REF, transport=httpx.MockTransport(handler), retry=FAST_RETRY,
                                **kw)
        try:
            async with client:
                return await fn(client)
        finally:
            if timing is not None:
                timing["elapsed"] = trio.current_time() - start

    return trio.run(main, clock=_mock_clock() if timing is not None else None)


def test_https_for_remote_hosts_and_docker_hub() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=DATA)

    run_mock(handler, lambda c: c.read_blob(DIGEST))
    assert seen == [f"https://registry.example/v2/team/app/blobs/{DIGEST}"]
    assert RegistryClient(ImageRef.parse("ubuntu")).base_url == (
        "https://registry-1.docker.io/v2/library/ubuntu")
    assert RegistryClient(ImageRef.parse("localhost:5000/a")).base_url.startswith("http://")
    assert RegistryClient(ImageRef.parse("h.example/a"), insecure=True).base_url.startswith(
        "http://")
    for host in ("127.0.0.1:5000", "127.1.2.3", "[::1]:5000"):
        assert RegistryClient(ImageRef.parse(f"{host}/a")).base_url.startswith("http://"), host
    # a name that merely starts like a loopback address is a remote host
    assert RegistryClient(ImageRef.parse("127.example.com/a")).base_url.startswith("https://")


def test_ca_file_adds_to_the_system_trust_store(tmp_path) -> None:
    system = len(tls_context(None).get_ca_certs())
    assert system > 0  # the machine's store, not an empty context
    assert tls_context(None).verify_mode == ssl.CERT_REQUIRED
    ca = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=lazyfs test CA", "-keyout", str(tmp_path / "ca.key"), "-out", str(ca)],
                   check=True, capture_output=True)
    assert len(tls_context(str(ca)).get_ca_certs()) == system + 1
    with pytest.raises(UnreachableError, match="cannot use CA file"):
        tls_context(str(tmp_path / "missing.pem"))


def test_5xx_then_success_is_retried() -> None:
    statuses = iter([500, 503, 200])
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        status = next(statuses)
        return httpx.Response(status, content=DATA if status == 200 else b"oops",
                              headers={"Retry-After": "0"})

    assert run_mock(handler, lambda c: c.read_blob(DIGEST)) == DATA
    assert len(calls) == 3


def test_persistent_5xx_and_dropped_connections_become_server_error() -> None:
    with pytest.raises(ServerError, match="status 503 after 3 tries"):
        run_mock(lambda r: httpx.Response(503), lambda c: c.read_blob(DIGEST))

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    with pytest.raises(ServerError, match="connection dropped"):
        run_mock(drop, lambda c: c.read_range(DIGEST, 0, 10))


def test_retry_after_is_capped() -> None:
    statuses = iter([429, 200])
    handler = lambda r: httpx.Response(s := next(statuses), content=DATA,  # noqa: E731
                                       headers={"Retry-After": "3600"} if s == 429 else {})
    timing: dict[str, float] = {}
    assert run_mock(handler, lambda c: c.read_blob(DIGEST), timing) == DATA
    assert 0 < timing["elapsed"] <= FAST_RETRY.max_retry_after + 0.01


def range_answer(status: int, content_range: str | None, body: bytes) -> Callable[..., Any]:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": content_range} if content_range else {}
        return httpx.Response(status, content=body, headers=headers)
    return handler


def test_read_range_checks_what_came_back() -> None:
    size = len(DATA)
    ok = range_answer(206, f"bytes 10-19/{size}", DATA[10:20])
    assert run_mock(ok, lambda c: c.read_range(DIGEST, 10, 10)) == DATA[10:20]
    whole = range_answer(200, None, DATA)  # a server that ignores Range
    assert run_mock(whole, lambda c: c.read_range(DIGEST, 300, 50)) == DATA[300:350]
    for bad in (range_answer(206, f"bytes 11-20/{size}", DATA[11:21]),
                range_answer(206, None, DATA[10:20]),
                range_answer(206, f"bytes 10-19/{size}", DATA[10:15]),
                range_answer(206, f"bytes 10-19/{size}", DATA[10:25]),
                range_answer(200, None, DATA[:15]),
                range_answer(204, None, b"")):
        with pytest.raises(ServerError):
            run_mock(bad, lambda c: c.read_range(DIGEST, 10, 10))


def test_nothing_but_fetch_errors_escape() -> None:
    def explode(request: httpx.Request) -> httpx.Response:
        raise httpx.TooManyRedirects("loop", request=request)

    with pytest.raises(FetchError):
        run_mock(explode, lambda c: c.get_manifest())
    with pytest.raises(FetchError, match="malformed digest"):
        run_mock(explode, lambda c: c.read_blob("sha256:nothex"))


def test_a_redirect_to_a_port_out_of_range_is_a_fetch_error() -> None:
    """A plain-HTTP registry's Location is the server's to get wrong: a port past 65535 is
    a FetchError like any bad answer, not a ValueError out of the lean client."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:99999/blob")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    async def read() -> None:
        client = RegistryClient(ImageRef.parse(f"127.0.0.1:{server.server_address[1]}/app:1"),
                                timeout=5, retry=RetryPolicy(attempts=1))
        try:
            with pytest.raises(FetchError):
                await client.read_range(DIGEST, 0, 10)
        finally:
            await client.aclose()

    try:
        trio.run(read)
    finally:
        server.shutdown()
        server.server_close()


class TokenRegistry:
    """A registry demanding a bearer token, and its token server, in one handler."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.valid = "tok-1"
        self.token_requests: list[httpx.Request] = []
        self.credentials = credentials

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            self.token_requests.append(request)
            if self.credentials is not None:
                expected = httpx.BasicAuth(*self.credentials)
                sent = request.headers.get("Authorization")
                if sent != next(expected.auth_flow(request)).headers["Authorization"]:
                    return httpx.Response(401)
            return httpx.Response(200, json={"token": self.valid, "expires_in": 300})
        if request.headers.get("Authorization") != f"Bearer {self.valid}":
            return httpx.Response(401, headers={"WWW-Authenticate": (
                'Bearer realm="https://auth.example/token",service="registry.example",'
                'scope="repository:team/app:pull"')})
        return httpx.Response(200, content=DATA)


def test_bearer_token_flow() -> None:
    registry = TokenRegistry()

    async def reads(client: RegistryClient) -> None:
        assert await client.read_blob(DIGEST) == DATA
        assert await client.read_blob(DIGEST) == DATA  # the token is reused
        assert len(registry.token_requests) == 1
        registry.valid = "tok-2"  # the token went stale: renewed once
        assert await client.read_blob(DIGEST) == DATA
        assert len(registry.token_requests) == 2

    run_mock(registry, reads)
    params = registry.token_requests[0].url.params
    assert params["service"] == "registry.example"
    assert params["scope"] == "repository:team/app:pull"
    assert "Authorization" not in registry.token_requests[0].headers


def test_bearer_token_with_credentials() -> None:
    registry = TokenRegistry(credentials=("alice", "s3cret"))
    assert run_mock(registry, lambda c: c.read_blob(DIGEST), credentials=("alice", "s3cret")) == DATA
    with pytest.raises(AuthError, match="refused anonymous access"):
        run_mock(registry, lambda c: c.read_blob(DIGEST))


def test_token_that_never_works_is_auth_error() -> None:
    registry = TokenRegistry()
    registry.valid = "never"

    def handler(request: httpx.Request) -> httpx.Response:
        response = registry(request)
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": "useless"})
        return response

    with pytest.raises(AuthError, match="access denied"):
        run_mock(handler, lambda c: c.get_manifest())


def test_basic_auth() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") == "Basic YWxpY2U6czNjcmV0":
            return httpx.Response(200, content=DATA)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    assert run_mock(handler, lambda c: c.read_blob(DIGEST), credentials=("alice", "s3cret")) == DATA
    with pytest.raises(AuthError, match="requires a user name"):
        run_mock(handler, lambda c: c.read_blob(DIGEST))


def test_forbidden_is_auth_error() -> None:
    with pytest.raises(AuthError):
        run_mock(lambda r: httpx.Response(403), lambda c: c.read_blob(DIGEST))


def test_manifest_media_type_from_body_when_header_is_generic() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX}).encode()
    handler = lambda r: httpx.Response(200, content=body,  # noqa: E731
                                       headers={"Content-Type": "application/json"})
    assert run_mock(handler, lambda c: c.get_manifest()).media_type == MEDIA_TYPE_OCI_INDEX
