"""What the command line reports, and with which exit code.

Every error a user can cause or fix becomes one line on stderr and one of these codes
(documented in the README); only a bug prints a traceback, and then to the log.

    0  OK           success
    1  FAILURE      an unexpected internal error (a bug: see the log)
    2  USAGE        wrong arguments or a malformed image reference
    3  IMAGE        the image is missing, not an image, corrupt, unsafe, or not a lazyfs image
    4  NETWORK      the registry or server is unreachable, refuses credentials, or lacks the image
    5  MOUNT        the mountpoint is missing, busy, not a lazyfs mount, or FUSE is unavailable
    6  INTEGRITY    bytes from the network do not match their digest
    7  CACHE        the cache directory cannot be used
"""

from __future__ import annotations

import enum

from blockindex.errors import ImageError, IndexFormatError
from cache.errors import CacheError
from fetcher.errors import FetchError, HelperMissingError, IntegrityError


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    IMAGE = 3
    NETWORK = 4
    MOUNT = 5
    INTEGRITY = 6
    CACHE = 7


class UserError(Exception):
    """An error with a message for the user and an exit code."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class MountError(UserError):
    exit_code = ExitCode.MOUNT


class NotLazyImageError(UserError):
    exit_code = ExitCode.IMAGE


class NoSideIndexError(NotLazyImageError):
    """An ordinary image without a side index: nothing to mount it lazily with (exit 3).
    Where a caller that can pull an image whole falls back to doing so."""


def exit_code_for(exc: BaseException) -> ExitCode | None:
    """The exit code of an error the user should see as one line; None for a bug."""
    if isinstance(exc, UserError):
        return exc.exit_code
    if isinstance(exc, IntegrityError):
        return ExitCode.INTEGRITY
    if isinstance(exc, HelperMissingError):  # the config names a program that is not there
        return ExitCode.USAGE
    if isinstance(exc, FetchError):
        return ExitCode.NETWORK
    if isinstance(exc, (ImageError, IndexFormatError)):
        return ExitCode.IMAGE
    if isinstance(exc, CacheError):
        return ExitCode.CACHE
    return None
