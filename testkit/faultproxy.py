"""An HTTP proxy that injects network faults on a script: what the fault tests
(``tests/test_faults.py``) and the soak benchmark (``bench/soak.py``) put between a mount
and its origin (``lazyfs serve``, a registry) or a peer (``lazyfs peer``).

    proxy = FaultProxy(upstream_port)            # listens on 127.0.0.1:proxy.port
    proxy.inject("stall")                        # every chunk request stalls, until cleared
    proxy.inject("503", times=3)                 # the next three answer 503, then all pass
    proxy.script(["ok", "reset", "ok", "altered"])  # one outcome per request, in order
    proxy.mix({"drip": 1, "429": 2}, rate=0.3, seed=7)  # 30% of requests, drawn at random
    proxy.refuse()                               # nobody can connect (ECONNREFUSED)
    proxy.clear()                                # faults end; stalled answers are cut
    proxy.injected                               # Counter: faults injected by kind

Faults apply to *chunk requests* only, so that a mount can start and its manifest and
index arrive whole: blob GETs with a ``Range`` header (``/v2/.../blobs/...``) and peers'
chunk GETs (``/v1/chunks/...``). Everything else is forwarded untouched. The kinds
(``KINDS``):

    reset          the status line, headers and half the body, then a TCP reset
    stall          no byte at all, until the client gives up or the fault is cleared
    drip           the answer at ``drip_rate`` bytes per second
    500..504       that status, no body (503 with ``Retry-After: 1``)
    429            Too Many Requests with ``Retry-After: 1``
    short          a full ``Content-Length``, half the body, then the connection closes
    content-range  another range than asked for: the bytes one further on, and a
                   ``Content-Range`` that says so
    altered        the right status and length, one byte of the body flipped (a peer that
                   lies, a middlebox that corrupts)
    refused        (``refuse()``) the listening socket closes and open connections are
                   reset: connecting fails with ECONNREFUSED until ``clear()``

A persistent fault (``inject`` without ``times``, ``refuse``) lasts until ``clear()``;
``script`` outcomes come first, then ``inject``'s, then ``mix``'s draws. Each proxy runs
in threads of the calling process (one per connection), so a test steers it directly.
"""

from __future__ import annotations

import collections
import http.client
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable

KINDS = ("reset", "stall", "drip", "500", "502", "503", "504", "429", "short", "content-range",
         "altered", "refused")
"""Every fault this proxy injects (``refused`` through ``refuse()``, the rest per request)."""

_REQUEST_FAULTS = frozenset(KINDS) - {"refused"}
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                         "proxy-connection", "te", "trailer", "upgrade"})
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def is_chunk_request(method: str, path: str, headers: dict[str, str]) -> bool:
    """Whether faults apply: a ranged blob GET, a peer's chunk GET or batch POST."""
    if method == "POST":
        return path.startswith("/v1/chunks")
    if method != "GET":
        return False
    return ("/blobs/" in path and "range" in headers) or path.startswith("/v1/chunks/")


