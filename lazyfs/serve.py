"""Serve a directory of OCI image layouts over the read side of the distribution API.

Every OCI layout below ``root`` (a directory holding ``oci-layout`` and ``index.json``, at
any depth) is a repository named by its path relative to ``root``: ``root/team/app`` is
``team/app``. Served, read-only:

    GET      /v2/                               200 {}
    GET|HEAD /v2/<name>/manifests/<tag|digest>  the manifest bytes, its media type, its digest
    GET|HEAD /v2/<name>/blobs/<digest>          whole (200) or one byte range (206, 416)
    GET      /v2/<name>/tags/list               {"name": ..., "tags": [...]}

Errors use the distribution-spec JSON form. Names are checked component by component and
the resolved directory must lie inside ``root``, so neither ``..`` nor ``%2e%2e`` nor a
symlink leads out. Blob bodies go out with ``sendfile``: no blob is read into Python.
A request the stdlib parses but these routes cannot (a target that is no URL path, numbers
no int holds) is answered 400, never 500.
This is a test and benchmark origin, not a registry: it verifies nothing it serves.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

from blockindex.errors import ImageError
from blockindex.oci import (
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Layout,
    check_digest,
)

from .errors import ExitCode, UserError
from .servehttp import HTTPError, OriginHandler, OriginServer, ServerHandle

log = logging.getLogger("lazyfs.serve")

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_ROUTE_RE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_TAGS_RE = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
_RANGE_RE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$")  # longer: ignored (RFC 9110 allows it)
_MAX_MANIFEST = 4 << 20


class _Server(OriginServer):
    """The origin for the layouts under ``root``."""

    def __init__(self, addr: tuple[str, int], root: Path, delay: float, access_log: IO[str] | None,
                 rate: float = 0.0):
        self.root = root.resolve()
        super().__init__(addr, _Handler, delay, access_log, rate)

    def layout(self, name: str) -> Layout:
        """The layout behind repository ``name``; HTTPError if invalid or unknown."""
        parts = name.split("/")
        if not all(_COMPONENT_RE.match(p) for p in parts):
            raise HTTPError(400, "NAME_INVALID", f"invalid repository name {name!r}")
        path = self.root.joinpath(*parts)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise HTTPError(404, "NAME_UNKNOWN", f"repository {name!r} not known") from None
        if not real.is_relative_to(self.root):
            raise HTTPError(404, "NAME_UNKNOWN", f"repository {name!r} not known")
        layout = Layout(real)
        if not layout.is_layout():
            raise HTTPError(404, "NAME_UNKNOWN", f"repository {name!r} not known")
        return layout


class _Handler(OriginHandler):
    server: _Server

    def _error(self, err: HTTPError, head: bool) -> None:
        body = json.dumps({"errors": [{"code": err.code, "message": err.message, "detail": {}}]})
        headers = {"Content-Type": "application/json", **err.headers}
        self._send(err.status, headers, body.encode(), head)

    def _route(self, head: bool) -> None:
        try:
            url = urlsplit(self.path)
        except ValueError:  # e.g. http://[::1/ : an unclosed IPv6 address
            raise HTTPError(400, "UNSUPPORTED", "malformed request target") from None
        path = unquote(url.path)
        if path in ("/v2", "/v2/"):
            self._send(200, {"Content-Type": "application/json",
                             "Docker-Distribution-API-Version": "registry/2.0"}, b"{}", head)
            return
        if m := _TAGS_RE.match(path):
            if head:
                raise HTTPError(405, "UNSUPPORTED", "HEAD is not supported on tags/list")
            self._tags(self.server.layout(m["name"]), m["name"], parse_qs(url.query))
            return
        m = _ROUTE_RE.match(path)
        if not m:
            raise HTTPError(404, "NOT_FOUND", f"no such endpoint {path!r}")
        layout = self.server.layout(m["name"])
        if m["kind"] == "manifests":
            self._manifest(layout, m["name"], m["ref"], head)
        else:
            self._blob(layout, _digest(m["ref"]), head)

    def _tags(self, layout: Layout, name: str, query: dict[str, list[str]]) -> None:
        tags = sorted(_tags(layout))
        if last := query.get("last", [""])[0]:
            tags = [t for t in tags if t > last]
        if n := query.get("n", [""])[0]:
            if not (n.isascii() and n.isdigit() and len(n) <= 18):
                raise HTTPError(400, "PAGINATION_NUMBER_INVALID", f"bad n={n!r}")
            tags = tags[: int(n)]
        body = json.dumps({"name": name, "tags": tags}).encode()
        self._send(200, {"Content-Type": "application/json"}, body, False)

    def _manifest(self, layout: Layout, name: str, ref: str, head: bool) -> None:
        if ":" in ref:
            digest, desc = _digest(ref), None
            for d in _descriptors(layout):
                if d.get("digest") == digest:
                    desc = d
                    break
        else:
            if not _TAG_RE.match(ref):
                raise HTTPError(400, "TAG_INVALID", f"invalid tag {ref!r}")
            desc = _tags(layout).get(ref)
            if desc is None or not isinstance(desc.get("digest"), str):
                raise HTTPError(404, "MANIFEST_UNKNOWN", f"{name}: no manifest tagged {ref!r}")
            digest = _digest(desc["digest"])
        try:
            with open(layout.blob_path(digest), "rb") as f:
                data = f.read(_MAX_MANIFEST + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise HTTPError(404, "MANIFEST_UNKNOWN", f"{name}: no manifest {ref}") from None
        if len(data) > _MAX_MANIFEST:
            raise HTTPError(404, "MANIFEST_UNKNOWN", f"{name}: {ref} is too big for a manifest")
        headers = {
            "Content-Type": _media_type(desc, data),
            "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"',
        }
        self._send(200, headers, data, head)

    def _blob(self, layout: Layout, digest: str, head: bool) -> None:
        try:
            f = open(layout.blob_path(digest), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise HTTPError(404, "BLOB_UNKNOWN", f"blob {digest} not known") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end = 0, size  # [start, end)
            status = 200
            headers = {
                "Content-Type": "application/octet-stream",
                "Docker-Content-Digest": digest,
                "Accept-Ranges": "bytes",
                "ETag": f'"{digest}"',
                "Cache-Control": "max-age=31536000",
            }
            rng = self.headers.get("Range")
            if rng is not None and (parsed := _parse_range(rng, size)) is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            headers["Content-Length"] = str(end - start)
            self._status(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            sent = 0
            if not head and end > start:
                sent = self._send_file(f, start, end - start)
                if sent != end - start:  # the file shrank under us: the framing is broken
                    self.close_connection = True
            self._done(status, sent)


def _digest(ref: str) -> str:
    try:
        return check_digest(ref)
    except ImageError:
        raise HTTPError(400, "DIGEST_INVALID", f"malformed digest {ref!r}") from None


def _descriptors(layout: Layout) -> list[dict[str, Any]]:
    try:
        return [d for d in layout.index().get("manifests", []) if isinstance(d, dict)]
    except ImageError as exc:
        raise HTTPError(500, "UNKNOWN", str(exc)) from None


def _tags(layout: Layout) -> dict[str, dict[str, Any]]:
    try:
        return layout.tags()
    except ImageError as exc:
        raise HTTPError(500, "UNKNOWN", str(exc)) from None


def _media_type(desc: dict[str, Any] | None, data: bytes) -> str:
    if desc is not None and isinstance(desc.get("mediaType"), str):
        return desc["mediaType"]
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
            return doc["mediaType"]
        if isinstance(doc, dict) and "manifests" in doc:
            return MEDIA_TYPE_OCI_INDEX
    except (ValueError, RecursionError):  # nested too deep: RecursionError
        pass
    return MEDIA_TYPE_OCI_MANIFEST


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for one ``bytes=`` range; None to ignore the header (multi-range or
    another unit: a full 200 answer is allowed); HTTPError 416 if unsatisfiable."""
    m = _RANGE_RE.match(header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    unsatisfiable = HTTPError(416, "RANGE_INVALID", f"range {header!r} outside 0-{size}",
                              {"Content-Range": f"bytes */{size}"})
    if not m[1]:  # suffix: the last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - n), size
    start = int(m[1])
    end = int(m[2]) + 1 if m[2] else max(size, start + 1)
    if end <= start:
        return None  # last < first: an invalid range, which RFC 9110 says to ignore
    if start >= size:
        raise unsatisfiable
    return start, min(end, size)


def make_server(
    root: Path, host: str, port: int, *, delay: float = 0.0, access_log: Path | None = None,
    rate: float = 0.0,
) -> ServerHandle:
    """Bind a server for the layouts under ``root`` (port 0: an ephemeral port); it
    answers nothing until ``start()`` or ``serve_forever()``. ``delay`` seconds are
    slept before each response, to stand in for a link's round trip, and blob bodies go
    out at ``rate`` bytes a second at most (0: as fast as they can)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    logf = open(access_log, "a", encoding="utf-8") if access_log is not None else None  # noqa: SIM115
    return ServerHandle(_Server((host, port), root, delay, logf, rate))


def serve_forever(root: Path, host: str, port: int, *, metrics: tuple[str, int] | None = None) -> None:
    """``lazyfs serve DIR --listen HOST:PORT``: serve until interrupted."""
    try:
        handle = make_server(root, host, port)
    except OSError as exc:  # in use, not this host's address, a name that does not resolve
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.USAGE) from None
    log.info("serving OCI layouts under %s at %s", root, handle.url)
    if metrics is not None:
        from .metrics import Metrics, serve_samples

        m = Metrics()
        m.add_source(serve_samples(handle._server))
        m.serve(*metrics)
    try:
        handle.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        handle.close()
