"""A client for one repository of an OCI registry: manifests, whole blobs, byte ranges.

    RegistryClient(ref)        one httpx.AsyncClient, keep-alive pool, auth state
      .get_manifest(ref)       -> Manifest (digest checked when asked for by digest)
      .read_blob(digest)       -> bytes, sha256-verified, size-capped
      .read_range(digest, o, n)-> exactly n bytes at o (206 and Content-Range checked)
      .download_blob(digest, p)-> a whole blob streamed to a file, sha256-verified
      .request(method, path)   -> any other call (push.py), with the same auth and retries

Every failure leaves as a ``FetchError`` subclass (see ``errors.py``), translated where
httpx raises it. 5xx, 429 and connections dropped mid-answer are retried with jittered
exponential backoff (``Retry-After`` honoured up to a cap); refused connections and
timeouts are not, so a dead source fails within one ``timeout`` and the caller can fail
over. Runs under trio (httpx speaks trio through anyio).
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import httpx
import trio

from blockindex.oci import (
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
)
from cache.store import temp_path

from .address import split_host_port
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
from .http1 import RangeClient, UnexpectedResponse
from .imageref import DOCKER_HUB, ImageRef, is_digest
from .redirects import RedirectCache

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join(
    [MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST]
)
INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})
MAX_MANIFEST_SIZE = 4 << 20
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard to retry answers that may succeed next time (5xx, 429, dropped
    connections). Refused connections and timeouts are never retried here."""

    attempts: int = 4
    """Tries in all, the first included."""
    base_delay: float = 0.1
    """Backoff before try n+1 is uniform in [0, base_delay * 2**n] (full jitter)."""
    max_delay: float = 2.0
    """Cap on one backoff."""
    max_retry_after: float = 10.0
    """Cap on a server's ``Retry-After``; a longer wait is cut to this."""


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest's exact bytes, its media type, and the sha256 digest of those bytes."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict:
        try:
            doc = json.loads(self.data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ServerError(f"manifest {self.digest} is not JSON") from exc
        if not isinstance(doc, dict):
            raise ServerError(f"manifest {self.digest} is not a JSON object")
        return doc


def _is_loopback(registry: str) -> bool:
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
    certificates when given: a private CA is added to the public ones, not put in their place."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UnreachableError(f"cannot use CA file {ca_file}: {exc}") from exc
    return ctx


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
        plain = _is_loopback(ref.registry) if insecure is None else insecure
        self.origin = f"{'http' if plain else 'https'}://{host}"
        self.base_url = f"{self.origin}/v2/{ref.repository}"
        self._where = f"{ref.registry}/{ref.repository}"
        self._proxy = proxy
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self._auth = Authenticator(ref.registry, scope, credentials)
        self._client = httpx.AsyncClient(
            transport=transport,
            verify=tls_context(ca_file),
            proxy=proxy,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=True,  # blobs often live behind a CDN; httpx drops the
            headers={"User-Agent": "lazyfs/0.1"},  # Authorization on a cross-origin hop
        )
        self._warned_full_body = False
        # The bulk path: plain-HTTP range reads through the lean client (see http1.py);
        # httpx answers everything it does not expect (redirects, auth challenges, errors).
        self._fast: RangeClient | None = None
        if plain and transport is None and proxy is None:
            hostname, port = split_host_port(host)
            self._fast = RangeClient(hostname, port or 80, connect_timeout=timeout)
        # Blob URLs the registry redirected to, reused for later ranges of the same blob;
        # plain-HTTP ones are read with the lean client too when nothing is in between.
        self.redirects = RedirectCache()
        self._lean_redirects = transport is None and proxy is None
        self._redirect_clients: dict[tuple[str, int], RangeClient] = {}
        self._blob_path = f"/v2/{ref.repository}/blobs/"
        self._tried_https = False

    def _use_https(self) -> None:
        if self.origin.startswith("http://"):
            self.origin = "https://" + self.origin.removeprefix("http://")
            self.base_url = "https://" + self.base_url.removeprefix("http://")
        self._fast = None

    async def aclose(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        for client in self._redirect_clients.values():
            await client.aclose()
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
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            if not media_type or media_type in ("application/json", "text/plain"):
                media_type = _embedded_media_type(data) or media_type
            return Manifest(data, media_type, "sha256:" + hashlib.sha256(data).hexdigest())

        manifest = await self._call("GET", f"/manifests/{reference}", {"Accept": MANIFEST_ACCEPT},
                                    what, consume)
        if ":" in reference and _digest_of(manifest.data, reference) != reference:
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

        if self._fast is not None:
            auth = self._auth.header()
            try:
                return await self._fast.get_range(self._blob_path + digest, offset, length,
                                                  {"Authorization": auth} if auth else None)
            except UnexpectedResponse as exc:
                location = exc.headers.get("location")
                if 300 <= exc.status < 400 and location:
                    url = urllib.parse.urljoin(f"{self.origin}{self._blob_path}{digest}", location)
                    try:
                        data = await self._read_redirected(url, offset, length, where)
                        self.redirects.remember(digest, url)
                        return data
                    except FetchError as exc2:
                        log.info("%s: redirected to a URL that failed (%s); trying again with "
                                 "the general client", where, exc2)
                # anything else unusual: the general client below knows what to do with it
            except ServerError as exc:
                log.info("%s; trying again with the general client", exc)

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
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "http" and self._lean_redirects and parts.hostname:
            try:
                host, port = split_host_port(parts.netloc.rpartition("@")[2])
            except ValueError as exc:  # the server's Location, not ours: its mistake
                raise ServerError(f"{where}: redirected to a bad URL: {exc}") from None
            key = (host, port or 80)
            client = self._redirect_clients.get(key)
            if client is None:
                client = self._redirect_clients[key] = RangeClient(*key, connect_timeout=self.timeout)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                with trio.fail_after(self.timeout):
                    return await client.get_range(target or "/", offset, length)
            except UnexpectedResponse as exc:
                raise ServerError(f"{where}: the redirected URL answered {exc.status}") from None
            except trio.TooSlowError:
                raise UnreachableError(f"{where}: the redirected URL did not answer within "
                                       f"{self.timeout} s") from None
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
                    if response.status_code not in _RETRY_STATUSES:
                        return await consume(response)
                    problem = f"status {response.status_code}"
                    delay = _retry_after(response, policy.max_retry_after)
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
                problem, delay = f"connection dropped ({exc!r})", None
            except httpx.HTTPError as exc:
                raise ServerError(f"{method} {url} failed: {exc!r}") from exc
            if attempt == policy.attempts:
                raise ServerError(f"registry {self.ref.registry}: {method} {path}: {problem} "
                                  f"after {attempt} tries")
            if delay is None:
                delay = random.uniform(0, min(policy.max_delay, policy.base_delay * 2**attempt))
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
            if status < 400 or status == 416 or status in _RETRY_STATUSES:
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


_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> str:
    """This machine's platform as image indexes name it: ``linux/amd64``, ``linux/arm64``."""
    machine = os.uname().machine
    return f"linux/{_ARCHES.get(machine, machine)}"


class ManifestSource(Protocol):
    """What resolving an image asks of a client (a RegistryClient, or a MirroredClient)."""

    async def get_manifest(self, reference: str | None = None) -> Manifest: ...


async def resolve_image_manifest(
    client: ManifestSource, ref: ImageRef, platform: str | None = None
) -> Manifest:
    """The image manifest for ``ref``: the manifest itself, or, if ``ref`` names an
    index, the entry for ``platform`` (``os/arch[/variant]``; this host's by default)."""
    platform = platform or host_platform()
    manifest = await client.get_manifest(ref.reference)
    if manifest.media_type not in INDEX_MEDIA_TYPES:
        return manifest
    want = platform.split("/")
    entries = manifest.json().get("manifests")
    if not isinstance(entries, list):
        raise ServerError(f"{ref}: image index {manifest.digest} has no manifests list")
    for desc in entries:
        plat = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(plat, dict) or not isinstance(desc.get("digest"), str):
            continue
        have = [plat.get("os"), plat.get("architecture")]
        if len(want) > 2:
            have.append(plat.get("variant"))
        if have == want:
            return await client.get_manifest(desc["digest"])
    raise NotFoundError(f"{ref}: no image for platform {platform} in index {manifest.digest}")


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


def _digest_of(data: bytes, like: str) -> str:
    algorithm = like.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512"):
        return "sha256:" + hashlib.sha256(data).hexdigest()
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _embedded_media_type(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), cap)
