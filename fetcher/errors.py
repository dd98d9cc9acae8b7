"""Errors of getting bytes from elsewhere.

    FetchError                 any failure to get verified bytes from a source
      ├── NotFoundError        the registry or server has no such image, manifest or blob
      ├── AuthError            credentials missing or refused (401/403)
      ├── UnreachableError     connection refused, DNS failure, TLS failure, or no answer
      │   │                    before the deadline
      │   └── DeadlineError    no answer (or not every chunk) before the deadline
      ├── ServerError          the source answered, but wrongly (5xx, bad status, short body,
      │                        wrong Content-Range) and retries did not help
      └── IntegrityError       bytes arrived but do not match their digest
"""

from __future__ import annotations


class FetchError(Exception):
    """Getting bytes from a source failed; the message says which and why. ``chunk``
    (hex digest), ``blob`` and ``source`` name what failed where known, so that the
    read that fails can log them as fields."""

    chunk: str | None = None
    blob: str | None = None
    source: str | None = None

    def about(self, *, chunk: str | None = None, blob: str | None = None,
              source: str | None = None) -> FetchError:
        """Fill in what is not known yet; returns self (``raise Error(...).about(...)``)."""
        self.chunk = self.chunk or chunk
        self.blob = self.blob or blob
        self.source = self.source or source
        return self


class NotFoundError(FetchError):
    pass


class AuthError(FetchError):
    pass


class HelperMissingError(AuthError):
    """The config names a credential helper that is not installed (a usage error)."""


class UnreachableError(FetchError):
    pass


class RefusedError(UnreachableError):
    """Nothing listens at the address: a node that is starting, or has stopped. Asking it
    again costs one round trip, not a wait."""


class DeadlineError(UnreachableError):
    """The wait for bytes ran past its deadline."""


class ServerError(FetchError):
    pass


class IntegrityError(FetchError):
    pass
