"""The OCI distribution read API served over a directory of layouts, over real HTTP."""

from __future__ import annotations

import http.client
import json
import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockindex.oci import MEDIA_TYPE_OCI_MANIFEST
from lazyfs.serve import ServerHandle, make_server
from testkit.waiting import wait_until

from .conftest import Image
from .test_peer_requests import exchange


def request(
    server: ServerHandle, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def test_base_endpoint(server: ServerHandle) -> None:
    response, body = request(server, "GET", "/v2/")
    assert response.status == 200 and json.loads(body) == {}


@pytest.mark.parametrize("name", ["app", "team/app"])
def test_manifest_by_tag_and_digest(server: ServerHandle, images: dict[str, Image], name: str):
    image = images[name]
    for ref in ("1", image.manifest_digest):
        response, body = request(server, "GET", f"/v2/{name}/manifests/{ref}")
        assert response.status == 200
        assert body == image.manifest
        assert response.headers["Content-Type"] == MEDIA_TYPE_OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == image.manifest_digest


def test_manifest_head(server: ServerHandle, images: dict[str, Image]) -> None:
    response, body = request(server, "HEAD", "/v2/app/manifests/1")
    assert response.status == 200 and body == b""
    assert response.headers["Content-Length"] == str(len(images["app"].manifest))
    assert response.headers["Docker-Content-Digest"] == images["app"].manifest_digest


def test_blob_full_and_head(server: ServerHandle, images: dict[str, Image]) -> None:
    image = images["app"]
    response, body = request(server, "GET", f"/v2/app/blobs/{image.big}")
    assert response.status == 200 and body == image.blobs[image.big]
    response, body = request(server, "HEAD", f"/v2/app/blobs/{image.big}")
    assert response.status == 200 and body == b""
    assert response.headers["Content-Length"] == str(len(image.blobs[image.big]))


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-0", 0, 1), ("bytes=10-99", 10, 100), ("bytes=299990-", 299990, 300000),
     ("bytes=299000-400000", 299000, 300000), ("bytes=-10", 299990, 300000)],
)
def test_blob_range(server: ServerHandle, images: dict[str, Image], header: str, start: int,
                    end: int) -> None:
    image = images["app"]
    response, body = request(server, "GET", f"/v2/app/blobs/{image.big}", {"Range": header})
    assert response.status == 206
    assert body == image.blobs[image.big][start:end]
    assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/300000"
    assert response.headers["Content-Length"] == str(end - start)


@pytest.mark.parametrize("header", ["bytes=300000-", "bytes=300000-300010", "bytes=400000-500000"])
def test_blob_range_unsatisfiable(server: ServerHandle, images: dict[str, Image], header: str):
    image = images["app"]
    response, _ = request(server, "GET", f"/v2/app/blobs/{image.big}", {"Range": header})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */300000"


@pytest.mark.parametrize("header", ["bytes=5-4", "bytes=0-1,5-6", "items=0-1", "bytes=-"])
def test_blob_range_ignored_gives_whole_blob(server: ServerHandle, images: dict[str, Image],
                                             header: str) -> None:
    image = images["app"]
    response, body = request(server, "GET", f"/v2/app/blobs/{image.big}", {"Range": header})
    assert response.status == 200 and body == image.blobs[image.big]


def test_keep_alive_serves_many_requests_on_one_connection(
    server: ServerHandle, images: dict[str, Image]
) -> None:
    image = images["app"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for i in range(20):
        conn.request("GET", f"/v2/app/blobs/{image.big}", headers={"Range": f"bytes={i}-{i + 9}"})
        response = conn.getresponse()
        assert response.read() == image.blobs[image.big][i : i + 10]
        conn.request("GET", "/v2/app/manifests/nope")
        response = conn.getresponse()
        assert response.status == 404 and response.read()
    conn.close()


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/nope/manifests/1", 404, "NAME_UNKNOWN"),
        ("/v2/app/manifests/2", 404, "MANIFEST_UNKNOWN"),
        ("/v2/app/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
        ("/v2/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/team/manifests/1", 404, "NAME_UNKNOWN"),  # a directory, not a layout
        ("/v2/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/app/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("/v2/app/manifests/sha256:XYZ", 400, "DIGEST_INVALID"),
    ],
)
def test_unknown_and_malformed(server: ServerHandle, path: str, status: int, code: str) -> None:
    response, body = request(server, "GET", path)
    assert response.status == status
    assert error_code(body) == code
    assert response.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "name",
    ["..", "%2e%2e", "%2E%2E", "app/..", "team/../app", "team/%2e%2e/app", ".", "a//b",
     "..%2f..%2fetc", "%2e%2e/root/app"],
)
def test_path_traversal_refused(server: ServerHandle, images: dict[str, Image], name: str):
    image = images["app"]
    # The layout's own parent holds 'root/app'; none of these may reach it.
    response, _ = request(server, "GET", f"/v2/{name}/blobs/{image.big}")
    assert response.status in (400, 404)
    response, _ = request(server, "GET", f"/v2/{name}/manifests/1")
    assert response.status in (400, 404)


