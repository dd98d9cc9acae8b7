"""The benchmark's origin: what a registry and a web server are to a node, run inside the
link's network namespace (``bench/link.py`` starts it there with ``ip netns exec``).

Two servers in one process, both sleeping ``--rtt`` seconds before every response, which
stands in for the link's round trip (``netem`` is not available on this kernel; ``tbf`` on
the veth caps the bandwidth):

- ``lazyfs serve``'s server (``lazyfs.serve.make_server``) for the OCI layouts under
  ``--images``: what lazyfs mounts from;
- a plain HTTP file server for the ``--tree NAME=DIR`` given: the gzip layers a full pull downloads, and the
  same rootfs as a directory tree for rclone and httpdirfs. Directory listings are HTML
  pages of links (what both of them parse); files answer ``HEAD`` and one byte range with
  ``sendfile``; symlinks are followed as a chroot would (an absolute target stays inside the
  tree), since plain HTTP has no symlinks; devices and sockets are left out.

It prints one JSON line, ``{"oci": PORT, "files": PORT}``, and serves until stdin closes.
With ``LAZYFS_BENCH_ORIGIN_DEBUG=1`` the web server prints each request and its Range.
Only the round trip of each request is modelled: a new connection costs no extra round trip.
"""

from __future__ import annotations

import argparse
import email.utils
import html
import json
import os
import re
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lazyfs.serve import make_server  # noqa: E402

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def resolve(root: Path, rel: str) -> Path | None:
    """``rel`` inside ``root`` as a chroot at ``root`` sees it, or None when it leads nowhere."""
    current = root
    parts = [p for p in rel.split("/") if p and p != "."]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p and p != "."] + parts
        else:
            current = candidate
    return current if os.path.lexists(current) else None


class _Files(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], trees: dict[str, Path], rtt: float) -> None:
        super().__init__(addr, _FileHandler)
        self.trees, self.rtt = trees, rtt

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-answer (a cancelled read) is no error of ours."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def resolve(self, url_path: str) -> Path | None:
        """``/NAME/REST``: REST inside tree NAME, as a chroot there sees it."""
        name, _, rest = url_path.lstrip("/").partition("/")
        tree = self.trees.get(name)
        return None if tree is None else resolve(tree, rest)


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is dropped after this many seconds
    server: _Files

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _plain(self, status: int, text: str, body: bool, headers: dict[str, str] | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _answer(self, body: bool) -> None:
        if os.environ.get("LAZYFS_BENCH_ORIGIN_DEBUG"):
            print(self.command, self.path, self.headers.get("Range"), file=sys.stderr, flush=True)
        if self.server.rtt:
            time.sleep(self.server.rtt)
        url_path = unquote(urlsplit(self.path).path)
        if url_path.strip("/") == "":
            self._plain(200, "".join(f'<a href="{quote(n)}/">{html.escape(n)}/</a>\n'
                                     for n in sorted(self.server.trees)), body)
            return
        path = self.server.resolve(url_path)
        if path is None:
            self._plain(404, "not found", body)
            return
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            if not url_path.endswith("/"):
                self._plain(301, "moved", body, {"Location": quote(url_path + "/")})
                return
            self._listing(path, url_path, body)
        elif stat.S_ISREG(st.st_mode):
            self._file(path, st, body)
        else:
            self._plain(404, "not a file", body)

    def _listing(self, path: Path, url_path: str, body: bool) -> None:
        rows = []
        for name in sorted(os.listdir(path)):
            target = self.server.resolve(f"{url_path}/{name}")
            if target is None:
                continue
            try:
                mode = target.stat().st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                name += "/"
            elif not stat.S_ISREG(mode):
                continue
            rows.append(f'<a href="{quote(name)}">{html.escape(name)}</a>')
        page = "<html><body><pre>\n" + "\n".join(rows) + "\n</pre></body></html>\n"
        self._plain(200, page, body)

    def _file(self, path: Path, st: os.stat_result, body: bool) -> None:
        size = st.st_size
        start, end, status = 0, size, 200
        header = self.headers.get("Range")
        if header and (m := _RANGE_RE.match(header.strip())) and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, end = max(0, size - int(m.group(2))), size
            if start >= size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        self.wfile.flush()
        with open(path, "rb") as f:
            self.connection.sendfile(f, start, end - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--images", type=Path, required=True, help="OCI layouts for lazyfs")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="serve DIR as plain HTTP under /NAME/ (repeatable)")
    ap.add_argument("--rtt", type=float, default=0.0, help="seconds slept before each response")
    args = ap.parse_args()
    oci = make_server(args.images, args.host, 0, delay=args.rtt).start()
    trees = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        trees[name] = Path(path).resolve()
    files = _Files((args.host, 0), trees, args.rtt)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    print(json.dumps({"oci": oci.port, "files": files.server_address[1]}), flush=True)
    try:
        sys.stdin.read()  # until the benchmark closes our stdin (or dies)
    finally:
        files.shutdown()
        oci.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
