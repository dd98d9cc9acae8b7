"""Reading httpx response bodies with a bound: what a server announces or sends never
decides how much this process holds.

    whole_body(response, cap, what)    the body piece by piece, at most ``cap`` bytes
    read_whole(response, cap, what)    the same, joined (manifests, configs, tokens)
    read_span(response, o, n, where)   the ``n`` bytes at ``o`` of an answer to a Range GET

A Content-Length over the cap is refused before a byte of the body is read; a body that
runs past the cap is cut off there; one shorter or longer than its Content-Length is an
error, and so is any other size than its descriptor's for content that has one. A
whole-body 200 to a range request is read up to the range's end and no further (the
caller's ``response.aclose()`` then drops the connection). Every error is a
``ServerError`` (a size other than declared: ``IntegrityError``; bytes that trickle in:
``UnreachableError``). The lean client's ``RangeClient._read_body`` (``http1.py``) keeps
the same bound on raw sockets.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import httpx
import trio

from .errors import IntegrityError, ServerError, UnreachableError

LOW_SPEED = (64 << 10, 60.0)
"""A body that brings fewer than this many bytes in this many seconds is given up
(``UnreachableError``), as curl's ``--speed-limit`` does: each wait for bytes has its own
timeout, but a server that trickles a byte at a time would hold a download forever."""


def check_identity(response: httpx.Response, where: str) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        raise ServerError(f"{where}: answered with Content-Encoding {encoding}")


async def _arriving(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives; in one piece if it is already in memory (MockTransport)."""
    if response.is_stream_consumed:
        yield response.content
        return
    floor, window = LOW_SPEED
    since, got = trio.current_time(), 0
    async for piece in response.aiter_raw():
        got += len(piece)
        now = trio.current_time()
        if now - since >= window:
            if got < floor:
                raise UnreachableError(
                    f"{response.url.host}: {response.request.method} {response.url.path} sent "
                    f"{got} bytes in {now - since:.0f} s, under {floor >> 10} KiB in {window:g} s; given up")
            since, got = now, 0
        yield piece


def _declared(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


async def whole_body(response: httpx.Response, cap: int, what: str, *,
                     exact: bool = False) -> AsyncIterator[bytes]:
    """The whole body of ``response``, piece by piece, checked against ``cap`` and its
    own Content-Length. With ``exact``, ``cap`` is the size the content's descriptor
    declares, and a body of any other size is an ``IntegrityError``."""
    declared = _declared(response)
    wrong = IntegrityError if exact else ServerError
    limit = f"the {cap} bytes its descriptor declares" if exact else f"the {cap}-byte limit"
    if declared is not None and (declared > cap or exact and declared != cap):
        raise wrong(f"{what} is {declared} bytes, {'not' if exact else 'over'} {limit}")
    check_identity(response, what)
    total = 0
    async for piece in _arriving(response):
        total += len(piece)
        if total > cap:
            raise wrong(f"{what} is over {limit}")
        yield piece
    if declared is not None and declared != total:
        raise ServerError(f"{what}: {total} bytes arrived of {declared}")
    if exact and total != cap:
        raise wrong(f"{what} is {total} bytes, not {limit}")


async def read_whole(response: httpx.Response, cap: int, what: str,
                     hasher: hashlib._Hash | None = None) -> bytes:
    """``whole_body`` in one piece (fed to ``hasher`` as it arrives)."""
    parts: list[bytes] = []
    async for piece in whole_body(response, cap, what):
        if hasher is not None:
            hasher.update(piece)
        parts.append(piece)
    return b"".join(parts)


async def read_span(response: httpx.Response, offset: int, length: int, where: str) -> bytearray:
    """The ``length`` bytes at ``offset`` of the resource, from a 206 (its body is those
    bytes, no more) or a 200 (its body is the whole resource: the bytes before ``offset``
    are dropped as they pass, and reading stops at ``offset + length``)."""
    whole = response.status_code == 200
    skip = offset if whole else 0
    buf = bytearray(length)
    view = memoryview(buf)
    filled = 0
    async for piece in _arriving(response):
        if skip:
            if len(piece) <= skip:
                skip -= len(piece)
                continue
            piece, skip = piece[skip:], 0
        end = filled + len(piece)
        if end > length:
            if whole:  # stop when we have our bytes
                view[filled:] = piece[: length - filled]
                return buf
            raise ServerError(f"{where}: more bytes arrived than asked for")
        view[filled:end] = piece
        filled = end
        if filled == length and whole:
            return buf
    if filled != length:
        raise ServerError(f"{where}: only {filled} of {length} bytes arrived")
    return buf
