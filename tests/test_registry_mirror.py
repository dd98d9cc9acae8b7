"""An nginx caching proxy in front of a real registry, used as a --mirror: once one node
has read the image through it, another node reads it with no blob read at the registry."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from testkit import imagegen, treecompare
from testkit.registryd import Registry, free_port, needs_registry
from testkit.waiting import listening, wait_until

from .conftest import lazyfs

pytestmark = [needs_registry, pytest.mark.mount,
              pytest.mark.skipif(not shutil.which("nginx"), reason="needs nginx")]

NGINX_CONF = """
worker_processes 1;
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    tcp_nopush off;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=blobs:10m max_size=2g inactive=7d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        # Blobs are immutable and content-addressed: cache each whole, keyed by its URI,
        # and answer ranges from the cached copy.
        location ~ ^/v2/.+/blobs/sha256: {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_force_ranges on;
            proxy_ignore_headers Set-Cookie;
        }}
        location /v2/ {{
            proxy_pass http://{upstream};
        }}
    }}
}}
"""


@pytest.fixture
def nginx_mirror(tmp_path):
    def start(upstream: str) -> str:
        d = tmp_path / "nginx"
        d.mkdir()
        port = free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port, upstream=upstream))
        proc = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_until(lambda: listening(port), 10, "nginx listening", alive=proc,
                   detail=lambda: (d / "error.log").read_text())
        return f"http://127.0.0.1:{port}"

    procs: list[subprocess.Popen] = []
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_second_node_reads_only_from_the_mirror(tmp_path, mounts, nginx_mirror):
    image = imagegen.build_rich_image(tmp_path / "rich.tar")
    registry = Registry(tmp_path)
    try:
        registry.skopeo_copy(f"docker-archive:{image.path}", "app:1")
        lazyfs("convert", f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy",
               "--chunk-size", "64K")
        mirror = nginx_mirror(registry.host)
        ref = f"{registry.host}/app:1-lazy"
        mnt, _ = mounts.mount(ref, "--mirror", mirror, name="node1", cache=tmp_path / "cache1")
        mounts.wait_complete(mnt)
        assert treecompare.compare_tree(mnt, image.expected) == []
        reads = len(registry.blob_reads())
        # another node: its own empty cache, the same mirror
        mnt2, _ = mounts.mount(ref, "--mirror", mirror, name="node2", cache=tmp_path / "cache2")
        mounts.wait_complete(mnt2)
        assert treecompare.compare_tree(mnt2, image.expected) == []
        assert len(registry.blob_reads()) == reads
        # a dead mirror: the registry serves, and the mount still works
        mnt3, _ = mounts.mount(ref, "--mirror", "http://127.0.0.1:1", "--no-prefetch", name="node3",
                               cache=tmp_path / "cache3")
        assert treecompare.compare_tree(mnt3, image.expected) == []
        assert len(registry.blob_reads()) > reads
    finally:
        registry.stop()
