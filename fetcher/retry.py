"""How hard a registry client retries, and how long it waits between tries.

    RetryPolicy          attempts and backoff caps (frozen configuration)
    RETRY_STATUSES       the answers worth another try: 429 and 5xx gateway errors
    retry_delay(p, n, r) seconds to wait before try n+1: the server's ``Retry-After``
                         (capped), else full-jitter exponential backoff

Only answers that may succeed next time are retried (5xx, 429, connections dropped mid
answer); refused connections and timeouts are not, so a dead source fails within one
timeout and the caller can fail over (``RegistryClient._call`` holds the loop).
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time

import httpx

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


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


def retry_delay(policy: RetryPolicy, attempt: int, response: httpx.Response | None) -> float:
    """Seconds to wait after try ``attempt`` failed (with ``response``, if one came)."""
    delay = retry_after(response, policy.max_retry_after) if response is not None else None
    if delay is None:
        delay = random.uniform(0, min(policy.max_delay, policy.base_delay * 2**attempt))
    return delay


def retry_after(response: httpx.Response, cap: float) -> float | None:
    """The wait a server's ``Retry-After`` asks for (seconds or an HTTP date), at most
    ``cap``; None when it asks for none or says it unreadably."""
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