class FaultProxy:
    """Forwards HTTP/1.1 on ``127.0.0.1:port`` to ``127.0.0.1:upstream_port``, injecting
    faults into chunk requests as scripted. ``close()`` stops it."""

    def __init__(self, upstream_port: int, *, port: int = 0, drip_rate: float = 8 << 10,
                 max_stall: float = 120.0, upstream_timeout: float = 60.0) -> None:
        """``drip_rate``: bytes a second of a ``drip`` answer; ``max_stall``: seconds a
        stalled answer is held at most (then the connection closes)."""
        self.upstream_port = upstream_port
        self.drip_rate = drip_rate
        self.max_stall = max_stall
        self.upstream_timeout = upstream_timeout
        self.injected: collections.Counter[str] = collections.Counter()
        """Faults injected so far, by kind (``refused``: times the listener was closed)."""
        self.requests = 0
        """Requests forwarded or answered with a fault."""
        self.chunk_requests = 0
        self._lock = threading.Lock()
        self._script: collections.deque[str] = collections.deque()
        self._mode: str | None = None
        self._mode_left: int | None = None
        self._mix: tuple[list[str], list[float], float, random.Random] | None = None
        self._cleared = threading.Event()  # set by clear(): stalls end
        self._refusing = False
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._listener = self._listen(port)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    # -- the script ---------------------------------------------------------------------

    def inject(self, kind: str, times: int | None = None) -> None:
        """Answer chunk requests with ``kind`` (``times`` of them, or until ``clear()``)."""
        if kind == "refused":
            self.refuse()
            return
        _check(kind)
        with self._lock:
            self._cleared.clear()
            self._mode, self._mode_left = kind, times

    def script(self, outcomes: Iterable[str]) -> None:
        """Queue one outcome per coming chunk request (``ok`` passes it through)."""
        outcomes = list(outcomes)
        for o in outcomes:
            if o != "ok":
                _check(o)
        with self._lock:
            self._cleared.clear()
            self._script.extend(outcomes)

    def mix(self, weights: dict[str, float], *, rate: float, seed: int) -> None:
        """Inject a fault into a ``rate`` fraction of chunk requests, its kind drawn by
        ``weights`` from a generator seeded with ``seed`` (repeatable)."""
        for k in weights:
            _check(k)
        with self._lock:
            self._cleared.clear()
            self._mix = (list(weights), list(weights.values()), rate, random.Random(seed))

    def refuse(self) -> None:
        """Close the listening socket and reset every open connection: connections are
        refused until ``clear()``."""
        with self._lock:
            if self._refusing:
                return
            self._refusing = True
            self._cleared.clear()
            self.injected["refused"] += 1
            conns = list(self._conns)
        _close(self._listener)
        for c in conns:
            _cut(c)

    def clear(self) -> None:
        """End every fault: scripts, persistent faults, the mix, refusal; stalled and
        dripping answers are cut (their connections close)."""
        with self._lock:
            self._script.clear()
            self._mode = self._mode_left = None
            self._mix = None
            self._cleared.set()
            reopen = self._refusing
            self._refusing = False
        if reopen:
            self._listener = self._listen(self.port)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cleared.set()
            conns = list(self._conns)
        _close(self._listener)
        for c in conns:
            _cut(c)
        self._acceptor.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_fault(self) -> str | None:
        with self._lock:
            if self._script:
                o = self._script.popleft()
                return None if o == "ok" else o
            if self._mode is not None:
                kind = self._mode
                if self._mode_left is not None:
                    self._mode_left -= 1
                    if self._mode_left <= 0:
                        self._mode = self._mode_left = None
                return kind
            if self._mix is not None:
                kinds, weights, rate, rng = self._mix
                if rng.random() < rate:
                    return rng.choices(kinds, weights)[0]
            return None

    # -- plumbing -----------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        return s

    def _accept(self) -> None:
        while not self._closed:
            listener = self._listener
            if listener.fileno() < 0:
                time.sleep(0.02)  # refusing: clear() opens a new listener
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue  # closed under us (refuse, close)
            with self._lock:
                if self._refusing or self._closed:
                    _reset(client)
                    continue
                self._conns.add(client)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port,
                                              timeout=self.upstream_timeout)
        reader = client.makefile("rb")
        try:
            while not self._closed:
                request = _read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                if not self._answer(client, upstream, method, path, headers, body):
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(client)
            reader.close()
            _close(client)
            upstream.close()

    def _answer(self, client: socket.socket, upstream: http.client.HTTPConnection, method: str,
                path: str, headers: dict[str, str], body: bytes) -> bool:
        """Answer one request; False when the connection is done with."""
        with self._lock:
            self.requests += 1
            refusing = self._refusing
        if refusing:
            _reset(client)
            return False
        fault = None
        if is_chunk_request(method, path, headers):
            with self._lock:
                self.chunk_requests += 1
            fault = self._next_fault()
        if fault is not None:
            with self._lock:
                self.injected[fault] += 1
        if fault == "stall":
            self._stall(client)
            return False
        if fault is not None and fault.isdigit():
            status = int(fault)
            extra = {"Retry-After": "1"} if status in (429, 503) else {}
            _send_head(client, status, {**extra, "Content-Type": "text/plain"}, 0)
            return True
        if fault == "content-range":
            headers = {**headers, "range": _shift_range(headers["range"])}
        try:
            status, reason, out_headers, data = _forward(upstream, method, path, headers, body)
        except (OSError, http.client.HTTPException) as exc:
            upstream.close()
            msg = f"upstream failed: {exc}".encode()
            _send_head(client, 502, {"Content-Type": "text/plain"}, len(msg), "Bad Gateway")
            client.sendall(msg)
            return True
        # a batch answer is ended by the close of its connection: forwarded so, not sized
        until_close = method != "HEAD" and "content-length" not in out_headers
        length = len(data) if method != "HEAD" else int(out_headers.pop("content-length", "0") or 0)
        out_headers.pop("content-length", None)
        if fault == "altered" and data:
            at = random.randrange(len(data))
            data = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]
        if until_close:
            _send_head(client, status, {**out_headers, "Connection": "close"}, None, reason)
        else:
            _send_head(client, status, out_headers, length, reason)
        if method == "HEAD":
            return True
        if fault == "reset":
            client.sendall(data[: len(data) // 2])
            _reset(client)
            return False
        if fault == "short":
            client.sendall(data[: len(data) // 2])
            client.shutdown(socket.SHUT_WR)
            return False
        if fault == "drip":
            return self._drip(client, data) and not until_close
        client.sendall(data)
        return not until_close

    def _stall(self, client: socket.socket) -> None:
        """Send nothing until the client goes away, ``clear()`` or ``max_stall``."""
        until = time.monotonic() + self.max_stall
        while time.monotonic() < until and not self._cleared.is_set():
            ready, _, _ = select.select([client], [], [], 0.1)
            if ready:
                try:
                    if not client.recv(1, socket.MSG_PEEK):
                        return  # the client closed
                except OSError:
                    return
                time.sleep(0.1)  # it sent more (a pipelined request): keep stalling

    def _drip(self, client: socket.socket, data: bytes) -> bool:
        step = max(1, int(self.drip_rate / 20))
        for at in range(0, len(data), step):
            if self._cleared.is_set():
                client.sendall(data[at:])
                return True
            client.sendall(data[at : at + step])
            time.sleep(0.05)
        return True


def _check(kind: str) -> None:
    if kind not in _REQUEST_FAULTS:
        raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")


def _shift_range(value: str) -> str:
    """``bytes=A-B`` one byte further on: ``bytes=A+1-B+1``."""
    first, _, last = value.removeprefix("bytes=").partition("-")
    return f"bytes={int(first) + 1}-{int(last) + 1}"


def _read_request(reader) -> tuple[str, str, dict[str, str], bytes] | None:
    line = reader.readline(65537)
    if not line:
        return None
    try:
        method, path, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    except ValueError:
        return None
    headers: dict[str, str] = {}
    while True:
        h = reader.readline(65537)
        if not h or h in (b"\r\n", b"\n"):
            break
        key, _, value = h.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    n = int(headers.get("content-length", "0") or 0)
    body = reader.read(n) if n else b""
    return method, path, headers, body


def _forward(upstream: http.client.HTTPConnection, method: str, path: str,
             headers: dict[str, str], body: bytes) -> tuple[int, str, dict[str, str], bytes]:
    send = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP and k != "host"}
    for attempt in (1, 2):  # a kept-alive upstream connection may have closed meanwhile
        try:
            upstream.request(method, path, body=body or None, headers=send)
            resp = upstream.getresponse()
            data = resp.read()
            break
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            upstream.close()
            if attempt == 2:
                raise
    out = {k.lower(): v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP - {"content-length"}}
    if resp.will_close:
        upstream.close()
    return resp.status, resp.reason, out, data


def _send_head(client: socket.socket, status: int, headers: dict[str, str], length: int | None,
               reason: str | None = None) -> None:
    """The head of an answer; ``length`` None: one ended by the close of the connection."""
    lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'OK')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST), not the orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _cut(sock: socket.socket) -> None:
    """Cut a connection another thread is serving: its blocked read returns, and its
    close sends a reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
