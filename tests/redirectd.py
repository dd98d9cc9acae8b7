"""A registry front that redirects blob GETs to a separate blob server whose URLs expire,
as registries on object storage do (S3 / GCS signed URLs behind a 307).

    front = RedirectingRegistry(upstream="127.0.0.1:PORT")   # any registry (lazyfs serve)
    front.host                  what clients use as the registry
    front.redirects             blob GETs the front answered with a 307
    front.blobs.served          range GETs the blob server answered
    front.blobs.refused         GETs it refused (403: an expired or forged URL)
    front.blobs.expire_all()    every URL handed out so far stops working

Manifests and everything else are passed through to the upstream registry. The blob
server signs its URLs with an HMAC over the digest and a generation number; expiring
bumps the generation, so expiry is a step the test takes, not a wall-clock wait.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request

_BLOB_RE = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class BlobServer:
    """Serves blobs (fetched whole from the upstream once) at signed, expiring URLs."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.secret = os.urandom(16)
        self.generation = 0
        self.served = 0
        self.refused = 0
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def sign(self, repo: str, digest: str) -> str:
        gen = str(self.generation)
        sig = hmac.new(self.secret, f"{digest}|{gen}".encode(), hashlib.sha256).hexdigest()
        query = urllib.parse.urlencode({"repo": repo, "gen": gen, "sig": sig})
        return f"http://127.0.0.1:{self.port}/storage/{digest}?{query}"

    def expire_all(self) -> None:
        self.generation += 1

    def _valid(self, digest: str, query: dict[str, str]) -> bool:
        if query.get("gen") != str(self.generation):
            return False
        want = hmac.new(self.secret, f"{digest}|{query['gen']}".encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, query.get("sig", ""))

    def _blob(self, repo: str, digest: str) -> bytes:
        with self._lock:
            if digest not in self._blobs:
                url = f"http://{self.upstream}/v2/{repo}/blobs/{digest}"
                with urllib.request.urlopen(url, timeout=30) as r:
                    self._blobs[digest] = r.read()
            return self._blobs[digest]

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                digest = parts.path.removeprefix("/storage/")
                if not server._valid(digest, query):
                    server.refused += 1
                    body = b"<Error><Code>AccessDenied</Code>Request has expired</Error>"
                    self.send_response(403)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = server._blob(query["repo"], digest)
                m = _RANGE_RE.match(self.headers.get("Range", ""))
                server.served += 1
                if m:
                    start, end = int(m[1]), min(int(m[2]), len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    data = data[start : end + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class RedirectingRegistry:
    """The registry clients talk to: blob GETs get a 307 to the blob server."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.blobs = BlobServer(upstream)
        self.redirects = 0
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _pass(self) -> None:
                req = urllib.request.Request(f"http://{front.upstream}{self.path}", method=self.command,
                                             headers={k: v for k, v in self.headers.items()
                                                      if k.lower() in ("accept", "range")})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, headers, body = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                keep = {k: v for k, v in headers.items()
                        if k.lower() in ("content-type", "docker-content-digest", "content-range")}
                self._answer(status, keep, body)

            def do_GET(self) -> None:
                m = _BLOB_RE.match(urllib.parse.urlsplit(self.path).path)
                if m is None:
                    return self._pass()
                front.redirects += 1
                self._answer(307, {"Location": front.blobs.sign(m[1], m[2])}, b"")

            def do_HEAD(self) -> None:
                self._pass()

        return Handler

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.blobs.stop()
