"""A lean HTTP/1.1 client for one job: byte ranges of blobs over plain HTTP, fast.

httpx is the right client for registries (auth, tokens, redirects, TLS), but on loopback
from nginx it moves 252 MiB/s with 1 MiB ranges where reading the socket straight into a
preallocated buffer moves 934 MiB/s (curl: 910), and takes 1.06 ms for a 4 KiB range
where this takes 0.19 ms (curl: 0.10); medians of one run of ``bench/http_clients.py``
on a 2-core machine (``bench/results/2026-12-07T12-49-21Z``). So the bulk path goes
through this client: keep-alive connections, the body read with ``recv_into`` into one
``bytearray``, nothing else. Anything it does not
expect (a redirect, an auth challenge, chunked encoding) comes back as an
``UnexpectedResponse`` and the caller takes the httpx path instead.

Every wait (connecting, sending, the status line and headers, each step of the body) ends
at a deadline: ``timeout`` seconds after the wait began (``connect_timeout`` for
connecting), and never later than the ``deadline`` the caller passes for the request. A
server that stops answering costs one ``DeadlineError``, never a hang.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .errors import DeadlineError, IntegrityError, RefusedError, ServerError, UnreachableError

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_HEAD = 64 << 10
_RECV_STEP = 4 << 20
_RECV_PIECE = 64 << 10
_DISCARD_STEP = 256 << 10
"""The scratch buffer through which the bytes before a range in a whole body pass."""


@dataclasses.dataclass(eq=False)
class UnexpectedResponse(Exception):
    """The server answered with something other than a plain 200/206 body. (Not frozen:
    Python sets ``__traceback__`` on an exception that passes through a ``with``.)"""

    status: int
    headers: dict[str, str]


class _Conn:
    """One socket, and the deadlines of the request it carries now."""

    __slots__ = ("sock", "timeout", "deadline", "where")

    def __init__(self, sock: trio.socket.SocketType, timeout: float, where: str) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = math.inf
        self.where = where

    async def wait(self, step: Awaitable[T], what: str) -> T:
        """``step``, given until ``timeout`` from now or the request's deadline, whichever
        comes first; ``DeadlineError`` (naming ``what`` it waited for) past that."""
        with trio.move_on_at(min(self.deadline, trio.current_time() + self.timeout)) as scope:
            return await step
        assert scope.cancelled_caught
        raise DeadlineError(f"{self.where}: no {what} within {self.timeout:g} s")


class StreamReader:
    """An answer's body that ends with its connection, taken a piece at a time (memory:
    the piece asked for, plus at most what one read brings beyond it)."""

    def __init__(self, conn: _Conn, rest: bytes) -> None:
        self._conn = conn
        self._buf = bytearray(rest)
        self.taken = 0
        """Body bytes handed out so far."""

    async def exactly(self, n: int) -> bytearray:
        """The next ``n`` bytes of the body; ``ServerError`` if it ends before them."""
        conn = self._conn
        try:
            while len(self._buf) < n:
                part = await conn.wait(conn.sock.recv(max(_RECV_PIECE, min(n - len(self._buf), _RECV_STEP))),
                                       f"body bytes after {self.taken + len(self._buf)}")
                if not part:
                    raise ServerError(f"{conn.where}: connection closed after {self.taken + len(self._buf)} "
                                      f"body bytes, in the middle of the answer")
                self._buf += part
        except OSError as exc:
            raise ServerError(f"{conn.where}: connection dropped after {self.taken + len(self._buf)} "
                              f"body bytes: {exc.strerror or exc}") from exc
        out = self._buf[:n]
        del self._buf[:n]
        self.taken += n
        return out


class RangeClient:
    """GET with ``Range`` on keep-alive connections to one ``host:port``."""

    def __init__(self, host: str, port: int, *, max_idle: int = 8, connect_timeout: float = 10.0,
                 timeout: float = 30.0):
        """``connect_timeout`` bounds connecting, ``timeout`` each later wait (see above)."""
        self.host = host
        self.port = port
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout
        self._timeout = timeout

    async def _connect(self, deadline: float) -> _Conn:
        if self._idle:
            return self._idle.pop()
        with trio.move_on_at(min(deadline, trio.current_time() + self._connect_timeout)) as scope:
            try:
                stream_sock = await trio.socket.getaddrinfo(self.host, self.port,
                                                            type=socket.SOCK_STREAM)
                family, type_, proto, _, addr = stream_sock[0]
                sock = trio.socket.socket(family, type_, proto)
                try:
                    await sock.connect(addr)
                except BaseException:
                    sock.close()
                    raise
            except OSError as exc:
                kind = RefusedError if isinstance(exc, ConnectionRefusedError) else UnreachableError
                raise kind(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc
        if scope.cancelled_caught:
            raise UnreachableError(f"cannot connect to {self.host}:{self.port}: timed out")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock, self._timeout, f"{self.host}:{self.port}")

    async def get_range(self, path: str, offset: int, length: int,
                        headers: dict[str, str] | None = None, *, whole_ok: bool = True,
                        deadline: float = math.inf) -> bytearray:
        """The body of ``GET path`` with ``Range: bytes=offset-(offset+length-1)``.

        Returns exactly ``length`` bytes: from a 206, or from a 200 whose body is the whole
        resource (a server that ignores Range) when ``whole_ok``; of such a body only the
        bytes up to the range's end are read, whatever its Content-Length, and the
        connection is dropped. Without ``whole_ok`` a 200 must hold just the bytes asked
        for. Raises ``UnexpectedResponse`` for any other status, ``ServerError`` for a
        malformed, oversized or short answer or a connection dropped in the middle of the
        exchange (worth another try), ``UnreachableError`` when connecting fails,
        ``DeadlineError`` when a wait passes its deadline (``deadline``: trio's clock)."""
        return await self._get(path, offset, length, headers or {}, whole_ok, deadline)

    async def get(self, path: str, max_size: int, headers: dict[str, str] | None = None, *,
                  deadline: float = math.inf) -> bytearray:
        """The whole body of ``GET path`` (a 200 with a Content-Length); ``ServerError``
        when that length is over ``max_size`` (nothing of the body is read), otherwise
        as ``get_range``."""
        return await self._get(path, None, max_size, headers or {}, False, deadline)

    async def download(self, path: str, size: int, write: Callable[[memoryview], Awaitable[object]],
                       headers: dict[str, str] | None = None, *, deadline: float) -> None:
        """Pass the body of ``GET path``, a 200 of exactly ``size`` bytes, to ``write``
        piece by piece as it arrives (memory: one piece, whatever the size). The head may
        take until ``deadline`` (the server may fetch the content first); each later wait
        ``timeout``. ``IntegrityError`` for a body announced at another size, otherwise
        the errors of ``get_range``."""
        conn = await self._connect(deadline)
        conn.deadline = deadline
        reusable = False
        try:
            reusable = await self._stream(conn, path, size, write, headers or {})
        finally:
            if reusable and len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                conn.sock.close()

    async def post(self, path: str, body: bytes, headers: dict[str, str],
                   read: Callable[[StreamReader], Awaitable[T]], *, deadline: float) -> T:
        """``POST path`` with ``body``, whose answer is a 200 body ended by the close of the
        connection, handed to ``read`` as a ``StreamReader`` (so it takes what it expects as
        it arrives); what ``read`` returns. The head may take until ``deadline``, each later
        wait ``timeout``. ``UnexpectedResponse`` for any other status; otherwise the errors
        of ``get_range``. The connection is not used again."""
        conn = await self._connect(deadline)
        conn.deadline = deadline
        try:
            status, resp_headers, rest = await self._ask(
                conn, "POST", path, [f"Content-Length: {len(body)}", "Connection: close"], headers,
                body, head_deadline_only=True)
            if status != 200 or "content-length" in resp_headers or "transfer-encoding" in resp_headers:
                raise UnexpectedResponse(status, resp_headers)
            return await read(StreamReader(conn, rest))
        finally:
            conn.sock.close()

    async def _stream(self, conn: _Conn, path: str, size: int,
                      write: Callable[[memoryview], Awaitable[object]], headers: dict[str, str]) -> bool:
        status, resp_headers, rest = await self._ask(conn, "GET", path, [], headers, b"",
                                                     head_deadline_only=True)
        clen = resp_headers.get("content-length")
        if status != 200 or clen is None or "transfer-encoding" in resp_headers:
            raise UnexpectedResponse(status, resp_headers)
        if clen != str(size):
            raise IntegrityError(f"{self.host}:{self.port}{path}: announced {clen[:40]!r} bytes, "
                                 f"not the {size} its descriptor declares")
        if len(rest) > size:
            raise ServerError(f"{self.host}:{self.port}{path}: more bytes than announced")
        if rest:
            await write(memoryview(rest))
        pos = len(rest)
        buf = memoryview(bytearray(min(_RECV_STEP, max(size - pos, 1))))
        try:
            while pos < size:
                got = await conn.wait(conn.sock.recv_into(buf, min(size - pos, len(buf))),
                                      f"body bytes after {pos} of {size}")
                if not got:
                    raise ServerError(f"{self.host}:{self.port}{path}: connection closed after "
                                      f"{pos} of {size} body bytes")
                await write(buf[:got])
                pos += got
        except OSError as exc:
            raise ServerError(f"{self.host}:{self.port}{path}: connection dropped after {pos} "
                              f"of {size} body bytes: {exc.strerror or exc}") from exc
        return resp_headers.get("connection", "").lower() != "close"

    async def _get(self, path: str, offset: int | None, length: int, headers: dict[str, str],
                   whole_ok: bool, deadline: float) -> bytearray:
        conn = await self._connect(deadline)
        conn.deadline = deadline
        reusable = False
        try:
            body, reusable = await self._exchange(conn, path, offset, length, headers, whole_ok)
            return body
        finally:
            if reusable and len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                conn.sock.close()

    async def _ask(self, conn: _Conn, method: str, path: str, own: list[str], headers: dict[str, str],
                   body: bytes, *, head_deadline_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Send one request on ``conn`` (``own`` header lines, then ``headers``, then
        ``body``) and read the answer's head: ``(status, headers, bytes after the head)``.
        With ``head_deadline_only``, the head may take until the connection's deadline
        (the server may fetch the content first), not ``timeout``."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", *own,
                 "Accept-Encoding: identity", *(f"{k}: {v}" for k, v in headers.items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        if head_deadline_only:
            conn.timeout = math.inf
        try:
            await conn.wait(_send_all(conn.sock, request), "room to send the request")
            return await self._read_head(conn)
        except OSError as exc:
            raise ServerError(f"{self.host}:{self.port}: connection dropped before the "
                              f"answer: {exc.strerror or exc}") from exc
        finally:
            conn.timeout = self._timeout

    async def _exchange(self, conn: _Conn, path: str, offset: int | None, length: int,
                        headers: dict[str, str], whole_ok: bool) -> tuple[bytearray, bool]:
        """One request on ``conn``: bytes ``offset``+``length`` (``offset`` None: the
        whole body, at most ``length`` bytes)."""
        status, resp_headers, rest = await self._ask(
            conn, "GET", path, [] if offset is None else [f"Range: bytes={offset}-{offset + length - 1}"],
            headers, b"")
        clen = resp_headers.get("content-length")
        if status not in (200, 206) or clen is None or "transfer-encoding" in resp_headers:
            raise UnexpectedResponse(status, resp_headers)
        if not (clen.isascii() and clen.isdigit()):
            raise ServerError(f"{self.host}:{self.port}: bad Content-Length {clen[:40]!r}")
        n = int(clen)
        if offset is None:
            if status != 200:
                raise UnexpectedResponse(status, resp_headers)
            if n > length:
                raise ServerError(f"{self.host}:{self.port}{path}: {n}-byte body is over the "
                                  f"{length}-byte limit")
        elif status == 206:
            expected = f"bytes {offset}-{offset + length - 1}/"
            if n != length or not resp_headers.get("content-range", "").startswith(expected):
                raise ServerError(f"{self.host}:{self.port}{path}: answered range "
                                  f"{resp_headers.get('content-range')!r} for bytes {offset}+{length}")
        elif n < offset + length:
            raise ServerError(f"{self.host}:{self.port}{path}: {n}-byte body has no bytes {offset}+{length}")
        elif not whole_ok and n != offset + length:
            raise ServerError(f"{self.host}:{self.port}{path}: announced a {n}-byte body for "
                              f"bytes {offset}+{length}")
        if offset is None:
            start, stop = 0, n
        else:
            start, stop = (0, length) if status == 206 else (offset, offset + length)
        body, complete = await self._read_body(conn, rest, n, start, stop, path)
        reusable = complete and resp_headers.get("connection", "").lower() != "close"
        if status == 200 and offset is not None:
            log.debug("%s: server ignored Range; read %d bytes of a %d-byte body and dropped "
                      "the connection", path, stop, n)
        return body, reusable

    async def _read_body(self, conn: _Conn, rest: bytes, size: int, start: int, stop: int,
                         path: str) -> tuple[bytearray, bool]:
        """Bytes ``start`` to ``stop`` of a ``size``-byte body whose first bytes arrived with
        the head (``rest``), and whether the connection can carry another request. What a
        server announces costs nothing: the bytes before ``start`` go through a small
        scratch buffer, those past ``stop`` are never read (the connection is then not
        reused), so memory is ``stop - start`` bytes, whatever ``size`` says."""
        body = bytearray(stop - start)
        view = memoryview(body)
        pos = min(len(rest), stop)  # body bytes consumed so far
        if pos > start:
            body[: pos - start] = rest[start:pos]
        scratch: memoryview | None = None
        try:
            while pos < stop:
                if pos < start:
                    scratch = scratch or memoryview(bytearray(min(start - pos, _DISCARD_STEP)))
                    step = conn.sock.recv_into(scratch, min(start - pos, len(scratch)))
                else:
                    step = conn.sock.recv_into(view[pos - start :], min(stop - pos, _RECV_STEP))
                got = await conn.wait(step, f"body bytes after {pos} of {size}")
                if not got:
                    raise ServerError(f"{self.host}:{self.port}{path}: connection closed after "
                                      f"{pos} of {size} body bytes")
                pos += got
        except OSError as exc:
            raise ServerError(f"{self.host}:{self.port}{path}: connection dropped after {pos} "
                              f"of {size} body bytes: {exc.strerror or exc}") from exc
        # bytes past the body: a server that sends more than it announced is not asked again
        return body, stop == size and len(rest) <= size

    async def _read_head(self, conn: _Conn) -> tuple[int, dict[str, str], bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > _MAX_HEAD:
                raise ServerError(f"{self.host}:{self.port}: response head too large")
            part = await conn.wait(conn.sock.recv(65536),
                                   "status line and headers" if not data else "end of the headers")
            if not part:
                raise ServerError(f"{self.host}:{self.port}: connection closed before a response")
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        try:
            version, code, *_ = status_line.split(" ", 2)
            status = int(code)
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
        except ValueError:
            raise ServerError(f"{self.host}:{self.port}: malformed status line "
                              f"{status_line[:80]!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        return status, headers, rest

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.sock.close()
        self._idle.clear()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
