"""OCI referrers: artifacts attached to an image without changing (or re-pushing) it.

    push_referrer(client, subject, artifact_type, data)  -> the artifact manifest's digest
    find_referrers(client, subject_digest, artifact_type) -> descriptors, newest last
    read_referrer(client, subject_digest, descriptor, media_type, max_size) -> verified bytes

An artifact is an OCI image manifest whose ``subject`` is the image's manifest, with the
empty config (``application/vnd.oci.empty.v1+json``, ``{}``) and one layer holding the
data. A registry with the OCI 1.1 referrers API indexes it by itself (and says so with an
``OCI-Subject`` header on the manifest PUT); for one without (the CNCF distribution 2.x,
Debian's docker-registry) the client keeps the list itself, per the spec's *referrers tag
schema*: an image index tagged ``sha256-<hex of the subject digest>`` listing the
referrers' descriptors. Lookups try ``GET /v2/<name>/referrers/<digest>`` first and fall
back to that tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.parse
from typing import Any

import httpx

from blockindex.oci import MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, canonical_json

from .bodies import read_whole
from .errors import FetchError, IntegrityError, NotFoundError, ServerError, UnreachableError
from .push import push_blob_bytes
from .registry import Manifest, RegistryClient

log = logging.getLogger(__name__)

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
CREATED_ANNOTATION = "org.opencontainers.image.created"
MAX_INDEX = 4 << 20


def referrers_tag(subject_digest: str) -> str:
    """The fallback tag of a subject's referrers index: ``sha256-<hex>``."""
    algo, _, hexd = subject_digest.partition(":")
    return f"{algo}-{hexd}"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_referrer(client: RegistryClient, subject: Manifest, artifact_type: str, data: bytes,
                        annotations: dict[str, str] | None = None) -> str:
    """Attach ``data`` to ``subject`` as an artifact of ``artifact_type``; earlier artifacts
    of the same type are dropped from the fallback index (the new one supersedes them).
    Returns the artifact manifest's digest."""
    await push_blob_bytes(client, _sha256(EMPTY_DATA), EMPTY_DATA)
    await push_blob_bytes(client, _sha256(data), data)
    notes = {CREATED_ANNOTATION: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(annotations or {})}
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": _sha256(EMPTY_DATA), "size": len(EMPTY_DATA)},
        "layers": [{"mediaType": artifact_type, "digest": _sha256(data), "size": len(data)}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": len(subject.data)},
        "annotations": notes,
    })
    digest = _sha256(manifest)

    async def put(response: httpx.Response) -> str | None:
        if response.status_code not in (200, 201):
            raise ServerError(f"{client.ref}: manifest PUT answered {response.status_code}")
        return response.headers.get("OCI-Subject")

    indexed_by = await client.request("PUT", f"/manifests/{digest}", put,
                                      headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST}, content=manifest)
    if indexed_by == subject.digest:
        log.info("%s indexed referrer %s of %s itself", client.ref.registry, digest, subject.digest)
        return digest
    # No referrers API: keep the subject's referrers index under the fallback tag.
    tag = referrers_tag(subject.digest)
    try:
        index = (await client.get_manifest(tag)).json()
    except NotFoundError:
        index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": []}
    kept = [d for d in index.get("manifests") or []
            if isinstance(d, dict) and d.get("artifactType") != artifact_type]
    kept.append({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": digest, "size": len(manifest),
                 "artifactType": artifact_type, "annotations": notes})
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": kept}

    async def put_index(response: httpx.Response) -> None:
        if response.status_code not in (200, 201):
            raise ServerError(f"{client.ref}: referrers index PUT answered {response.status_code}")

    await client.request("PUT", f"/manifests/{tag}", put_index,
                         headers={"Content-Type": MEDIA_TYPE_OCI_INDEX}, content=canonical_json(index))
    log.info("attached %s to %s under the referrers tag %s", digest, subject.digest, tag)
    return digest


async def find_referrers(client: RegistryClient, subject_digest: str,
                         artifact_type: str) -> list[dict[str, Any]]:
    """Descriptors of the artifacts of ``artifact_type`` attached to ``subject_digest``,
    oldest first (by their creation annotation); [] when there are none."""

    async def consume(response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise ServerError(f"referrers API answered {response.status_code}")
        doc = json.loads(await read_whole(response, MAX_INDEX, "referrers index"))
        if not isinstance(doc, dict):
            raise ServerError("referrers index is not a JSON object")
        return doc

    doc: dict[str, Any] | None
    try:
        query = urllib.parse.quote(artifact_type, safe="")
        doc = await client.request("GET", f"/referrers/{subject_digest}?artifactType={query}", consume,
                                   headers={"Accept": MEDIA_TYPE_OCI_INDEX})
    except (UnreachableError, IntegrityError):
        raise
    except (FetchError, ValueError) as exc:  # no referrers API here (404, 400, 405, not JSON)
        log.debug("no referrers API (%s); trying the referrers tag", exc)
        try:
            doc = (await client.get_manifest(referrers_tag(subject_digest))).json()
        except NotFoundError:
            doc = None
    entries = (doc or {}).get("manifests")
    if not isinstance(entries, list):
        return []
    found = [d for d in entries if isinstance(d, dict) and d.get("artifactType") == artifact_type
             and isinstance(d.get("digest"), str)]
    return sorted(found, key=lambda d: str((d.get("annotations") or {}).get(CREATED_ANNOTATION, "")))


async def read_referrer(client: RegistryClient, subject_digest: str, descriptor: dict[str, Any],
                        media_type: str, max_size: int) -> bytes:
    """The data of one artifact, checked: its manifest against the descriptor's digest,
    its subject against ``subject_digest``, its layer against the layer's digest.
    Raises a FetchError (ServerError for a manifest that is not such an artifact)."""
    manifest = (await client.get_manifest(descriptor["digest"])).json()
    subject = manifest.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        raise ServerError(f"artifact {descriptor['digest']} is not attached to {subject_digest}")
    layers = manifest.get("layers")
    if (not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict)
            or layers[0].get("mediaType") != media_type or not isinstance(layers[0].get("digest"), str)):
        raise ServerError(f"artifact {descriptor['digest']} does not hold one {media_type} layer")
    size = layers[0].get("size")
    if not isinstance(size, int) or not 0 < size <= max_size:
        raise ServerError(f"artifact {descriptor['digest']}: layer size {size!r} out of range")
    return await client.read_blob(layers[0]["digest"], max_size=max_size)
