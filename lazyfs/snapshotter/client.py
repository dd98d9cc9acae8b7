"""``lazyfs pull``: a lazy pull into containerd, which ``ctr image pull`` cannot do (it
never passes snapshot labels).

It reads the manifest and config from the registry (not a single chunk blob), and over
containerd's gRPC API, under a lease so that nothing is collected half-way: writes both
into the content store with the garbage-collection labels containerd's own unpacker sets
(the manifest references its config, the config its top snapshot), prepares one snapshot
per layer through the ``lazyfs`` snapshotter with the CRI labels, which the snapshotter
answers as already present (a remote snapshot), and creates the image record. ``ctr run``
then finds the image unpacked and starts a container over the lazy mount.

An ordinary image (not converted) is pulled the same way when its layers are eStargz (each
names its TOC digest) or a side index is attached to it (``lazyfs index``): the
snapshotter's mount reads its layers through the index it builds from their TOCs, or through
the side index. Any other is refused (``NotLazyImageError``), for ``ctr image pull`` to
pull whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator

import grpc
import trio

from blockindex import format as fmt
from blockindex.estargz import is_estargz_image
from fetcher.imageref import ImageRef
from fetcher.manifests import resolve_image_manifest
from fetcher.referrers import find_referrers
from fetcher.registry import RegistryClient

from ..errors import ExitCode, NotLazyImageError, UserError
from . import protos
from .labels import LABEL_DEFER, LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_TARGET

protos.generate()
from ._gen.containerd.services.content.v1 import content_pb2, content_pb2_grpc  # noqa: E402
from ._gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc  # noqa: E402
from ._gen.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc  # noqa: E402
from ._gen.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc  # noqa: E402
from ._gen.containerd.types import descriptor_pb2  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PullResult:
    name: str
    digest: str
    layers: int


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's (OCI's) chain ids: ChainID(L0) = DiffID(L0), then
    ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _fetch(ref: ImageRef) -> tuple[bytes, str, str, bytes]:
    """(manifest bytes, manifest digest, media type, config bytes) from the registry."""
    async def run() -> tuple[bytes, str, str, bytes]:
        client = RegistryClient(ref)
        try:
            m = await resolve_image_manifest(client, ref)
            manifest = json.loads(m.data)
            if (manifest.get("annotations") or {}).get(fmt.ARTIFACT_ANNOTATION) is None \
                    and not is_estargz_image(manifest) \
                    and not await find_referrers(client, m.digest, fmt.MEDIA_TYPE_SIDE_INDEX):
                raise NotLazyImageError(f"{ref} is not a lazyfs image and has no side index (pull it "
                                        f"with ctr image pull, or attach one: lazyfs index docker://{ref})")
            config = await client.read_blob(manifest["config"]["digest"], max_size=4 << 20)
            return m.data, m.digest, m.media_type, config
        finally:
            await client.aclose()

    return trio.run(run)


def pull(name: str, *, address: str, namespace: str, snapshotter: str = "lazyfs",
         channels: Channels | None = None) -> PullResult:
    """Pull ``name`` into containerd lazily. With ``channels`` (a long-lived caller: the
    snapshotter's pull socket), the gRPC channel to containerd is kept for the next pull
    instead of being opened and closed around this one."""
    try:
        ref = ImageRef.parse(name)
    except ValueError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from exc
    if not os.path.exists(address):
        raise UserError(f"containerd socket {address} does not exist (is containerd running?)",
                        ExitCode.NETWORK)
    manifest_bytes, digest, media_type, config_bytes = _fetch(ref)
    manifest = json.loads(manifest_bytes)
    config = json.loads(config_bytes)
    diff_ids = list(config.get("rootfs", {}).get("diff_ids") or [])
    layers = manifest.get("layers") or []
    if len(diff_ids) != len(layers):
        raise NotLazyImageError(f"{name}: {len(diff_ids)} diff ids for {len(layers)} layers "
                                "(converted by an older lazyfs? convert it again)")
    chains = chain_ids(diff_ids)
    image_name = str(ref)
    with (contextlib.nullcontext(channels.get(address)) if channels is not None
          else _channel(address)) as channel:
        md: list[tuple[str, str]] = [("containerd-namespace", namespace)]
        leases = leases_pb2_grpc.LeasesStub(channel)
        lease_id = f"lazyfs-pull-{os.getpid()}-{time.time_ns()}"
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        try:
            leases.Create(leases_pb2.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": expire}),
                          metadata=md)
            leased = [*md, ("containerd-lease", lease_id)]
            try:
                content = content_pb2_grpc.ContentStub(channel)
                config_desc = manifest["config"]
                _write(content, config_bytes, config_desc["digest"], leased,
                       {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]} if chains else {})
                _write(content, manifest_bytes, digest, leased,
                       {"containerd.io/gc.ref.content.config": config_desc["digest"]})
                snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
                parent = ""
                for layer, chain in zip(layers, chains, strict=True):
                    _prepare_remote(snaps, snapshotter, chain, parent, leased, {
                        LABEL_TARGET: chain, LABEL_IMAGE_REF: image_name,
                        LABEL_MANIFEST: digest, LABEL_LAYER: layer["digest"], LABEL_DEFER: "1"})
                    parent = chain
                _create_image(channel, image_name, media_type, digest, len(manifest_bytes), md)
            finally:
                leases.Delete(leases_pb2.DeleteRequest(id=lease_id), metadata=md)
        except grpc.RpcError as exc:
            raise UserError(f"containerd refused the pull: {exc.code().name}: {exc.details()}",
                            ExitCode.NETWORK) from exc
    return PullResult(image_name, digest, len(layers))


@contextlib.contextmanager
def _channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{address}") as channel:
        _ready(channel, address)
        yield channel


def _ready(channel: grpc.Channel, address: str) -> None:
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        raise UserError(f"containerd does not answer on {address}", ExitCode.NETWORK) from None


class Channels:
    """gRPC channels to containerd by socket path, opened on first use and kept (a channel
    reconnects by itself when containerd restarts)."""

    def __init__(self) -> None:
        self._open: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._open.get(address)
            if channel is None:
                channel = self._open[address] = grpc.insecure_channel(f"unix://{address}")
        _ready(channel, address)
        return channel

    def close(self) -> None:
        with self._lock:
            for channel in self._open.values():
                channel.close()
            self._open.clear()


def _write(content, data: bytes, digest: str, md, labels: dict[str, str]) -> None:
    try:
        content.Info(content_pb2.InfoRequest(digest=digest), metadata=md)
        if labels:
            content.Update(content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=digest, labels=labels),
                update_mask={"paths": [f"labels.{k}" for k in labels]}), metadata=md)
        return
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    request = content_pb2.WriteContentRequest(
        action=content_pb2.COMMIT, ref=f"lazyfs-{digest}", total=len(data), expected=digest,
        offset=0, data=data, labels=labels)
    try:
        for _ in content.Write(iter([request]), metadata=md):
            pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def _prepare_remote(snaps, snapshotter: str, chain: str, parent: str, md, labels: dict[str, str]) -> None:
    try:
        snaps.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=chain), metadata=md)
        return
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    key = f"extract-{time.time_ns()} {chain}"
    try:
        snaps.Prepare(snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels), metadata=md)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            return
        raise
    snaps.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), metadata=md)
    raise UserError(f"the {snapshotter} snapshotter could not mount {labels[LABEL_IMAGE_REF]} lazily "
                    "(see its log)", ExitCode.MOUNT)


def _create_image(channel, name: str, media_type: str, digest: str, size: int, md) -> None:
    images = images_pb2_grpc.ImagesStub(channel)
    image = images_pb2.Image(name=name, target=descriptor_pb2.Descriptor(
        media_type=media_type, digest=digest, size=size))
    try:
        images.Create(images_pb2.CreateImageRequest(image=image), metadata=md)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        images.Update(images_pb2.UpdateImageRequest(image=image, update_mask={"paths": ["target"]}),
                      metadata=md)
