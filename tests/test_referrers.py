"""OCI referrers against a scripted registry (httpx.MockTransport): one with the OCI 1.1
referrers API and one without (the tag schema); the real one without the API is in
tests/test_trace_registry.py."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import pytest
import trio

from fetcher.errors import ServerError
from fetcher.imageref import ImageRef
from fetcher.referrers import find_referrers, push_referrer, read_referrer, referrers_tag
from fetcher.registry import Manifest, RegistryClient

ART = "application/vnd.example.thing.v1+json"


class FakeRegistry:
    def __init__(self, *, api: bool) -> None:
        self.api = api
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.log: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.log.append(f"{request.method} {path}")
        if m := re.match(r"^/v2/app/blobs/(sha256:[0-9a-f]{64})$", path):
            data = self.blobs.get(m[1])
            return httpx.Response(404) if data is None else httpx.Response(200, content=data)
        if path == "/v2/app/blobs/uploads/" and request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/app/blobs/uploads/u1"})
        if path == "/v2/app/blobs/uploads/u1" and request.method == "PUT":
            self.blobs[request.url.params["digest"]] = request.content
            return httpx.Response(201)
        if m := re.match(r"^/v2/app/manifests/(.+)$", path):
            ref = m[1]
            if request.method == "PUT":
                digest = "sha256:" + hashlib.sha256(request.content).hexdigest()
                entry = (request.content, request.headers["Content-Type"])
                self.manifests[ref] = self.manifests[digest] = entry
                subject = json.loads(request.content).get("subject")
                headers = {"OCI-Subject": subject["digest"]} if self.api and subject else {}
                return httpx.Response(201, headers=headers)
            if ref not in self.manifests:
                return httpx.Response(404)
            data, media_type = self.manifests[ref]
            return httpx.Response(200, content=data, headers={"Content-Type": media_type})
        if (m := re.match(r"^/v2/app/referrers/(sha256:[0-9a-f]{64})$", path)) and self.api:
            found = []
            for digest, (data, media_type) in self.manifests.items():
                doc = json.loads(data)
                if digest.startswith("sha256:") and (doc.get("subject") or {}).get("digest") == m[1]:
                    found.append({"mediaType": media_type, "digest": digest, "size": len(data),
                                  "artifactType": doc.get("artifactType"),
                                  "annotations": doc.get("annotations")})
            return httpx.Response(200, json={"schemaVersion": 2, "manifests": found})
        return httpx.Response(404)


def subject() -> Manifest:
    data = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    return Manifest(data, "application/vnd.oci.image.manifest.v1+json",
                    "sha256:" + hashlib.sha256(data).hexdigest())


async def _roundtrip(reg: FakeRegistry) -> tuple[list[dict], bytes]:
    client = RegistryClient(ImageRef.parse("registry.test/app:1"), transport=httpx.MockTransport(reg))
    async with client:
        s = subject()
        reg.manifests["1"] = reg.manifests[s.digest] = (s.data, s.media_type)
        await push_referrer(client, s, ART, b'{"first": 1}')
        await push_referrer(client, s, ART, b'{"second": 2}')
        found = await find_referrers(client, s.digest, ART)
        data = await read_referrer(client, s.digest, found[-1], ART, 1 << 20)
        return found, data


@pytest.mark.parametrize("api", [True, False])
def test_push_then_find_the_newest(api):
    reg = FakeRegistry(api=api)
    found, data = trio.run(_roundtrip, reg)
    assert data == b'{"second": 2}'
    tag_puts = [x for x in reg.log if x == f"PUT /v2/app/manifests/{referrers_tag(subject().digest)}"]
    if api:  # the registry indexes referrers itself: no tag, and both artifacts are listed
        assert tag_puts == [] and len(found) == 2
    else:  # the tag schema: the newer trace replaced the older one in the index
        assert len(tag_puts) == 2 and len(found) == 1


def test_a_referrer_of_another_subject_is_refused():
    reg = FakeRegistry(api=False)

    async def go() -> None:
        client = RegistryClient(ImageRef.parse("registry.test/app:1"), transport=httpx.MockTransport(reg))
        async with client:
            s = subject()
            reg.manifests[s.digest] = (s.data, s.media_type)
            await push_referrer(client, s, ART, b"{}")
            [desc] = await find_referrers(client, s.digest, ART)
            with pytest.raises(ServerError, match="not attached"):
                await read_referrer(client, "sha256:" + "0" * 64, desc, ART, 1 << 20)
            with pytest.raises(ServerError, match="does not hold"):
                await read_referrer(client, s.digest, desc, "application/other", 1 << 20)

    trio.run(go)
