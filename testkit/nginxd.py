"""nginx run on loopback as a blob cache, by tests and benchmarks: a mirror in front of a
registry (what the README's mirror section shows, ``tests/test_registry_mirror.py``), and
the two tiers of a Dragonfly-style arrangement (``bench/peers_bench.py``'s ``proxy``).

    mirror = Nginx(tmp / "mirror", mirror_locations("127.0.0.1:5000"))
    ... lazyfs mount ... --mirror mirror.url ...
    mirror.stop()

Blobs are immutable and content-addressed, so every location here caches them by URI.
``mirror_locations`` caches each blob whole and answers ranges from the cached copy;
``seed_locations`` and ``node_proxy_locations`` cache them in slices (nginx's slice module,
Dragonfly's 4 MiB pieces), so a range read waits for its own piece and not the whole blob.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .registryd import free_port
from .waiting import listening, stop_process, wait_until

PIECE = "4m"
"""Slice size of the Dragonfly-style tiers: Dragonfly's default piece size."""

_CONF = """
worker_processes 1;
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
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
{locations}
    }}
}}
"""

_WHOLE_BLOBS = """
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
"""

_SLICED_BLOBS = """
        # Blobs cached in pieces: each slice is one Range request upstream and one cache
        # entry, fetched once however many readers want it.
        location ~ ^/v2/.+/blobs/sha256: {{
            slice {piece};
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Range $slice_range;
            proxy_cache blobs;
            proxy_cache_key $uri$slice_range;
            proxy_cache_valid 200 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_ignore_headers Set-Cookie;
        }}
"""


def mirror_locations(upstream: str) -> str:
    """A site's blob mirror in front of the registry at ``upstream`` (host:port): blobs
    cached whole, manifests passed through uncached (tags move)."""
    return (_WHOLE_BLOBS.format(upstream=upstream)
            + f"        location /v2/ {{ proxy_pass http://{upstream}; }}\n")


def seed_locations(upstream: str, piece: str = PIECE) -> str:
    """The shared tier of a Dragonfly-style arrangement (its seed peer): blobs of the
    registry at ``upstream`` cached in pieces; nothing else is served."""
    return _SLICED_BLOBS.format(upstream=upstream, piece=piece)


def node_proxy_locations(seed: str, piece: str = PIECE) -> str:
    """A node's forward proxy (``--proxy``), Dragonfly's dfdaemon as nginx can play it:
    blob requests are cached in pieces taken from the seed at ``seed`` (host:port), any
    other request (manifests, tags) goes straight to the host it names. Plain HTTP only:
    nginx does not answer ``CONNECT``."""
    return (_SLICED_BLOBS.format(upstream=seed, piece=piece)
            + "        location / { proxy_pass http://$http_host; }\n")


class Nginx:
    """One nginx serving ``locations`` on a free loopback port, its files (config, logs,
    cache) under ``workdir``; ``url`` is where it listens."""

    def __init__(self, workdir: Path, locations: str) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.dir / "nginx.conf"
        conf.write_text(_CONF.format(d=self.dir, port=self.port, locations=locations))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: listening(self.port), 10, "nginx listening", alive=self.proc,
                       detail=self.errors)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
