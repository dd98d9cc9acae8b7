"""``lazyfs pull`` handed to the running snapshotter, over a unix socket beside its own.

A pull's own work is a fraction of a second; starting Python and importing grpc, the
containerd stubs, trio and httpx took three times that. The snapshotter has them loaded,
so ``lazyfs pull`` asks it to pull (``PullServer``, at ``pull_socket(ADDRESS)``: 0600, as
the snapshotter's own socket, so only root may ask) and only prints the answer; with no
snapshotter answering there, it pulls in its own process as before.

The exchange is one JSON line each way. The request: ``{"ref", "address", "namespace",
"snapshotter"}`` (containerd's socket as an absolute path). The answer: ``{"name", "digest", "layers"}``, or
``{"error": MESSAGE, "code": EXIT_CODE}``.

The client side (``request_pull``) imports only the standard library: it is what runs
in ``lazyfs pull``'s process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from ..errors import ExitCode, UserError, exit_code_for

log = logging.getLogger(__name__)

#: seconds a pull may take in the snapshotter: a registry round trip or two, and the first
#: layer's Prepare, which waits for the image to mount (``LazyFileSystem.ready_timeout``)
PULL_TIMEOUT = 330.0
CONNECT_TIMEOUT = 5.0
MAX_LINE = 1 << 16


def pull_socket(address: Path) -> Path:
    """Where the snapshotter serving on ``address`` takes pulls: ``NAME-pull.sock``
    beside it."""
    return address.with_name(f"{address.stem}-pull.sock")


# -- the client: in lazyfs pull --------------------------------------------------------------

def request_pull(via: Path, request: dict[str, Any], timeout: float = PULL_TIMEOUT) -> dict[str, Any] | None:
    """Have the snapshotter at ``via`` pull; its answer (``name``, ``digest``, ``layers``),
    or None when no snapshotter listens there. UserError with the pull's own message and
    exit code when the pull fails, or when the snapshotter ends without an answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(via))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None  # no snapshotter, or a socket a dead one left
        except OSError as exc:
            raise UserError(f"cannot reach the snapshotter at {via}: {exc.strerror or exc}",
                            ExitCode.NETWORK) from None
        sock.settimeout(timeout)
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = _read_line(sock)
        except TimeoutError:
            raise UserError(f"the snapshotter at {via} did not finish the pull in {timeout:g}s; "
                            "see its log", ExitCode.NETWORK) from None
        except OSError as exc:
            raise UserError(f"the snapshotter at {via} failed during the pull ({exc.strerror or exc}); "
                            "see its log", ExitCode.NETWORK) from None
    finally:
        sock.close()
    if not answer:
        raise UserError(f"the snapshotter at {via} ended the pull without an answer; see its log",
                        ExitCode.NETWORK)
    reply = json.loads(answer)
    if "error" in reply:
        code = int(reply.get("code") or ExitCode.FAILURE)
        raise UserError(str(reply["error"]), ExitCode(code) if code in set(ExitCode) else ExitCode.FAILURE)
    return reply


def _warm_up() -> None:
    """What a pull loads on first use, loaded ahead of the first pull: it was two thirds of
    a fresh snapshotter's first pull. grpc's channel module, which the first channel
    imports (and with it grpc.experimental, 50 ms); httpcore, which httpx imports when its
    first transport is made (70 ms); the system trust store (70 ms); the IDNA codec."""
    import encodings.idna  # noqa: F401

    import httpcore  # noqa: F401
    from grpc import _channel  # noqa: F401

    from fetcher.transport import tls_context

    tls_context(None)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE:
        part = sock.recv(4096)
        if not part:
            break
        data += part
    return data.split(b"\n", 1)[0] if b"\n" in data else b""


# -- the server: in the snapshotter ----------------------------------------------------------

class PullServer:
    """Takes ``lazyfs pull`` requests on a unix socket, each pulled on a thread of its own
    with ``client.pull`` (grpc and the stubs imported once, at ``start``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._channels: Any = None
        """``client.Channels``: containerd's channel kept from one pull to the next."""

    def start(self) -> None:
        from .client import Channels  # imported here, ahead of the first pull

        self._channels = Channels()

        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # born 0600 (bind gives 0777 less the umask)
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(umask)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), name="pull-socket", daemon=True)
        self._thread.start()
        threading.Thread(target=_warm_up, name="pull-warm-up", daemon=True).start()
        log.info("taking lazyfs pull requests on %s", self.path)

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed: stopping
                return
            threading.Thread(target=self._serve, args=(conn,), name="pull", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CONNECT_TIMEOUT)
            try:
                line = _read_line(conn)
            except OSError:
                return
            reply = self.pull(line)
            conn.settimeout(CONNECT_TIMEOUT)
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                log.warning("the caller of a pull left before its answer: %s", reply)

    def pull(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line."""
        from .client import pull

        try:
            request = json.loads(line)
            ref, address, namespace, snapshotter = (str(request[k]) for k in (
                "ref", "address", "namespace", "snapshotter"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"error": "malformed pull request", "code": int(ExitCode.USAGE)}
        try:
            result = pull(ref, address=address, namespace=namespace, snapshotter=snapshotter,
                          channels=self._channels)
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller as one line
            code = exit_code_for(exc)
            if code is None:
                log.exception("pull of %s failed", ref)
                return {"error": f"internal error in the snapshotter: {exc!r} (a bug; see its log)",
                        "code": int(ExitCode.FAILURE)}
            return {"error": str(exc), "code": int(code)}
        log.info("pulled %s (%s) for lazyfs pull", result.name, result.digest)
        return {"name": result.name, "digest": result.digest, "layers": result.layers}

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
            except OSError:
                pass
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
        if self._thread is not None:
            self._thread.join(5)
        if self._channels is not None:
            self._channels.close()
