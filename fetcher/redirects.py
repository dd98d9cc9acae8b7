"""Where a registry sent us for a blob: redirected blob URLs, kept while they work.

Registries backed by object storage (S3, GCS, Azure, a CDN) answer a blob GET with a
307/302 to a signed URL that expires after some minutes. A lazy mount reads one blob in
many ranges, so going through the registry for each would cost a registry round trip
(and its auth) per range: the redirected URL is kept per blob and used directly for later
ranges. It is dropped, and the registry asked for a fresh one, when

- the storage refuses it (401, 403, 404, 410, 400: expired or revoked signatures),
  or it fails in any other way; or
- its own signature says it has expired (``X-Amz-Date`` + ``X-Amz-Expires``,
  ``X-Goog-Date`` + ``X-Goog-Expires``, or an epoch ``Expires``/``expires``/``se``),
  so that a request known to fail is not sent.

The caller (``RegistryClient.read_range``) does the dropping and the re-asking; a read
never fails because a kept URL went stale.
"""

from __future__ import annotations

import calendar
import collections
import time
import urllib.parse

#: Stop using a URL this many seconds before its signature says it expires.
EXPIRY_MARGIN = 5.0
#: Blobs whose redirect is remembered at once (least recently stored dropped first).
MAX_KEPT = 4096


def url_expiry(url: str) -> float | None:
    """The Unix time after which the signed ``url`` stops working, if its query says."""
    query = {k.lower(): v for k, v in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)}
    for date_key, ttl_key in (("x-amz-date", "x-amz-expires"), ("x-goog-date", "x-goog-expires")):
        if date_key in query and ttl_key in query:
            try:
                start = calendar.timegm(time.strptime(query[date_key], "%Y%m%dT%H%M%SZ"))
                return start + float(query[ttl_key])
            except ValueError:
                return None
    value = query.get("expires")
    if value is not None and value.isdigit():
        return float(value)
    value = query.get("se")  # Azure SAS: an ISO time
    if value:
        try:
            return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            return None
    return None


class RedirectCache:
    """Blob digest -> the URL the registry last redirected its GET to."""

    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        self._urls: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._max = max_kept
        self.reused = 0
        """Range reads answered from a kept URL (for logs and tests)."""
        self.renewed = 0
        """Kept URLs dropped because they stopped working or expired."""

    def get(self, digest: str, now: float | None = None) -> str | None:
        """The kept URL for ``digest``, unless its signature has (nearly) expired."""
        url = self._urls.get(digest)
        if url is None:
            return None
        expiry = url_expiry(url)
        if expiry is not None and (now if now is not None else time.time()) >= expiry - EXPIRY_MARGIN:
            self.forget(digest, url)
            return None
        return url

    def remember(self, digest: str, url: str) -> None:
        self._urls[digest] = url
        self._urls.move_to_end(digest)
        while len(self._urls) > self._max:
            self._urls.popitem(last=False)

    def forget(self, digest: str, url: str) -> None:
        """Drop ``url`` if it is still the one kept (another reader may have renewed it)."""
        if self._urls.get(digest) == url:
            del self._urls[digest]
            self.renewed += 1
