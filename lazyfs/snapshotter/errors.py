"""Errors of the snapshot service; each maps to one gRPC status code (see service.py).

    SnapshotError
     +-- NotFoundError            NOT_FOUND
     +-- AlreadyExistsError       ALREADY_EXISTS (also: a remote snapshot is ready)
     +-- FailedPreconditionError  FAILED_PRECONDITION (wrong kind, has children)
     +-- InvalidArgumentError     INVALID_ARGUMENT
     +-- UnavailableError         UNAVAILABLE (a lazy image cannot be mounted now)
"""

from __future__ import annotations


class SnapshotError(Exception):
    """A request the snapshot service refuses."""


class NotFoundError(SnapshotError):
    pass


class AlreadyExistsError(SnapshotError):
    pass


class FailedPreconditionError(SnapshotError):
    pass


class InvalidArgumentError(SnapshotError):
    pass


class UnavailableError(SnapshotError):
    pass
