"""The HTTP server under ``lazyfs serve`` (``serve.py`` holds its routes): a thread per
connection, keep-alive, an answered-requests record, counts for ``--metrics``, an
optional access log, and the stand-ins for a slow link that tests and benchmarks use (a
delay before each answer, a byte rate shared by all connections).

A handler subclass gives ``_route`` (answer one request) and ``_error`` (the body of an
``HTTPError``); a client that goes away mid-request is ordinary, and an unexpected error
is logged and answered 500.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

log = logging.getLogger("lazyfs.serve")

RequestRecord = tuple[str, str, "str | None", int]  # (method, path, Range header, status)


class HTTPError(Exception):
    """An answer other than success: ``status``, the API's error ``code``, a message,
    and headers to send with it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class OriginServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-request (a killed mount, a cancelled hedge) is
        ordinary: one debug line, not a traceback on the console."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("client %s went away: %s", client_address, exc)
            return
        super().handle_error(request, client_address)

    def __init__(self, addr: tuple[str, int], handler: type[OriginHandler], delay: float,
                 access_log: IO[str] | None, rate: float = 0.0):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.delay = delay
        self.rate = rate
        self.link_free = 0.0  # with a rate: when the link has sent what it was given
        self.access_log = access_log
        self.requests: list[RequestRecord] = []
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.status_counts: dict[int, int] = {}
        self.bytes_sent = 0
        super().__init__(addr, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut open keep-alive connections so their handler threads end."""
        with self.lock:
            conns = list(self.connections)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: OriginServer

    def version_string(self) -> str:
        return "lazyfs-serve"

    def _route(self, head: bool) -> None:
        raise NotImplementedError

    def _error(self, err: HTTPError, head: bool) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def _unsupported(self) -> None:
        self.close_connection = True  # a body we will not read may follow
        self._error(HTTPError(405, "UNSUPPORTED", f"{self.command} is not supported"), False)

    do_POST = do_PUT = do_PATCH = do_DELETE = _unsupported

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # we log once per response in _done, with the Range and byte count

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _status(self, status: int) -> None:
        """Send the status line, recording the request first: a client that has seen
        the answer will find it in ``requests``."""
        self.server.requests.append((self.command, self.path, self.headers.get("Range"), status))
        self.send_response(status)

    def _done(self, status: int, nbytes: int) -> None:
        with self.server.lock:
            self.server.status_counts[status] = self.server.status_counts.get(status, 0) + 1
            self.server.bytes_sent += nbytes
        rng = self.headers.get("Range")
        log.debug("%s %s range=%s -> %d %d", self.command, self.path, rng, status, nbytes)
        if self.server.access_log is not None:
            line = f"{time.time():.6f} {self.command} {self.path} {rng or '-'} {status} {nbytes}\n"
            with self.server.lock:
                self.server.access_log.write(line)
                self.server.access_log.flush()

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self._status(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
        self._done(status, 0 if head else len(body))

    def _handle(self, head: bool) -> None:
        if self.server.delay:
            time.sleep(self.server.delay)
        try:
            self._route(head)
        except HTTPError as err:
            self._error(err, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("error serving %s %s", self.command, self.path)
            self.close_connection = True
            self._error(HTTPError(500, "UNKNOWN", "internal error"), head)

    def _send_file(self, f: IO[bytes], start: int, length: int) -> int:
        """Send ``length`` bytes of ``f`` from ``start``, at most ``rate`` bytes a second
        over all connections when the server has one (tests stand in for a thin link
        with it); the count sent."""
        rate = self.server.rate
        if not rate:
            return self.connection.sendfile(f, start, length)
        sent = 0
        while sent < length:
            n = min(length - sent, 64 << 10)
            with self.server.lock:  # the link is shared: each piece takes its turn on it
                now = time.monotonic()
                done_at = max(now, self.server.link_free) + n / rate
                self.server.link_free = done_at
            time.sleep(done_at - now)
            n = self.connection.sendfile(f, start + sent, n)
            if n == 0:
                break
            sent += n
        return sent


class ServerHandle:
    """A bound server; ``start()`` serves on a daemon thread, ``close()`` stops it."""

    def __init__(self, server: OriginServer) -> None:
        self._server = server
        self._thread: threading.Thread | None = None
        host, self.port = server.server_address[:2]
        self.host = str(host)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"

    @property
    def requests(self) -> list[RequestRecord]:
        """Every answered request, in order: (method, path, Range header, status)."""
        return self._server.requests

    @property
    def rate(self) -> float:
        """Bytes a second that blob bodies go out at, over all connections (0: as fast as
        they can). Settable while serving: a test widens a thin link once it has served its
        purpose; bodies already being sent keep the rate they started with."""
        return self._server.rate

    @rate.setter
    def rate(self, rate: float) -> None:
        self._server.rate = rate

    def start(self) -> ServerHandle:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"lazyfs-serve:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.drop_connections()
        self._server.server_close()
        if self._server.access_log is not None:
            self._server.access_log.close()

    def __enter__(self) -> ServerHandle:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
