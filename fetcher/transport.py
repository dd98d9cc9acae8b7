"""How a registry client reaches the network: plain or TLS, which CAs, and the one seam
its requests go through.

    open_http_client(...)      -> an httpx.AsyncClient (and its LeanRangeTransport, if any)
    LeanRangeTransport(general) an httpx transport: Range GETs over plain HTTP go through
                               the lean client (``http1.py``), everything else through
                               ``general`` (httpx's own transport)
    filled_body(response)      -> the lean client's buffer behind a response, if it has one
    prepare()                  what the first client of the process needs, made ahead

Every request of a ``RegistryClient`` (ranges, redirects followed, kept redirect URLs,
manifests, whole blobs) goes through httpx and so through the same auth, redirect and
retry code; only the last step, moving the bytes of a range, is chosen here. The lean
client moves them several times faster (``bench/http_clients.py``), and whatever it does
not expect is left to httpx:

- a redirect, an auth challenge or an error status is answered to httpx as it came
  (status and headers; the body, which nothing reads, left unread), and httpx and the
  registry client take it from there: a redirect is followed (through this transport
  again), a challenge met, a 5xx retried;
- a 400 (whose body says whether the port speaks TLS: see ``RegistryClient._send``), a
  2xx without a plain Content-Length, a malformed or short answer, a dropped connection
  or an answer that stalls past its deadline: the same request is sent again through
  ``general``, which then answers for it;
- a refused connection is an ``httpx.ConnectError``, as httpx would raise it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import ssl
from collections.abc import AsyncIterator

import httpx

from .address import split_host_port
from .errors import DeadlineError, ServerError, UnreachableError
from .http1 import RangeClient, UnexpectedResponse

log = logging.getLogger(__name__)

LEAN_BODY = "lazyfs.lean_body"
"""The response extension under which a range read by the lean client waits, whole."""

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")


def is_loopback(registry: str) -> bool:
    """Whether ``registry`` (``host[:port]``) is this machine: spoken to in plain HTTP
    unless told otherwise."""
    try:
        host, _ = split_host_port(registry)
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # not "127.example.com"
    except ValueError:
        return False


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's trust store (what curl and skopeo trust here), plus ``ca_file``'s
    certificates when given: a private CA is added to the public ones, not put in their place.

    Without ``ca_file`` one context serves every client of the process: loading the trust
    store took 20-60 ms, a third of a pull handed to the snapshotter and of a mount's start
    (a context is safe to share between clients and threads)."""
    if ca_file is None:
        return _system_tls_context()
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UnreachableError(f"cannot use CA file {ca_file}: {exc}") from exc
    return ctx


@functools.cache
def _system_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def prepare() -> None:
    """Make ahead what the first ``open_http_client`` of the process would (blocking; run
    it in a thread): the system's trust store and httpcore, which httpx imports with its
    first transport. Together 0.2 s on an idle machine, more on a busy one, that a
    process serving peers would otherwise spend on its loop at its first request: the
    index that every node of a cluster starting an image waits for."""
    import httpcore  # noqa: F401 - imported for its side effect, the import itself

    _system_tls_context()


def open_http_client(*, timeout: float, max_connections: int, ca_file: str | None,
                     proxy: str | None, transport: httpx.AsyncBaseTransport | None,
                     ) -> tuple[httpx.AsyncClient, LeanRangeTransport | None]:
    """The client a ``RegistryClient`` sends everything through. Ranges take the lean
    client unless a ``transport`` is injected (tests) or a ``proxy`` is in the way (httpx
    then routes every request through its proxy transport)."""
    verify = tls_context(ca_file)
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    lean = None
    if transport is None and proxy is None:
        lean = LeanRangeTransport(httpx.AsyncHTTPTransport(verify=verify, limits=limits),
                                  timeout=timeout)
    client = httpx.AsyncClient(
        transport=lean or transport,
        verify=verify,
        proxy=proxy,
        timeout=httpx.Timeout(timeout),
        limits=limits,
        follow_redirects=True,  # blobs often live behind a CDN; httpx drops the
        headers={"User-Agent": "lazyfs/0.1"},  # Authorization on a cross-origin hop
    )
    return client, lean


def filled_body(response: httpx.Response) -> bytearray | None:
    """The range the lean client read for ``response`` (a 206), to be taken as it is
    rather than copied out of the response's stream; None for any other response."""
    body = response.extensions.get(LEAN_BODY)
    return body if isinstance(body, bytearray) else None


class _Filled(httpx.AsyncByteStream):
    def __init__(self, body: bytearray) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield bytes(self.body)  # only for a reader that does not ask filled_body first


class LeanRangeTransport(httpx.AsyncBaseTransport):
    """Range GETs of ``http://`` URLs through one lean client per ``host:port``; every
    other request, and every range the lean client cannot answer, through ``general``."""

    def __init__(self, general: httpx.AsyncBaseTransport, *, timeout: float, max_idle: int = 8) -> None:
        self._general = general
        self._timeout = timeout
        self._max_idle = max_idle
        self._clients: dict[tuple[str, int], RangeClient] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        m = _RANGE_RE.match(request.headers.get("Range", ""))
        if request.method != "GET" or request.url.scheme != "http" or m is None or int(m[2]) < int(m[1]):
            return await self._general.handle_async_request(request)
        offset, last = int(m[1]), int(m[2])
        host, port = request.url.host, request.url.port or 80
        client = self._clients.get((host, port))
        if client is None:
            client = self._clients[(host, port)] = RangeClient(
                host, port, max_idle=self._max_idle, connect_timeout=self._timeout, timeout=self._timeout)
        auth = request.headers.get("Authorization")  # all a range needs besides its own
        headers = {"Authorization": auth} if auth else None
        target = request.url.raw_path.decode("ascii")
        try:
            body = await client.get_range(target, offset, last - offset + 1, headers)
        except UnexpectedResponse as exc:
            if exc.status >= 300 and exc.status != 400:
                headers = {k: v for k, v in exc.headers.items()
                           if k not in ("content-length", "transfer-encoding")}  # body unread
                return httpx.Response(exc.status, headers=headers, request=request)
        except (ServerError, DeadlineError) as exc:
            log.info("%s; trying again with the general client", exc)
        except UnreachableError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        else:
            return httpx.Response(
                206, request=request, stream=_Filled(body),
                headers={"Content-Range": f"bytes {offset}-{last}/*", "Content-Length": str(len(body))},
                extensions={"http_version": b"HTTP/1.1", LEAN_BODY: body},
            )
        return await self._general.handle_async_request(request)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await self._general.aclose()
