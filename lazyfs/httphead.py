"""One HTTP/1.1 request head from an untrusted caller: parsed, or refused as a whole.

The peer server (``lazyfs/peer.py``) reads request heads straight off its sockets, and
any byte sequence may arrive there, token or not. ``parse_head`` turns the bytes before
the blank line into a ``RequestHead`` or raises ``MalformedRequest`` (the server answers
400 and closes the connection: after a head it could not read, it cannot know where the
next request starts). It never raises anything else, whatever the input.

What is accepted is the origin form of RFC 9112 and no more: a token method, a target
of visible ASCII starting with ``/``, ``HTTP/1.x``, and ``name: value`` lines whose
values keep their raw bytes (compare secrets on bytes: ``hmac.compare_digest`` refuses
non-ASCII ``str``). Only a ``POST`` may have a body (a batch of chunks), of at most
``MAX_BODY`` bytes with a ``Content-Length``: any other request that announces a body is
refused rather than read as the next request.
"""

from __future__ import annotations

import dataclasses
import re

from fetcher.peerwire import MAX_BATCH_BODY

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[^\x00\r\n]*")
MAX_BODY = MAX_BATCH_BODY


class MalformedRequest(ValueError):
    """The head is not a request this server can read; the message says why (it goes
    back to the caller in the 400 answer)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestHead:
    method: str
    path: str
    """The target before any ``?``, as sent (not percent-decoded)."""
    query: str
    """The target after the first ``?`` (empty if none)."""
    headers: dict[str, bytes]
    """Lower-case names; the value's bytes without surrounding blanks (the last line wins)."""
    body_length: int = 0
    """The bytes of body that follow the head (a ``POST``'s)."""
    body: bytes = b""
    """That body, once the connection has read it."""

    def header(self, name: str) -> str:
        """A header's value as text (each byte one character: never fails); '' if absent."""
        return self.headers.get(name, b"").decode("latin-1")

    @property
    def keep_alive(self) -> bool:
        return self.header("connection").strip().lower() != "close"


def parse_head(head: bytes) -> RequestHead:
    """The request in ``head`` (the bytes before the blank line, CRLF line ends);
    MalformedRequest for anything else."""
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise MalformedRequest("malformed request line")
    method, target, version = parts
    if not _METHOD.fullmatch(method) or not _VERSION.fullmatch(version):
        raise MalformedRequest("malformed request line")
    if not _TARGET.fullmatch(target):
        raise MalformedRequest("the target must be a path of visible ASCII")
    headers: dict[str, bytes] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            raise MalformedRequest("malformed header line")
        headers[name.decode("ascii").lower()] = value.strip(b" \t")
    length = headers.get("content-length", b"0")
    if "transfer-encoding" in headers or length != b"0" and method != b"POST":
        raise MalformedRequest("a request body is not accepted")
    if not (length.isdigit() and len(length) <= 9 and int(length) <= MAX_BODY):
        raise MalformedRequest(f"a request body is 0-{MAX_BODY} bytes, with a Content-Length")
    path, _, query = target.decode("ascii").partition("?")
    return RequestHead(method=method.decode("ascii"), path=path, query=query, headers=headers,
                       body_length=int(length))
