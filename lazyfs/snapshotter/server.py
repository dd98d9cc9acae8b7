"""The gRPC face of the snapshot service: containerd.services.snapshots.v1.Snapshots on a
unix socket, served by grpcio's thread pool (the service serializes changes itself)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from ..errors import ExitCode, UserError
from . import protos
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SnapshotError,
    UnavailableError,
)
from .metadata import Snapshot
from .service import Mount, SnapshotService

protos.generate()
from ._gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from ._gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc  # noqa: E402
from ._gen.containerd.types import mount_pb2  # noqa: E402

log = logging.getLogger(__name__)

_CODES = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def _info(s: Snapshot) -> Any:
    # protobuf takes an enum field's number; the generated stub allows only Kind or its name
    info = pb.Info(name=s.key, parent=s.parent, kind=int(s.kind), labels=s.labels)  # type: ignore[arg-type]
    info.created_at.FromNanoseconds(int(s.created * 1e9))
    info.updated_at.FromNanoseconds(int(s.updated * 1e9))
    return info


def _mounts(mounts: list[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _call(context: grpc.ServicerContext, fn, *args):
    try:
        return fn(*args)
    except SnapshotError as exc:
        context.abort(_CODES.get(type(exc), grpc.StatusCode.UNKNOWN), str(exc))
    except Exception as exc:
        log.exception("%s failed", getattr(fn, "__name__", fn))
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, service: SnapshotService) -> None:
        self.s = service

    def Prepare(self, request, context):
        log.debug("prepare %s parent=%s labels=%s", request.key, request.parent, dict(request.labels))
        m = _call(context, self.s.prepare, request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(m))

    def View(self, request, context):
        m = _call(context, self.s.view, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(m))

    def Mounts(self, request, context):
        return pb.MountsResponse(mounts=_mounts(_call(context, self.s.mounts, request.key)))

    def Commit(self, request, context):
        _call(context, self.s.commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    def Remove(self, request, context):
        _call(context, self.s.remove, request.key)
        return empty_pb2.Empty()

    def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=_info(_call(context, self.s.stat, request.key)))

    def Update(self, request, context):
        paths = list(request.update_mask.paths)
        s = _call(context, self.s.update, request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info(s))

    def List(self, request, context):
        infos = [_info(s) for s in _call(context, self.s.list)]
        for i in range(0, max(len(infos), 1), 100):
            yield pb.ListSnapshotsResponse(info=infos[i:i + 100])

    def Usage(self, request, context):
        size, inodes = _call(context, self.s.usage, request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request, context):
        _call(context, self.s.cleanup)
        return empty_pb2.Empty()


def serve(service: SnapshotService, address: Path, *, workers: int = 8,
          stop: threading.Event | None = None) -> None:
    """Serve on unix socket ``address`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    address.parent.mkdir(parents=True, exist_ok=True)
    if address.exists() or address.is_symlink():
        address.unlink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(service), server)
    umask = os.umask(0o177)  # the socket is born 0600 (bind gives 0777 less the umask)
    try:
        server.add_insecure_port(f"unix://{address}")
        server.start()
    except RuntimeError as exc:  # grpcio cannot bind it
        raise UserError(f"cannot serve on {address}: {exc}", ExitCode.USAGE) from None
    finally:
        os.umask(umask)
    os.chmod(address, 0o600)
    log.info("snapshotter serving on %s", address)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    log.info("snapshotter stopped")
