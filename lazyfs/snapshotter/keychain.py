"""Pods' image pull secrets for the lazy mounts: kubelet's image service, in front of containerd's.

kubelet hands each pull's credentials (a pod's ``imagePullSecrets``, matched to the
image's registry) to the CRI image service in its ``PullImage`` call. containerd uses them
for what it fetches itself, but a proxy snapshotter never sees them, so a lazy image
behind a pull secret could be mounted only with the node's own credentials. With
``lazyfs snapshotter --cri-keychain SOCK``, the snapshotter also serves the CRI image
service on ``SOCK`` (kubelet's ``--image-service-endpoint``): every call goes on to
containerd's unchanged, and each ``PullImage``'s credentials are kept, in memory, for its
registry and repository, before containerd is asked; the mount containerd then asks for
gets them in a credentials file of its own (mode 0600 under ``ROOT/creds``), which stays
for as long as the image is mounted so that a remount after a crash has them too.

Only a user name and password (or docker's ``auth``, base64 of both) can be used; an
identity or registry token is not (the mount falls back to the node's credentials, and
the snapshotter logs that it did). Nothing secret is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import os
import threading
import urllib.parse
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fetcher.imageref import ImageRef

log = logging.getLogger(__name__)

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
"""The CRI image services forwarded (kubelet speaks v1; v1alpha2 for older kubelets)."""

MAX_MESSAGE = 16 << 20
"""The largest message passed either way: kubelet's and containerd's CRI limit (gRPC's
default of 4 MiB is less than a node with many images answers ListImages with)."""

MAX_ENTRIES = 4096
"""Credentials kept at most (the least recently pulled go first): a node pulls far fewer
distinct repositories than this between a pull and its mount."""


def _pull_request_class() -> Any:
    """A protobuf class that reads CRI's ``PullImageRequest``: only the fields used here
    (the image's name and the credentials), under CRI's own field numbers; protobuf skips
    the rest of a message. Built from a descriptor, so no CRI stubs need generating."""
    f = descriptor_pb2.FileDescriptorProto(name="lazyfs_cri_pull.proto", package="lazyfs.cri",
                                           syntax="proto3")
    field = descriptor_pb2.FieldDescriptorProto
    string, message, optional = field.TYPE_STRING, field.TYPE_MESSAGE, field.LABEL_OPTIONAL

    def add(name: str, fields: list[tuple[str, int, int, str]]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, type_name in fields:
            m.field.add(name=fname, number=number, type=ftype, label=optional,  # type: ignore[arg-type]
                        **({"type_name": type_name} if type_name else {}))

    add("ImageSpec", [("image", 1, string, "")])
    add("AuthConfig", [("username", 1, string, ""), ("password", 2, string, ""), ("auth", 3, string, ""),
                       ("server_address", 4, string, ""), ("identity_token", 5, string, ""),
                       ("registry_token", 6, string, "")])
    add("PullImageRequest", [("image", 1, message, ".lazyfs.cri.ImageSpec"),
                             ("auth", 2, message, ".lazyfs.cri.AuthConfig")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("lazyfs.cri.PullImageRequest"))


PullImageRequest = _pull_request_class()


def _key(ref: str) -> tuple[str, str] | None:
    try:
        r = ImageRef.parse(ref)
    except ValueError:
        return None
    return r.registry, r.repository


class Keychain:
    """Credentials by (registry, repository), from the pulls seen; thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: collections.OrderedDict[tuple[str, str], tuple[str, str]] = collections.OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def add(self, ref: str, user: str, password: str) -> bool:
        """Keep credentials for ``ref``'s repository; False if ``ref`` cannot be parsed."""
        key = _key(ref)
        if key is None:
            return False
        with self._lock:
            self._entries[key] = (user, password)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return True

    def lookup(self, ref: str) -> tuple[str, str, str] | None:
        """``(registry, user, password)`` for ``ref``'s repository, or None."""
        key = _key(ref)
        if key is None:
            return None
        with self._lock:
            found = self._entries.get(key)
        return None if found is None else (key[0], *found)

    def remember(self, request: bytes) -> str:
        """Keep the credentials of a serialized ``PullImageRequest``; returns what was done,
        for the log (never a secret)."""
        try:
            req = PullImageRequest.FromString(request)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError; containerd will say more
            return "a PullImage request that does not parse"
        image, auth = req.image.image, req.auth
        if not req.HasField("auth"):
            return f"pull of {image} without credentials"
        user, password = auth.username, auth.password
        if not user and auth.auth:
            try:
                user, _, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return f"pull of {image} with an auth field that is not base64 of user:password (not kept)"
        if not user:
            kind = ("an identity token" if auth.identity_token else
                    "a registry token" if auth.registry_token else "empty credentials")
            return (f"pull of {image} with {kind}, which lazyfs cannot use "
                    "(its mount uses the node's credentials)")
        key = _key(image)
        if key is None:
            return f"pull of {image}: not an image reference lazyfs reads (credentials not kept)"
        if auth.server_address and not _same_host(auth.server_address, key[0]):
            # as containerd does: credentials named for another server are not sent here
            return f"pull of {image} with credentials for another server (not kept)"
        self.add(image, user, password)
        return f"pull of {image} with the pod's credentials (kept for its mount)"


_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def _same_host(server_address: str, registry: str) -> bool:
    """Whether kubelet's ``server_address`` (a URL, or a bare host) names ``registry``."""
    host = urllib.parse.urlsplit(server_address).netloc if "://" in server_address else server_address
    host = host.split("/", 1)[0].lower()
    return host == registry.lower() or (host in _HUB_HOSTS and registry in _HUB_HOSTS)


def write_creds_file(path: Path, registry: str, user: str, password: str) -> None:
    """A docker ``config.json`` holding only these credentials, for ``lazyfs mount
    --creds-file``: created 0600 and complete before it is in place."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: {"username": user, "password": password}}}, f)
    os.replace(tmp, path)


class ImageServiceProxy:
    """The CRI image service on a unix socket, forwarding every call to containerd's and
    keeping each ``PullImage``'s credentials in ``keychain`` first."""

    def __init__(self, keychain: Keychain, address: Path, upstream: str, *, workers: int = 8) -> None:
        self.keychain = keychain
        self.address = address
        self.upstream = upstream
        limits = [("grpc.max_receive_message_length", MAX_MESSAGE),
                  ("grpc.max_send_message_length", MAX_MESSAGE)]
        self._channel = grpc.insecure_channel(upstream if "://" in upstream else f"unix://{upstream}",
                                              options=limits)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                   handlers=[_Forward(self)], options=limits)

    def start(self) -> ImageServiceProxy:
        self.address.parent.mkdir(parents=True, exist_ok=True)
        if self.address.exists() or self.address.is_symlink():
            self.address.unlink()
        umask = os.umask(0o177)  # born 0600, as the snapshotter's own socket
        try:
            self._server.add_insecure_port(f"unix://{self.address}")
            self._server.start()
        finally:
            os.umask(umask)
        os.chmod(self.address, 0o600)
        log.info("CRI image service (pull credentials for lazy mounts) on %s, forwarding to %s",
                 self.address, self.upstream)
        return self

    def stop(self) -> None:
        self._server.stop(grace=2).wait()
        self._channel.close()

    def call(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        if method.endswith("/PullImage"):
            log.info("CRI %s", self.keychain.remember(request))
        remaining = context.time_remaining()
        upstream = self._channel.unary_unary(method)  # bytes in, bytes out: nothing re-encoded
        timeout = remaining if remaining is not None and remaining < 1e9 else None  # none: kubelet's pulls
        future = upstream.future(request, timeout=timeout, metadata=_passed_metadata(context))
        context.add_callback(future.cancel)  # kubelet gave up: so does containerd's call
        try:
            return future.result()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
            details = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
            context.abort(code, details)
            raise  # not reached: abort raises


def _passed_metadata(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    # gRPC's own headers are the channel's business; the caller's others go on
    return [(k, v) for k, v in context.invocation_metadata()
            if not k.startswith(("grpc-", ":")) and k not in ("user-agent", "content-type", "te")]


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: ImageServiceProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        service = method.strip("/").split("/", 1)[0]
        if service not in SERVICES:
            return None  # UNIMPLEMENTED: kubelet's runtime service talks to containerd itself
        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._proxy.call(method, request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour)  # no (de)serializers: raw bytes
