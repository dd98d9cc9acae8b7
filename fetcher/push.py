"""Push an image from an OCI image layout to a registry (the tail of ``convert``).

    push_image(layout, manifest_digest, ref, options, mount_from=None) -> PushStats

For each blob (config, then layers): HEAD it, and skip it if the registry has it; else
ask for a cross-repository mount (``POST /blobs/uploads/?mount=D&from=R``: 201 means
done) from each repository of the same registry known to hold it (``blobrepos.py``: where
earlier pushes from this machine put it), then from ``mount_from`` (the source
repository); else upload it in one piece (``POST /blobs/uploads/``, then ``PUT
LOCATION?digest=D``), in the session the last refused mount opened. Then PUT the manifest
under the tag with its media type as ``Content-Type``, and record where every blob now
is. A registry that refuses a monolithic PUT gets the blob in ``PATCH`` chunks. Blobs go a
few at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import httpx
import trio

from blockindex.oci import Layout

from .blobrepos import BlobRepos
from .errors import FetchError, NotFoundError, ServerError
from .imageref import ImageRef
from .options import RegistryOptions
from .registry import RegistryClient

log = logging.getLogger(__name__)

PARALLEL_UPLOADS = 4
#: Repositories tried for a cross-repository mount of one blob, at most.
MAX_MOUNT_TRIES = 3
PATCH_CHUNK = 16 << 20


@dataclasses.dataclass
class PushStats:
    """What a push did with each blob."""

    uploaded: int = 0
    """Blobs sent."""
    mounted: int = 0
    """Blobs the registry linked from ``mount_from``."""
    present: int = 0
    """Blobs the registry already had."""
    uploaded_bytes: int = 0


def push_image(layout: Layout, manifest_digest: str, ref: ImageRef, options: RegistryOptions,
               mount_from: str | None = None) -> PushStats:
    return trio.run(_push, layout, manifest_digest, ref, options, mount_from)


async def _push(layout: Layout, manifest_digest: str, ref: ImageRef, options: RegistryOptions,
                mount_from: str | None) -> PushStats:
    manifest = layout.read_blob(manifest_digest)
    doc = json.loads(manifest)
    media_type = doc.get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
    stats = PushStats()
    limiter = trio.CapacityLimiter(PARALLEL_UPLOADS)
    record = BlobRepos(ref.registry)
    blobs = [doc["config"]["digest"], *(d["digest"] for d in doc["layers"])]
    async with options.client(ref, push=True) as client:

        async def one(digest: str) -> None:
            sources = record.holders(digest, exclude=ref.repository)
            if mount_from and mount_from != ref.repository and mount_from not in sources:
                sources.append(mount_from)
            async with limiter:
                await _push_blob(client, layout, digest, sources[:MAX_MOUNT_TRIES], stats)

        async with trio.open_nursery() as nursery:
            for digest in blobs:
                nursery.start_soon(one, digest)

        async def created(response: httpx.Response) -> None:
            if response.status_code not in (200, 201):
                raise ServerError(f"{ref}: manifest PUT answered {response.status_code}")

        await client.request("PUT", f"/manifests/{ref.tag or manifest_digest}", created,
                             headers={"Content-Type": media_type}, content=manifest)
    for digest in blobs:
        record.add(digest, ref.repository)
    record.save()
    log.info("pushed %s: %d blobs uploaded (%d bytes), %d mounted, %d present", ref,
             stats.uploaded, stats.uploaded_bytes, stats.mounted, stats.present)
    return stats


async def _exists(client: RegistryClient, digest: str) -> bool:
    async def ok(response: httpx.Response) -> bool:
        return response.status_code == 200

    try:
        return await client.request("HEAD", f"/blobs/{digest}", ok)
    except NotFoundError:
        return False


async def _push_blob(client: RegistryClient, layout: Layout, digest: str, sources: list[str],
                     stats: PushStats) -> None:
    if await _exists(client, digest):
        stats.present += 1
        return

    async def started(response: httpx.Response) -> tuple[int, str]:
        location = response.headers.get("Location", "")
        if response.status_code == 201:
            return 201, location
        if response.status_code != 202 or not location:
            raise ServerError(f"{client.ref}: starting an upload answered {response.status_code}")
        return 202, location

    location: str | None = None  # of the upload session to send the blob to
    for i, source in enumerate(sources):
        status, opened = await client.request(
            "POST", f"/blobs/uploads/?mount={digest}&from={source}", started)
        if status == 201:
            stats.mounted += 1
            log.debug("%s: mounted %s from %s", client.ref, digest, source)
            return
        if i + 1 < len(sources):  # not there: drop the upload session it opened, try the next
            await _cancel(client, opened)
        else:
            location = opened
    if location is None:
        _status, opened = await client.request("POST", "/blobs/uploads/", started)
        location = opened
    data = await trio.Path(layout.blob_path(digest)).read_bytes()
    await _upload(client, location, digest, data)
    stats.uploaded += 1
    stats.uploaded_bytes += len(data)


async def _cancel(client: RegistryClient, location: str) -> None:
    """Best effort: an abandoned upload session only costs the registry until it expires."""
    async def ignore(response: httpx.Response) -> None:
        return None

    try:
        await client.request("DELETE", location, ignore)
    except FetchError as exc:
        log.debug("%s: could not cancel upload %s: %s", client.ref, location, exc)


async def push_blob_bytes(client: RegistryClient, digest: str, data: bytes) -> bool:
    """Upload one blob held in memory unless the registry has it; True if it was sent."""
    if await _exists(client, digest):
        return False

    async def started(response: httpx.Response) -> str:
        location = response.headers.get("Location", "")
        if response.status_code != 202 or not location:
            raise ServerError(f"{client.ref}: starting an upload answered {response.status_code}")
        return location

    location = await client.request("POST", "/blobs/uploads/", started)
    await _upload(client, location, digest, data)
    return True


def _with_query(location: str, query: str) -> str:
    return location + ("&" if "?" in location else "?") + query


async def _upload(client: RegistryClient, location: str, digest: str, data: bytes) -> None:
    async def done(response: httpx.Response) -> int:
        return response.status_code

    headers = {"Content-Type": "application/octet-stream"}
    status = await client.request("PUT", _with_query(location, f"digest={digest}"), done,
                                  headers=headers, content=data)
    if status in (200, 201, 204):
        return
    if status != 202:
        raise ServerError(f"{client.ref}: upload of {digest} answered {status}")
    # Not taken in one piece (202 and more to send): PATCH the rest in chunks, then close.
    log.info("%s: monolithic upload refused; sending %s in chunks", client.ref, digest)

    async def next_location(response: httpx.Response) -> str:
        if response.status_code != 202:
            raise ServerError(f"{client.ref}: PATCH of {digest} answered {response.status_code}")
        return response.headers.get("Location", location)

    for start in range(0, len(data), PATCH_CHUNK):
        part = data[start : start + PATCH_CHUNK]
        location = await client.request(
            "PATCH", location, next_location, content=part,
            headers={**headers, "Content-Range": f"{start}-{start + len(part) - 1}"})
    status = await client.request("PUT", _with_query(location, f"digest={digest}"), done)
    if status not in (200, 201, 204):
        raise ServerError(f"{client.ref}: closing the upload of {digest} answered {status}")
