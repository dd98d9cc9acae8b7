"""Real mounts against a registry that wants short-lived bearer tokens (issue 3): the
tokens are cached, renewed when they expire mid-mount, and a mount outlives any one.

The registry is ``lazyfs.serve`` with a gate in front of its handler: every ``/v2/``
request needs ``Authorization: Bearer <live token>``, else 401 with a Bearer challenge
whose realm is the same server's ``/token``, which hands out tokens that die after
``ttl`` seconds (optionally only to the right Basic credentials)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from blockindex.convert import convert
from lazyfs import serve
from lazyfs.serve import make_server
from testkit import treecompare
from testkit.waiting import wait_until

pytestmark = pytest.mark.mount


class Tokens:
    """The token server's state: what it issued, and until when each token is good."""

    def __init__(self, ttl: float, *, advertised: float | None = None,
                 creds: tuple[str, str] | None = None) -> None:
        self.ttl = ttl
        self.advertised = ttl if advertised is None else advertised  # what expires_in says
        self.creds = creds
        self.live: dict[str, float] = {}
        self.issued = 0
        self.refused = 0  # 401s sent for a missing, unknown or dead token
        self.lean_reads = 0  # range reads let through that came by the lean client (no User-Agent)
        self.lock = threading.Lock()

    def issue(self) -> str:
        token = secrets.token_hex(16)
        with self.lock:
            self.live[token] = time.monotonic() + self.ttl
            self.issued += 1
        return token

    def all_dead(self) -> bool:
        """Whether every token issued so far has expired."""
        with self.lock:
            return all(time.monotonic() >= until for until in self.live.values())

    def good(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self.lock:
            until = self.live.get(header.removeprefix("Bearer "))
        return until is not None and time.monotonic() < until


class _TokenGatedHandler(serve._Handler):
    def _handle(self, head: bool) -> None:
        tokens: Tokens = self.server.tokens  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        if path == "/token":
            self._token(tokens)
            return
        if not tokens.good(self.headers.get("Authorization")):
            with tokens.lock:
                tokens.refused += 1
            port = self.server.server_address[1]
            challenge = (f'Bearer realm="http://127.0.0.1:{port}/token",service="test",'
                         'scope="repository:rich:pull"')
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "token needed"}]})
            self._send(401, {"Content-Type": "application/json", "WWW-Authenticate": challenge},
                       body.encode(), head)
            return
        if "/blobs/" in path and self.headers.get("Range") and not self.headers.get("User-Agent"):
            with tokens.lock:
                tokens.lean_reads += 1
        super()._handle(head)

    def _token(self, tokens: Tokens) -> None:
        if tokens.creds is not None:
            want = "Basic " + base64.b64encode(":".join(tokens.creds).encode()).decode()
            if self.headers.get("Authorization") != want:
                self._send(401, {"Content-Type": "application/json",
                                 "WWW-Authenticate": 'Basic realm="test"'}, b'{"details":"no"}', False)
                return
        body = json.dumps({"token": tokens.issue(), "expires_in": tokens.advertised}).encode()
        self._send(200, {"Content-Type": "application/json"}, body, False)


@pytest.fixture(scope="module")
def small_blobs(rich, tmp_path_factory):
    """The rich image again, packed into ~512 KiB chunk blobs: a prefetch of it is many
    requests, not one."""
    image, _images = rich
    root = tmp_path_factory.mktemp("small-blobs") / "images"
    convert(f"docker-archive:{image.path}", f"oci:{root / 'rich'}:1", chunk_size=64 << 10,
            blob_limit=512 << 10)
    return image, root


def _gated(root: Path, tokens: Tokens, delay: float = 0.0):
    handle = make_server(root, "127.0.0.1", 0, delay=delay)
    handle._server.RequestHandlerClass = _TokenGatedHandler
    handle._server.tokens = tokens  # type: ignore[attr-defined]
    return handle.start()


@pytest.fixture
def token_registry(served):
    """(image, server handle, make(tokens)): a token-gated server over the rich image."""
    image, root, _plain = served
    started = []

    def make(tokens: Tokens, *, delay: float = 0.0):
        started.append(_gated(root, tokens, delay))
        return started[-1]

    yield image, root, make
    for handle in started:
        handle.close()


def _files(image) -> list[bytes]:
    """The image's non-empty regular files, biggest first."""
    files = [p for p, e in image.expected.items() if e.kind == "file" and e.size > 0]
    return sorted(files, key=lambda p: -image.expected[p].size)


def _read_half(mnt: Path, files: list[bytes], which: int) -> None:
    for path in files[which::2]:
        (mnt / os.fsdecode(path)).read_bytes()


@pytest.mark.parametrize("advertised", [2.0, 60.0], ids=["honest-expiry", "revoked-early"])
def test_reads_after_the_token_expires_renew_it(token_registry, mounts, advertised):
    """honest-expiry: the client drops the token when expires_in says; revoked-early:
    the server says 60 s but kills it after 2 s, so only a 401 tells the client."""
    image, _root, make = token_registry
    tokens = Tokens(2.0, advertised=advertised)
    server = make(tokens)
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--no-prefetch")
    files = _files(image)
    _read_half(mnt, files, 0)
    first, lean = tokens.issued, tokens.lean_reads
    assert first >= 1
    wait_until(tokens.all_dead, tokens.ttl + 5, "every token issued so far dead", interval=0.1)
    _read_half(mnt, files, 1)  # their chunks have not been fetched yet
    assert tokens.issued > first
    # the fast plain-HTTP path carries the renewed token too (it is not given up for httpx)
    assert tokens.lean_reads > lean
    assert treecompare.compare_tree(mnt, image.expected) == []


def test_prefetch_completes_across_several_token_expiries(small_blobs, mounts):
    image, root = small_blobs
    tokens = Tokens(0.8)
    # each answer 0.2 s late: the prefetch's dozen-odd requests take seconds
    with _gated(root, tokens, delay=0.2) as server:
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1")
        st = mounts.wait_complete(mnt, timeout=60)
        assert st["prefetch"]["cached_bytes"] == st["prefetch"]["total_bytes"] > 0
        blob_reads = [r for r in server.requests if "/blobs/" in r[1] and r[3] in (200, 206)]
        assert len(blob_reads) >= 8, len(blob_reads)
        assert tokens.issued >= 3, tokens.issued
        assert st["fetch"]["failed_requests"] == 0
    assert treecompare.compare_tree(mnt, image.expected) == []


def test_wrong_credentials_for_the_token_server_fail_fast(token_registry, mounts):
    _image, _root, make = token_registry
    tokens = Tokens(60.0, creds=("alice", "right"))
    server = make(tokens)
    # a hang would end in the subprocess's timeout: refused credentials fail at once
    _mnt, done = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--creds", "bad:bad", check=False)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error:"), done.stderr
    assert "refused the credentials" in lines[0], lines[0]
    assert "bad" not in lines[0].split("refused")[0]  # the password is never echoed
    assert tokens.issued == 0
    assert mounts.points == []
    # and the right ones get in
    mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/rich:1", "--creds", "alice:right", "--no-prefetch",
                          name="ok")
    assert tokens.issued >= 1
    assert mnt.is_dir()
