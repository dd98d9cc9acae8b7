"""Registry authentication: anonymous, Basic, and the bearer-token flow.

A registry that wants credentials answers 401 with ``WWW-Authenticate``. For
``Bearer realm=R,service=S,scope=P`` the client GETs a token from ``R?service=S&scope=P``
(with Basic credentials if it has any; anonymously otherwise) and retries with
``Authorization: Bearer <token>`` (distribution ``docs/spec/auth/token.md``). For
``Basic`` it retries with the credentials. The token is kept and reused until a later
401 says it is stale.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time

import httpx
import trio

from .bodies import read_whole
from .errors import AuthError, ServerError, UnreachableError

log = logging.getLogger(__name__)

_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_MAX_TOKEN_RESPONSE = 1 << 20


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``('bearer', {'realm': ..., ...})`` from one ``WWW-Authenticate`` value."""
    scheme, _, params = header.strip().partition(" ")
    found = {
        m[1].lower(): (m[2].replace('\\"', '"') if m[2] is not None else m[3])
        for m in _PARAM_RE.finditer(params)
    }
    return scheme.lower(), found


class Authenticator:
    """The ``Authorization`` header for one repository, and how to earn a new one."""

    def __init__(self, host: str, scope: str, credentials: tuple[str, str] | None) -> None:
        self.host = host
        self.scope = scope
        self.credentials = credentials
        self._header: str | None = None
        self._expires = float("inf")
        self.generation = 0  # bumped each time the header changes
        self._lock = trio.Lock()

    def header(self) -> str | None:
        if self._header is not None and time.monotonic() >= self._expires:
            self._header = None
        return self._header

    async def on_unauthorized(
        self, client: httpx.AsyncClient, response: httpx.Response, seen_generation: int
    ) -> None:
        """Earn a fresh header after a 401 that was sent with ``seen_generation``'s;
        AuthError if the challenge cannot be met."""
        async with self._lock:
            if self.generation != seen_generation:
                return  # another request already renewed it while we waited
            challenge = response.headers.get("WWW-Authenticate", "")
            scheme, params = parse_challenge(challenge)
            if scheme == "bearer" and params.get("realm"):
                token, ttl = await self._fetch_token(client, params)
                self._set(f"Bearer {token}", ttl)
            elif scheme == "basic" and self.credentials is not None:
                self._set(_basic(self.credentials), None)
            elif scheme == "basic":
                raise AuthError(f"registry {self.host} requires a user name and password")
            else:
                raise AuthError(
                    f"registry {self.host} refused access with an unusable challenge "
                    f"{challenge!r}"
                )

    def _set(self, header: str, ttl: float | None) -> None:
        self._header = header
        # Renew a little early; the spec's default lifetime is 60 s.
        self._expires = time.monotonic() + max(ttl - 10.0, ttl / 2) if ttl else float("inf")
        self.generation += 1

    async def _fetch_token(
        self, client: httpx.AsyncClient, params: dict[str, str]
    ) -> tuple[str, float | None]:
        realm = params["realm"]
        query = {"scope": params.get("scope") or self.scope}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = _basic(self.credentials)
        try:
            async with client.stream("GET", realm, params=query, headers=headers, auth=None) as response:
                status, body = response.status_code, b""
                if status == 200:
                    body = await read_whole(response, _MAX_TOKEN_RESPONSE, f"token server {realm}'s answer")
        except httpx.TimeoutException as exc:
            raise UnreachableError(f"token server {realm} did not answer: {exc!r}") from exc
        except httpx.ConnectError as exc:
            raise UnreachableError(f"cannot reach token server {realm}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ServerError(f"token server {realm} failed: {exc!r}") from exc
        if status in (401, 403):
            raise AuthError(
                f"token server {realm} refused "
                f"{'the credentials' if self.credentials else 'anonymous access'} "
                f"for {query['scope']} ({status})"
            )
        if status != 200:
            raise ServerError(f"token server {realm} answered {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            ttl = float(doc["expires_in"]) if doc.get("expires_in") else None
        except (ValueError, AttributeError, TypeError, RecursionError) as exc:
            raise ServerError(f"token server {realm} sent a malformed answer") from exc
        if not isinstance(token, str) or not token:
            raise ServerError(f"token server {realm} sent no token")
        log.debug("got a token for %s from %s (expires in %s s)", query["scope"], realm, ttl)
        return token, ttl


def _basic(credentials: tuple[str, str]) -> str:
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
