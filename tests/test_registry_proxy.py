"""``--proxy URL``: every registry request of convert (pull and push) and of a mount
(manifests, the index, blob ranges) goes through a real forward proxy (Debian's
tinyproxy), as it would through Dragonfly's per-node proxy; a dead proxy is one line and
exit code 4."""

from __future__ import annotations

import collections
import urllib.parse

import pytest

from testkit import imagegen, treecompare
from testkit.registryd import needs_registry

from .conftest import lazyfs
from .proxyd import Tinyproxy, needs_tinyproxy

pytestmark = [needs_registry, needs_tinyproxy]


@pytest.fixture
def proxy(tmp_path):
    p = Tinyproxy(tmp_path)
    yield p
    p.stop()


def _paths(proxied: list[tuple[str, str]], host: str) -> list[tuple[str, str]]:
    out = []
    for method, url in proxied:
        parts = urllib.parse.urlsplit(url)
        assert parts.netloc == host, url
        out.append((method, parts.path + (f"?{parts.query}" if parts.query else "")))
    return out


@pytest.mark.mount
def test_convert_and_mount_through_a_forward_proxy(tmp_path, registry, proxy, mounts):
    image = imagegen.build_rich_image(tmp_path / "rich.tar")
    registry.skopeo_copy(f"docker-archive:{image.path}", "app:1")
    seen = len(registry.requests())
    lazyfs("convert", f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy",
           "--chunk-size", "64K", "--proxy", proxy.url)
    through = _paths(proxy.requests(), registry.host)
    at_registry = [(m, uri) for m, uri, _status in registry.requests()[seen:]]
    # everything the registry saw came through the proxy: pull and push alike
    assert collections.Counter(through) == collections.Counter(at_registry)
    methods = {m for m, _ in through}
    assert {"GET", "HEAD", "POST", "PUT"} <= methods
    assert ("GET", "/v2/app/manifests/1") in through
    assert ("PUT", "/v2/app/manifests/1-lazy") in through

    before_proxy, seen = len(proxy.requests()), len(registry.requests())
    mnt, _ = mounts.mount(f"{registry.host}/app:1-lazy", "--proxy", proxy.url, "--no-prefetch")
    assert treecompare.compare_tree(mnt, image.expected) == []
    through = _paths(proxy.requests()[before_proxy:], registry.host)
    at_registry = [(m, uri) for m, uri, _status in registry.requests()[seen:]]
    assert collections.Counter(through) == collections.Counter(at_registry)
    assert ("GET", "/v2/app/manifests/1-lazy") in through
    blob_gets = collections.Counter(p for m, p in through if m == "GET" and "/blobs/sha256:" in p)
    # the chunk blobs were read in several ranges each (and, as above, every one of them
    # that reached the registry came through the proxy)
    assert max(blob_gets.values()) > 1


def test_a_dead_proxy_is_one_line_and_exit_4(tmp_path, registry):
    image = imagegen.build_rich_image(tmp_path / "rich.tar")
    registry.skopeo_copy(f"docker-archive:{image.path}", "app:1")
    done = lazyfs("images", f"{registry.host}/app:1", "--proxy", "http://127.0.0.1:1", "--timeout", "5",
                  check=False)
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lazyfs: error:"), done.stderr
    assert "proxy" in done.stderr