def test_symlink_out_of_root_refused(tmp_path: Path, server: ServerHandle,
                                     images: dict[str, Image]) -> None:
    outside = tmp_path / "outside"
    image = images["app"]
    from .conftest import build_image
    build_image(outside)
    (tmp_path / "root" / "escape").symlink_to(outside)
    response, _ = request(server, "GET", "/v2/escape/manifests/1")
    assert response.status == 404
    assert image  # the fixture layouts are still served
    assert request(server, "GET", "/v2/app/manifests/1")[0].status == 200


def test_tags_list(server: ServerHandle, images: dict[str, Image]) -> None:
    images["app"].layout.tag({"mediaType": MEDIA_TYPE_OCI_MANIFEST,
                              "digest": images["app"].manifest_digest, "size": 1}, "latest")
    response, body = request(server, "GET", "/v2/app/tags/list")
    assert response.status == 200
    assert json.loads(body) == {"name": "app", "tags": ["1", "latest"]}
    _, body = request(server, "GET", "/v2/app/tags/list?n=1")
    assert json.loads(body)["tags"] == ["1"]


def test_writes_unsupported(server: ServerHandle) -> None:
    response, body = request(server, "DELETE", "/v2/app/manifests/1")
    assert response.status == 405 and error_code(body) == "UNSUPPORTED"


def test_request_log_and_access_log(tmp_path: Path, server: ServerHandle,
                                    images: dict[str, Image]) -> None:
    image = images["app"]
    request(server, "GET", f"/v2/app/blobs/{image.big}", {"Range": "bytes=0-9"})
    request(server, "HEAD", "/v2/app/manifests/1")
    assert server.requests == [
        ("GET", f"/v2/app/blobs/{image.big}", "bytes=0-9", 206),
        ("HEAD", "/v2/app/manifests/1", None, 200),
    ]
    lines = wait_until(lambda: len(got := (tmp_path / "access.log").read_text().splitlines()) >= 2 and got,
                       2, "two lines in the access log", interval=0.01)
    assert lines[0].split()[1:] == ["GET", f"/v2/app/blobs/{image.big}", "bytes=0-9", "206", "10"]


def test_delay_is_added_per_response(tmp_path: Path, images: dict[str, Image]) -> None:
    import time
    with make_server(tmp_path / "root", "127.0.0.1", 0, delay=0.05) as slow:
        t = time.monotonic()
        request(slow, "GET", "/v2/")
        request(slow, "GET", "/v2/")
        assert time.monotonic() - t >= 0.1


def test_close_cuts_idle_keep_alive_connections(tmp_path: Path, images: dict[str, Image]) -> None:
    handle = make_server(tmp_path / "root", "127.0.0.1", 0).start()
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=5)
    conn.request("GET", "/v2/")
    conn.getresponse().read()
    handle.close()  # must not hang on the idle connection (the suite's timeout catches a hang)
    try:
        assert conn.sock.recv(1) == b""  # cut by the server: end of stream, not a 5 s timeout
    finally:
        conn.close()


# -- any bytes a client sends -------------------------------------------------------------------

_junk = st.binary(max_size=40)
_targets = st.one_of(
    st.sampled_from([b"/v2/", b"/v2/app/manifests/1", b"/v2/app/blobs/BIG", b"/v2/app/tags/list",
                     b"http://[::1/v2/", b"//[::1/x", b"/v2/%zz/blobs/x", b"/v2/%ff%fe/manifests/1", b"*",
                     b"/v2/app/tags/list?n=" + b"9" * 5000, b"/v2/app/tags/list?n=\xd9\xa3&last=%ff"]),
    st.builds(lambda a, b: a + b, st.sampled_from([b"/v2/", b"/v2/app/tags/list?n=", b"/v2/app/blobs/"]),
              _junk),
    _junk)
_ranges = st.one_of(st.sampled_from([b"bytes=0-", b"bytes=" + b"9" * 5000 + b"-", b"bytes=-" + b"9" * 5000,
                                     b"bytes=\xd9\xa3-", b"bytes=5-2", b"bytes=0-1,3-4", b"chars=0-1"]),
                    _junk)


@st.composite
def _client_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    method = draw(st.sampled_from([b"GET"] * 6 + [b"HEAD", b"POST", b"BREW", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/9", b""]))
    lines = [method + b" " + draw(_targets) + b" " + version]
    if draw(st.booleans()):
        lines.append(b"Range: " + draw(_ranges))
    if draw(st.integers(0, 3)) == 0:
        lines += [name + b": " + value for name, value in draw(st.lists(st.tuples(_junk, _junk), max_size=3))]
    return b"\r\n".join(lines) + draw(st.sampled_from([b"\r\n\r\n", b"\r\n", b""]))


def test_no_request_gets_a_500_or_stops_the_server(server: ServerHandle, images: dict[str, Image], caplog):
    """The stdlib parses the head (and answers 400 to what it cannot); whatever reaches
    the routes is answered 4xx, never 500 with a traceback in the log."""
    big = images["app"].big.encode()

    @settings(max_examples=int(os.environ.get("LAZYFS_FUZZ_EXAMPLES", "200")), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(_client_bytes())
    def check(data: bytes) -> None:
        answer = exchange(server.port, data.replace(b"/BIG", b"/" + big))
        assert not answer.startswith(b"HTTP/1.1 500"), answer[:300]
        assert request(server, "GET", "/v2/")[0].status == 200

    with caplog.at_level(logging.ERROR, logger="lazyfs.serve"):
        check()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
