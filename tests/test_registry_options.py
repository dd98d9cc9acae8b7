"""Credentials lookup and mirror failover, without a network."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import trio

from fetcher.credentials import lookup, parse_creds
from fetcher.errors import AuthError
from fetcher.imageref import ImageRef
from fetcher.mirrors import MirroredClient
from fetcher.registry import RegistryClient


def test_docker_config_lookup(tmp_path, monkeypatch):
    conf = tmp_path / "config.json"
    auth = base64.b64encode(b"bob:pa:ss").decode()
    conf.write_text(json.dumps({"auths": {"reg.example:5000": {"auth": auth},
                                          "https://index.docker.io/v1/": {"auth": auth},
                                          "bad.example": {"auth": "!!"}}}))
    assert lookup("reg.example:5000", str(conf)) == ("bob", "pa:ss")
    assert lookup("docker.io", str(conf)) == ("bob", "pa:ss")
    assert lookup("other.example", str(conf)) is None
    with pytest.raises(AuthError) as e:
        lookup("bad.example", str(conf))
    assert "!!" not in str(e.value)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert lookup("reg.example:5000") == ("bob", "pa:ss")
    with pytest.raises(AuthError):
        lookup("reg.example:5000", str(tmp_path / "missing.json"))
    assert parse_creds("u:p:q") == ("u", "p:q")
    with pytest.raises(ValueError):
        parse_creds("nopassword")


def test_mirror_first_then_registry():
    data = bytes(range(256)) * 4
    digest = "sha256:" + "a" * 64
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "dead.mirror":
            return httpx.Response(404)
        start, end = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
        return httpx.Response(206, content=data[start:end + 1],
                              headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})

    transport = httpx.MockTransport(handler)
    ref = ImageRef.parse("reg.example/app:1")

    async def main() -> None:
        origin = RegistryClient(ref, transport=transport)
        dead = RegistryClient(ImageRef.parse("dead.mirror/app:1"), transport=transport)
        good = RegistryClient(ImageRef.parse("good.mirror/app:1"), transport=transport)
        async with trio.open_nursery():
            client = MirroredClient(origin, [good])
            assert await client.read_range(digest, 10, 20) == data[10:30]
            assert seen == ["good.mirror"]
            seen.clear()
            client = MirroredClient(origin, [dead, good])
            assert await client.read_range(digest, 0, 5) == data[:5]
            assert await client.read_range(digest, 5, 5) == data[5:10]
            assert seen == ["dead.mirror", "good.mirror", "good.mirror"]  # the dead one is benched
            await client.aclose()

    trio.run(main)


def test_blob_record_merges_bounds_and_survives_a_bad_file(tmp_path, monkeypatch):
    from fetcher import blobrepos

    path = tmp_path / "state" / "blob-repos.json"
    one = blobrepos.BlobRepos("reg:5000", path)
    two = blobrepos.BlobRepos("reg:5000", path)  # another push, at the same time
    one.add("sha256:a", "lazy-a")
    two.add("sha256:b", "lazy-b")
    one.save()
    two.save()
    again = blobrepos.BlobRepos("reg:5000", path)
    assert again.holders("sha256:a", exclude="x") == ["lazy-a"]
    assert again.holders("sha256:b", exclude="lazy-b") == []
    assert blobrepos.BlobRepos("other:5000", path).holders("sha256:a", exclude="x") == []
    monkeypatch.setattr(blobrepos, "REPOS_PER_BLOB", 2)
    for repo in ("r1", "r2", "r3"):
        again.add("sha256:a", repo)
    assert again.holders("sha256:a", exclude="r3") == ["r2"]  # newest first, bounded
    path.write_text("{not json")
    assert blobrepos.BlobRepos("reg:5000", path).holders("sha256:a", exclude="x") == []
