"""Servers that lie about sizes, on loopback: a registry serving a real OCI layout whose
answers announce or send more than asked, and a peer whose chunk answers do. For the
tests of what a mount holds in memory whatever a server says (``test_bounded.py``).

    registry = HostileRegistry(images_root)   /v2/<name>/manifests/<tag|digest>,
                                              /v2/<name>/blobs/<digest>; 404 otherwise
    registry.ranges = "honest"      206 with the bytes asked for
                      "ignore"      200 with the whole blob (a server ignoring Range)
                      "announce"    200 with Content-Length ``registry.announce``: the
                                    whole blob, then zeros, until the client goes
    registry.oversize = (digest, n, with_length)   blob ``digest`` (the index) answered
                                    with ``n`` bytes: its own, then zeros; with a
                                    Content-Length of ``n`` or none (until the close)
    peer = HostilePeer(announce)    every /v1/chunks/ GET answered 200 with
                                    Content-Length ``announce``, zeros until the client goes
    peer = BatchPeer(layout, mode)  answers batches (POST /v1/chunks) from the blobs of
                                    ``layout``, GETs 404; ``mode`` "lie": one byte of the
                                    first chunk of its first batch flipped; "die": half
                                    of its first batch, then the connection and the
                                    server end; "slow:<s>": every batch after s seconds

Each runs in threads of the calling process; ``close()`` stops it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from blockindex.oci import Layout
from fetcher.imageref import is_digest
from fetcher.peerwire import END, FRAME, OK, frame, parse_batch_body

_BLOCK = bytes(1 << 20)
_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: _Base


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass

    def do_GET(self) -> None:  # noqa: N802 (the base's name)
        self.server.owner.answer(self)

    def do_POST(self) -> None:  # noqa: N802 (the base's name)
        self.server.owner.answer(self)


class _Base:
    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def answer(self, h: _Handler) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send(h: _Handler, status: int, headers: dict[str, str], data: bytes, total: int,
          *, with_length: bool = True) -> None:
    """``data``, then zeros up to ``total`` bytes in all, announced as Content-Length (or,
    without ``with_length``, ended by closing the connection). Stops when the client goes."""
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    if with_length:
        h.send_header("Content-Length", str(total))
    else:
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    left = total - len(data)
    try:
        h.wfile.write(data)
        while left > 0:
            h.wfile.write(_BLOCK[: min(left, len(_BLOCK))])
            left -= len(_BLOCK)
    except OSError:
        h.close_connection = True


class HostileRegistry(_Base):
    def __init__(self, images_root: Path) -> None:
        self.root = images_root
        self.ranges = "honest"
        self.announce = 0
        self.oversize: tuple[str, int, bool] | None = None
        self._blobs: dict[Path, bytes] = {}  # read once: 64 answers at once hold one copy
        self._lock = threading.Lock()
        super().__init__()

    def _blob(self, path: Path) -> bytes:
        with self._lock:
            if path not in self._blobs:
                self._blobs[path] = path.read_bytes()
            return self._blobs[path]

    def answer(self, h: _Handler) -> None:
        m = _PATH.match(h.path)
        layout = Layout(self.root / m["name"]) if m else None
        if m is None or layout is None or not (self.root / m["name"] / "index.json").exists():
            _send(h, 404, {}, b"", 0)
            return
        ref = m["ref"]
        if m["kind"] == "manifests":
            digest = ref if is_digest(ref) else layout.resolve(ref)["digest"]
            data = layout.read_blob(digest)
            _send(h, 200, {"Content-Type": json.loads(data)["mediaType"],
                           "Docker-Content-Digest": digest}, data, len(data))
            return
        if not is_digest(ref) or not layout.blob_path(ref).exists():
            _send(h, 404, {}, b"", 0)
            return
        data = self._blob(layout.blob_path(ref))
        if self.oversize is not None and self.oversize[0] == ref:
            _, n, with_length = self.oversize
            _send(h, 200, {}, data, n, with_length=with_length)
            return
        rng = h.headers.get("Range")
        if rng is None or self.ranges == "ignore":
            _send(h, 200, {}, data, len(data))
        elif self.ranges == "announce":
            _send(h, 200, {}, data, self.announce)
        else:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) + 1, len(data))
            _send(h, 206, {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"},
                  data[start:end], end - start)


class HostilePeer(_Base):
    def __init__(self, announce: int) -> None:
        self.announce = announce
        self.asked = 0
        super().__init__()

    def answer(self, h: _Handler) -> None:
        if h.command == "POST" and h.path.startswith("/v1/chunks"):  # a batch: its first frame
            chunks, _, _, _ = parse_batch_body(h.rfile.read(int(h.headers["Content-Length"])))
            self.asked += 1                                         # announces the huge length
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            c = chunks[0]
            h.wfile.write(FRAME.pack(c.digest, OK, c.codec, c.size, min(self.announce, 0xFFFFFFFF)))
            return
        if not h.path.startswith("/v1/chunks/"):
            _send(h, 404, {}, b"", 0)
            return
        self.asked += 1
        _send(h, 200, {}, b"", self.announce)


class BatchPeer(_Base):
    def __init__(self, layout: Layout, mode: str) -> None:
        self.layout = layout
        self.mode = mode
        self.batches: list[int] = []
        """Chunks asked for, per batch."""
        self.sent = 0
        """Chunks sent in good faith (the lie not counted)."""
        super().__init__()

    def answer(self, h: _Handler) -> None:
        if h.command != "POST":
            _send(h, 404, {}, b"", 0)
            return
        chunks, _, _, _ = parse_batch_body(h.rfile.read(int(h.headers["Content-Length"])))
        first = not self.batches
        self.batches.append(len(chunks))
        if self.mode.startswith("slow:"):
            time.sleep(float(self.mode[5:]))
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        if self.mode == "die" and first:
            chunks = chunks[: len(chunks) // 2]
        for i, c in enumerate(chunks):
            with open(self.layout.blob_path(c.blob.digest), "rb") as f:
                f.seek(c.offset)
                payload = bytearray(f.read(c.stored_size))
            if self.mode == "lie" and first and i == 0:
                payload[0] ^= 0xFF
            else:
                self.sent += 1
            h.wfile.write(b"".join(frame(c.digest, OK, c.codec, c.size, payload)))
        if self.mode == "die" and first:
            h.wfile.flush()
            threading.Thread(target=self.close, daemon=True).start()  # never up again
            return
        h.wfile.write(b"".join(frame(bytes(32), END)))
