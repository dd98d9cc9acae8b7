"""Errors of getting bytes from elsewhere.

    FetchError                 any failure to get verified bytes from a source
      ├── NotFoundError        the registry or server has no such image, manifest or blob
      ├── AuthError            credentials missing or refused (401/403)
      ├── UnreachableError     connection refused, DNS failure, TLS failure, or no answer
      │                        before the deadline
      ├── ServerError          the source answered, but wrongly (5xx, bad status, short body,
      │                        wrong Content-Range) and retries did not help
      └── IntegrityError       bytes arrived but do not match their digest
"""

from __future__ import annotations


class FetchError(Exception):
    """Getting bytes from a source failed; the message says which and why."""


class NotFoundError(FetchError):
    pass


class AuthError(FetchError):
    pass


class UnreachableError(FetchError):
    pass


class ServerError(FetchError):
    pass


class IntegrityError(FetchError):
    pass
