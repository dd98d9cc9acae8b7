"""The HTTP/1.1 side of the chunk server (``lazyfs.peer``): connections, request heads,
answers. What a request means is the ``answer`` callback's business.

Nothing a caller sends can end the process: each connection is handled on its own, a
head ``httphead.parse_head`` refuses is answered 400 and the connection closed, and an
unexpected error while answering one is logged and closes that connection only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from .errors import ExitCode, UserError
from .httphead import MalformedRequest, RequestHead, parse_head

log = logging.getLogger(__name__)

_MAX_HEAD = 16 << 10
_SEND_PIECE = 1 << 20
_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 405: "Method Not Allowed", 502: "Bad Gateway", 503: "Service Unavailable",
            508: "Loop Detected"}


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: bytes | memoryview
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    content_type: str | None = None
    """Default: ``application/octet-stream`` for a success, ``text/plain`` otherwise."""
    file: tuple[Path, int] | None = None
    """The body is this file of this size instead (``body`` empty): sent a piece at a
    time, read as it goes, so that a large blob is never held whole."""
    stream: Callable[[Send], Awaitable[None]] | None = None
    """The body is what this sends (``body`` empty), as it has it; the connection's close
    ends it (its length is not known before)."""


Send = Callable[[Sequence[bytes | memoryview]], Awaitable[None]]
"""Sends pieces of a streamed answer, each taken by the caller within ``send_timeout``."""


class ConnectionLimits(Protocol):
    """The fields of ``lazyfs.peer.PeerServerConfig`` that bound connections."""

    @property
    def idle_timeout(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def send_timeout(self) -> float: ...


class ConnectionCounts(Protocol):
    """The counters of ``lazyfs.peer.PeerServerStats`` that connections move."""

    requests: int
    malformed: int
    refused_connections: int
    send_timeouts: int
    failed_connections: int


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """Bind (before anything else starts, so a port in use is a one-line error)."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.USAGE) from exc


class Connections:
    """Keep-alive HTTP/1.1 connections, each request answered by ``answer`` and counted
    in ``counts``."""

    def __init__(self, answer: Callable[[RequestHead], Awaitable[Answer]], limits: ConnectionLimits,
                 counts: ConnectionCounts) -> None:
        self._answer = answer
        self._limits = limits
        self._counts = counts
        self.open = 0
        """Connections open now."""

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self.open >= self._limits.max_connections:
            self._counts.refused_connections += 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(stream)
            return
        self.open += 1
        try:
            await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        except trio.TooSlowError:  # the caller stopped taking an answer
            self._counts.send_timeouts += 1
            await trio.aclose_forcefully(stream)
        except Exception:  # a bug met by one caller must not end the mount or `lazyfs peer`
            self._counts.failed_connections += 1
            log.exception("peer server: unexpected error answering a caller; closing its connection")
        finally:
            self.open -= 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()

    async def _exchange(self, stream: trio.SocketStream) -> None:
        """Answer the requests of one keep-alive connection until either side ends it."""
        buf = b""
        while True:
            with trio.move_on_after(self._limits.idle_timeout):
                while b"\r\n\r\n" not in buf and len(buf) <= _MAX_HEAD:
                    part = await stream.receive_some(65536)
                    if not part:
                        return
                    buf += part
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep and len(buf) <= _MAX_HEAD:
                return  # idle too long
            if len(head) > _MAX_HEAD:
                await self._refuse(stream, f"request head over {_MAX_HEAD} bytes")
                return
            buf = rest
            try:
                request = parse_head(head)
            except MalformedRequest as exc:
                await self._refuse(stream, str(exc))
                return
            if request.body_length:
                with trio.move_on_after(self._limits.idle_timeout):
                    while len(buf) < request.body_length:
                        part = await stream.receive_some(65536)
                        if not part:
                            return
                        buf += part
                if len(buf) < request.body_length:
                    return  # too slow to send its body
                request = dataclasses.replace(request, body=buf[: request.body_length])
                buf = buf[request.body_length :]
            self._counts.requests += 1
            answer = await self._answer(request)
            await self._send(stream, answer, keep=request.keep_alive and answer.stream is None)
            if not request.keep_alive or answer.stream is not None:
                return

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        """Answer a head that cannot be read 400 (the connection is then closed: where
        the next request starts is unknown)."""
        self._counts.requests += 1
        self._counts.malformed += 1
        await self._send(stream, Answer(400, f"{reason}\n".encode()), keep=False)

    async def _send(self, stream: trio.SocketStream, answer: Answer, *, keep: bool) -> None:
        status, body = answer.status, answer.body
        length = answer.file[1] if answer.file else len(body)
        content_type = answer.content_type
        if content_type is None:
            content_type = "application/octet-stream" if status < 300 else "text/plain"
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Content-Type: {content_type}"]
        if answer.stream is None:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in answer.headers.items()]
        if not keep:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # each piece must be taken within send_timeout (TooSlowError: _connection closes it)
        timeout = self._limits.send_timeout
        if answer.stream is not None:
            with trio.fail_after(timeout):
                await stream.send_all(head)

            async def send(pieces: Sequence[bytes | memoryview]) -> None:
                if sum(map(len, pieces)) <= 64 << 10:  # a frame's head and bytes in one write
                    pieces = [b"".join(pieces)]
                for piece in pieces:
                    view = memoryview(piece)
                    for at in range(0, len(view), _SEND_PIECE):
                        with trio.fail_after(timeout):
                            await stream.send_all(view[at : at + _SEND_PIECE])

            await answer.stream(send)
            return
        if answer.file is not None:
            with trio.fail_after(timeout):
                await stream.send_all(head)
            await _send_file(stream, *answer.file, timeout)
            return
        if len(body) <= 64 << 10:
            with trio.fail_after(timeout):
                await stream.send_all(head + body)
            return
        with trio.fail_after(timeout):
            await stream.send_all(head)
        view = memoryview(body)
        for at in range(0, len(view), _SEND_PIECE):
            with trio.fail_after(timeout):
                await stream.send_all(view[at : at + _SEND_PIECE])


async def _send_file(stream: trio.SocketStream, path: Path, size: int, piece_seconds: float) -> None:
    """Send the ``size`` bytes of ``path``; a file that turns out shorter ends the
    connection (its head announced ``size``)."""
    sent = 0
    async with await trio.open_file(path, "rb") as f:
        while sent < size:
            piece = await f.read(min(_SEND_PIECE, size - sent))
            if not piece:
                raise trio.BrokenResourceError(f"{path} ended after {sent} of {size} bytes")
            with trio.fail_after(piece_seconds):
                await stream.send_all(piece)
            sent += len(piece)


def parse_range(header: str, n: int) -> tuple[int, int]:
    """``[start, end)`` of a ``bytes=first-[last]`` Range of an ``n``-byte body;
    ValueError for any other, or one outside the body."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.partition("-")
    if unit.strip() != "bytes" or not first.isdigit():
        raise ValueError(header)
    start = int(first)
    end = int(last) + 1 if last.strip() else n
    if start >= n or end <= start:
        raise ValueError(header)
    return start, min(end, n)
