"""A client for one repository of an OCI registry: manifests, whole blobs, byte ranges.

    RegistryClient(ref)        one httpx.AsyncClient, keep-alive pool, auth state
      .get_manifest(ref)       -> Manifest (digest checked when asked for by digest)
      .read_blob(digest)       -> bytes, sha256-verified, size-capped
      .read_range(digest, o, n)-> exactly n bytes at o (206 and Content-Range checked)
      .download_blob(digest, p)-> a whole blob streamed to a file, sha256-verified
      .request(method, path)   -> any other call (push.py), with the same auth and retries

Every request goes one way: ``_call`` (retries, ``retry.py``) -> ``_send`` (auth,
``auth.py``; the switch to https) -> httpx, which follows redirects, -> the transport
(``transport.py``), where plain-HTTP ranges take the lean client. A range of a blob the
registry redirected before starts at the URL it was redirected to (``redirects.py``).

Every failure leaves as a ``FetchError`` subclass (see ``errors.py``), translated where
httpx raises it. 5xx, 429 and connections dropped mid-answer are retried with jittered
exponential backoff (``Retry-After`` honoured up to a cap); refused connections and
timeouts are not, so a dead source fails within one ``timeout`` and the caller can fail
over. Runs under trio (httpx speaks trio through anyio).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import trio

from cache.atomic import temp_path

from .auth import Authenticator
from .bodies import check_identity, read_span, read_whole, whole_body
from .errors import (
    AuthError,
    FetchError,
    IntegrityError,
    NotFoundError,
    ServerError,
    UnreachableError,
)
from .imageref import DOCKER_HUB, ImageRef, is_digest
from .manifests import MANIFEST_ACCEPT, MAX_MANIFEST_SIZE, Manifest, resolve_image_manifest
from .redirects import RedirectCache
from .retry import RETRY_STATUSES, RetryPolicy, retry_delay
from .transport import filled_body, is_loopback, open_http_client, tls_context

__all__ = ["Manifest", "RegistryClient", "RetryPolicy", "resolve_image_manifest", "tls_context"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class RegistryClient:
    """Reads one repository (``ref.repository``) of the registry ``ref.registry``."""

    def __init__(
        self,
        ref: ImageRef,
        *,
        timeout: float = 30.0,
        insecure: bool | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 8,
        credentials: tuple[str, str] | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen, so shared safely)
        push: bool = False,
        ca_file: str | None = None,
        proxy: str | None = None,
    ) -> None:
        """``push`` asks for push rights too; ``ca_file`` adds trusted CAs to the system's;
        ``proxy`` routes every request through an HTTP proxy."""
        self.ref = ref
        self.timeout = timeout
        self.retry = retry
        host = "registry-1.docker.io" if ref.registry == DOCKER_HUB else ref.registry
        plain = is_loopback(ref.registry) if insecure is None else insecure
        self.origin = f"{'http' if plain else 'https'}://{host}"
        self.base_url = f"{self.origin}/v2/{ref.repository}"
        self._where = f"{ref.registry}/{ref.repository}"
        self._proxy = proxy
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self._auth = Authenticator(ref.registry, scope, credentials)
        # self.lean: the transport whose lean client reads plain-HTTP ranges (None when a
        # transport is injected or a proxy is in the way: httpx then reads them too)
        self._client, self.lean = open_http_client(
            timeout=timeout, max_connections=max_connections, ca_file=ca_file, proxy=proxy,
            transport=transport)
        self._warned_full_body = False
        # Blob URLs the registry redirected to, reused for later ranges of the same blob.
        self.redirects = RedirectCache()
        self._tried_https = False

    def _use_https(self) -> None:
        if self.origin.startswith("http://"):
            self.origin = "https://" + self.origin.removeprefix("http://")
            self.base_url = "https://" + self.base_url.removeprefix("http://")

    def blame(self, digest: str, offset: int, length: int) -> bool:
        """False: the registry sent the bytes itself, and there is nobody else to ask."""
        return False

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the three reads ---------------------------------------------------------------

    async def get_manifest(self, reference: str | None = None) -> Manifest:
        """The manifest (or index) at a tag or digest; IntegrityError if asked for by
        digest and the bytes do not match it."""
        reference = reference or self.ref.reference
        what = f"{self._where}: no manifest {reference}"

        async def consume(response: httpx.Response) -> Manifest:
            data = await read_whole(response, MAX_MANIFEST_SIZE, "manifest")
            return Manifest.received(data, response.headers.get("Content-Type", ""))

        manifest = await self._call("GET", f"/manifests/{reference}", {"Accept": MANIFEST_ACCEPT},
                                    what, consume)
        if not manifest.matches(reference):
            raise IntegrityError(
                f"{self._where}: manifest {reference} arrived with digest {manifest.digest}"
            )
        return manifest

    async def read_blob(self, digest: str, *, max_size: int = 1 << 30) -> bytes:
        """A whole blob, checked against its digest; ServerError if over ``max_size``."""
        _check_digest(digest)

        async def consume(response: httpx.Response) -> bytes:
            if response.status_code != 200:
                raise ServerError(f"{self._where}: blob {digest}: status {response.status_code}")
            hasher = hashlib.new(digest.split(":", 1)[0])
            data = await read_whole(response, max_size, f"blob {digest}", hasher)
            if f"{hasher.name}:{hasher.hexdigest()}" != digest:
                raise IntegrityError(f"{self._where}: blob {digest} does not match its digest")
            return data

        return await self._call("GET", f"/blobs/{digest}", {"Accept-Encoding": "identity"},
                                f"{self._where}: no blob {digest}", consume)

    async def read_range(self, digest: str, offset: int, length: int) -> bytes | bytearray:
        """Exactly ``length`` bytes of blob ``digest`` from ``offset`` (unverified: the
        caller checks the chunks it cuts from them). A registry that redirects blob reads
        is asked once per blob: later ranges go to the redirected URL while it works
        (see ``redirects.py``)."""
        _check_digest(digest)
        if offset < 0 or length < 0:
            raise FetchError(f"bad range {offset}+{length} of blob {digest}")
        if length == 0:
            return b""
        last = offset + length - 1
        where = f"{self._where}: blob {digest} bytes {offset}-{last}"

        kept = self.redirects.get(digest)
        if kept is not None:
            try:
                data = await self._read_redirected(kept, offset, length, where)
                self.redirects.reused += 1
                return data
            except FetchError as exc:
                self.redirects.forget(digest, kept)
                log.info("%s: the redirected URL stopped working (%s); asking the registry again",
                         where, exc)

        async def consume(response: httpx.Response) -> bytearray:
            data = await self._take_range(response, offset, length, where)
            if response.history:  # followed a redirect: keep where it led for the next range
                self.redirects.remember(digest, str(response.url))
            return data

        headers = {"Range": f"bytes={offset}-{last}", "Accept-Encoding": "identity"}
        return await self._call("GET", f"/blobs/{digest}", headers,
                                f"{self._where}: no blob {digest}", consume)

    async def _take_range(self, response: httpx.Response, offset: int, length: int,
                          where: str) -> bytearray:
        """The ``length`` bytes at ``offset`` from a response to a Range GET, checked
        against what was asked (a whole-body 200 is sliced)."""
        last = offset + length - 1
        status = response.status_code
        if status == 416:
            # Do not read the body: some registries send a wrong Content-Length here.
            raise ServerError(f"{where}: past the end of the blob "
                              f"({response.headers.get('Content-Range', '?')})")
        check_identity(response, where)
        if status == 206:
            m = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if not m or int(m[1]) != offset or int(m[2]) != last:
                raise ServerError(f"{where}: answered with Content-Range "
                                  f"{response.headers.get('Content-Range')!r}")
            declared = response.headers.get("Content-Length")
            if declared is not None and declared != str(length):
                raise ServerError(f"{where}: answered with Content-Length {declared}")
            lean = filled_body(response)
            if lean is not None and len(lean) == length:  # the lean client's buffer, as it is
                return lean
            return await read_span(response, offset, length, where)
        if status == 200:
            if not self._warned_full_body:
                self._warned_full_body = True
                log.warning("%s ignores Range requests; reading whole blobs", self._where)
            return await read_span(response, offset, length, where)
        raise ServerError(f"{where}: unexpected status {status}")

    async def _read_redirected(self, url: str, offset: int, length: int,
                               where: str) -> bytes | bytearray:
        """A range from a URL the registry redirected a blob GET to: no registry
        credentials (they are not the storage's), no retries (the registry is the
        fallback); any failure is a FetchError, and the caller goes back to the registry."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        try:
            async with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code not in (200, 206, 416):
                    raise ServerError(f"{where}: the redirected URL answered {response.status_code}")
                return await self._take_range(response, offset, length, where)
        except httpx.HTTPError as exc:
            raise UnreachableError(f"{where}: the redirected URL failed: {_short(exc)}") from exc

    async def download_blob(self, digest: str, path: str, *, max_size: int = 1 << 40,
                            size: int | None = None) -> int:
        """Stream blob ``digest`` into the file ``path`` (written whole or not at all),
        checked against its digest, never more than ``max_size`` bytes of it read; its
        size. ``size``, the size its descriptor declares, replaces ``max_size``: an answer
        that announces or sends any other is an ``IntegrityError``. The temp file beside
        ``path`` is named as the cache's (``temp_path``), so that one left by a process
        that died is swept."""
        _check_digest(digest)
        tmp = trio.Path(temp_path(path))

        async def consume(response: httpx.Response) -> int:
            if response.status_code != 200:
                raise ServerError(f"{self._where}: blob {digest}: status {response.status_code}")
            hasher = hashlib.new(digest.split(":", 1)[0])
            total = 0
            async with await trio.open_file(tmp, "wb") as f:
                async for piece in whole_body(response, max_size if size is None else size,
                                              f"{self._where}: blob {digest}", exact=size is not None):
                    total += len(piece)
                    hasher.update(piece)
                    await f.write(piece)
            if f"{hasher.name}:{hasher.hexdigest()}" != digest:
                raise IntegrityError(f"{self._where}: blob {digest} does not match its digest")
            await tmp.rename(path)
            return total

        try:
            return await self._call("GET", f"/blobs/{digest}", {"Accept-Encoding": "identity"},
                                    f"{self._where}: no blob {digest}", consume)
        finally:
            if await tmp.exists():
                await tmp.unlink()

    async def request(
        self,
        method: str,
        path: str,
        consume: Callable[[httpx.Response], Awaitable[T]],
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        not_found: str | None = None,
    ) -> T:
        """One call with this client's auth, retries and error translation. ``path`` is
        under the repository (``/blobs/uploads/``), absolute on the registry
        (``/v2/...``, as a ``Location`` header gives it) or a whole URL. ``consume`` sees
        the open response when its status is below 400 (or 416)."""
        return await self._call(method, path, headers or {},
                                not_found or f"{self._where}: {method} {path}: not found",
                                consume, content)

    # -- one request: auth, retries, error translation ---------------------------------

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        if path.startswith("/v2/"):
            return self.origin + path
        return self.base_url + path

    async def _call(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        not_found: str,
        consume: Callable[[httpx.Response], Awaitable[T]],
        content: bytes | None = None,
    ) -> T:
        url = self._url(path)
        policy = self.retry
        for attempt in range(1, policy.attempts + 1):
            try:
                response = await self._send(method, url, headers, not_found, content)
                try:
                    if response.status_code not in RETRY_STATUSES:
                        return await consume(response)
                    problem = f"status {response.status_code}"
                    delay = retry_delay(policy, attempt, response)
                finally:
                    await response.aclose()
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                via = f" through the proxy {self._proxy}" if self._proxy else ""
                raise UnreachableError(f"cannot reach registry {self.ref.registry}{via}: "
                                       f"{_short(exc)}") from exc
            except httpx.ProxyError as exc:
                raise UnreachableError(f"the proxy to registry {self.ref.registry} failed: "
                                       f"{_short(exc)}") from exc
            except httpx.TimeoutException as exc:
                raise UnreachableError(f"registry {self.ref.registry} did not answer "
                                       f"{method} {path} within {self.timeout} s") from exc
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                problem = f"connection dropped ({exc!r})"
                delay = retry_delay(policy, attempt, None)
            except httpx.HTTPError as exc:
                raise ServerError(f"{method} {url} failed: {exc!r}") from exc
            if attempt == policy.attempts:
                raise ServerError(f"registry {self.ref.registry}: {method} {path}: {problem} "
                                  f"after {attempt} tries")
            log.info("%s %s: %s; retry %d in %.2f s", method, url, problem, attempt, delay)
            await trio.sleep(delay)
        raise AssertionError("unreachable")

    async def _send(
        self, method: str, url: str, headers: dict[str, str], not_found: str,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send with auth; the open (streaming) response if its status is 2xx, 416 or
        retryable, a FetchError otherwise."""
        renewed = False
        while True:
            if self._tried_https and url.startswith("http://"):
                url = "https://" + url.removeprefix("http://")
            generation = self._auth.generation
            auth = self._auth.header()
            request = self._client.build_request(
                method, url, headers={**headers, "Authorization": auth} if auth else headers,
                content=content,
            )
            response = await self._client.send(request, stream=True)
            status = response.status_code
            if status < 400 or status == 416 or status in RETRY_STATUSES:
                return response
            if status == 400 and url.startswith("http://"):
                # A TLS server on a loopback port answers plain HTTP like this (Go's
                # net/http: an HTTP/1.0 400, "Client sent an HTTP request to an HTTPS
                # server"): the registry speaks TLS after all, so switch for good.
                body = await response.aread()
                await response.aclose()
                if b"HTTPS server" in body[:1000] or response.http_version == "HTTP/1.0":
                    if not self._tried_https:
                        log.info("%s speaks TLS; using https", self.ref.registry)
                    self._tried_https = True
                    self._use_https()
                    continue
            await response.aclose()
            if status == 401 and not renewed:
                renewed = True
                await self._auth.on_unauthorized(self._client, response, generation)
                continue
            if status in (401, 403):
                raise AuthError(f"{self._where}: access denied ({status}); check the "
                                "credentials and that the repository exists")
            if status == 404:
                raise NotFoundError(not_found)
            raise ServerError(f"{method} {url}: unexpected status {status}")


# -- helpers ----------------------------------------------------------------------------


def _short(exc: Exception) -> str:
    """An httpx error in a few words (TLS failures come wrapped in long chains)."""
    text = str(exc) or type(exc).__name__
    chain: BaseException | None = exc
    for _ in range(5):
        chain = chain.__cause__ or chain.__context__ if chain is not None else None
        if chain is not None and "CERTIFICATE_VERIFY_FAILED" in str(chain):
            text = str(chain)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted (pass --ca-file, or fix the system trust store)"
    return text.splitlines()[0][:300]


def _check_digest(digest: str) -> None:
    if not isinstance(digest, str) or not is_digest(digest):
        raise FetchError(f"malformed digest {digest!r}")


