"""Manifests as a registry serves them, and resolving an image to one platform's.

    Manifest(data, media_type, digest)      exact bytes, as received; .json() parses them
    ManifestSource                          what resolving asks of a client
    resolve_image_manifest(client, ref, p)  -> the image manifest for platform p: ref's
                                            own, or the one its image index lists for p

Which entry of an index is the platform's is decided in one place for every layer,
``blockindex.oci.pick_platform``; its errors are translated here into ``FetchError``s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Protocol

from blockindex.errors import ImageError, NoPlatformError
from blockindex.oci import (
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    pick_platform,
)

from .errors import NotFoundError, ServerError
from .imageref import ImageRef

MANIFEST_ACCEPT = ", ".join(
    [MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST]
)
IMAGE_INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})
"""An OCI image index or a Docker manifest list: a manifest of manifests, one per
platform (not lazyfs's block index: ``blockindex.format.BLOCK_INDEX_MEDIA_TYPES``)."""
MAX_MANIFEST_SIZE = 4 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest's exact bytes, its media type, and the sha256 digest of those bytes."""

    data: bytes
    media_type: str
    digest: str

    @classmethod
    def received(cls, data: bytes, content_type: str) -> Manifest:
        """A manifest as it arrived with ``Content-Type``; a generic or missing type gives
        way to the ``mediaType`` the document names."""
        media_type = content_type.split(";")[0].strip()
        if not media_type or media_type in ("application/json", "text/plain"):
            media_type = _embedded_media_type(data) or media_type
        return cls(data, media_type, "sha256:" + hashlib.sha256(data).hexdigest())

    def matches(self, reference: str) -> bool:
        """Whether these bytes are the ones ``reference`` names: true of any tag, and of
        a digest (sha256 or sha512) when the bytes hash to it."""
        if ":" not in reference:
            return True
        algorithm = reference.split(":", 1)[0]
        if algorithm not in ("sha256", "sha512"):
            return self.digest == reference
        return f"{algorithm}:{hashlib.new(algorithm, self.data).hexdigest()}" == reference

    @property
    def is_index(self) -> bool:
        return self.media_type in IMAGE_INDEX_MEDIA_TYPES

    def json(self) -> dict:
        try:
            doc = json.loads(self.data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ServerError(f"manifest {self.digest} is not JSON") from exc
        if not isinstance(doc, dict):
            raise ServerError(f"manifest {self.digest} is not a JSON object")
        return doc


class ManifestSource(Protocol):
    """What resolving an image asks of a client (a RegistryClient, or a MirroredClient)."""

    async def get_manifest(self, reference: str | None = None) -> Manifest: ...


async def resolve_image_manifest(
    client: ManifestSource, ref: ImageRef, platform: str | None = None
) -> Manifest:
    """The image manifest for ``ref``: the manifest itself, or, if ``ref`` names an
    index, the entry for ``platform`` (``os/arch[/variant]``; this host's by default).
    The index is fetched once, its entry once."""
    manifest = await client.get_manifest(ref.reference)
    if not manifest.is_index:
        return manifest
    where = f"{ref}: image index {manifest.digest}"
    try:
        desc = pick_platform(manifest.json(), platform, where=where)
    except NoPlatformError as exc:
        raise NotFoundError(str(exc)) from exc
    except ImageError as exc:
        raise ServerError(str(exc)) from exc
    return await client.get_manifest(desc["digest"])


def _embedded_media_type(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
