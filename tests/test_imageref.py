"""Parsing image references the way docker does."""

from __future__ import annotations

import pytest

from fetcher.imageref import ImageRef

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("127.0.0.1:5000/app:1", "127.0.0.1:5000", "app", "1", None),
        ("host:5000/app", "host:5000", "app", "latest", None),
        (f"host.example/a/b@{D}", "host.example", "a/b", None, D),
        (f"host.example/a/b:v1@{D}", "host.example", "a/b", "v1", D),
        # Like docker: a first component without '.' or ':' is a Docker Hub namespace.
        (f"host/a/b@{D}", "docker.io", "host/a/b", None, D),
        ("localhost/app", "localhost", "app", "latest", None),
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("user/app:x", "docker.io", "user/app", "x", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
        ("registry.example/team/app/sub:1.0-rc_1", "registry.example", "team/app/sub",
         "1.0-rc_1", None),
        ("[::1]:5000/app:1", "[::1]:5000", "app", "1", None),
    ],
)
def test_parse(text: str, registry: str, repository: str, tag: str | None,
               digest: str | None) -> None:
    ref = ImageRef.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag,
                                                                    digest)
    assert ref.reference == (digest or tag)
    assert ImageRef.parse(str(ref)) == ref


def test_str_is_canonical() -> None:
    assert str(ImageRef.parse("ubuntu")) == "docker.io/library/ubuntu:latest"
    assert str(ImageRef.parse(f"h:1/a@{D}")) == f"h:1/a@{D}"


@pytest.mark.parametrize(
    "text",
    ["", " app", "http://host/app", "Host/App", "app:", "app:-x", "host/a//b", "app@sha256:12",
     "host:5000/", "/app", "a/b:c:d", "host:abc/app:1", "app@md5:" + "0" * 32, "app:" + "x" * 129,
     # ports outside 1-65535 are refused, not wrapped (80536 would reach port 15000)
     "127.0.0.1:0/app:1", "127.0.0.1:65536/app:1", "127.0.0.1:80536/app:1", "host:99999/app",
     "host:-1/app:1", "host:05000/app", "host:/app", ":5000/app:1", "127.0.0.1:+80/app",
     # hosts that are not hosts
     "[::1::2]:5000/app", "[::1:5000/app", "::1]:5000/app", "[::1]x/app", "999.1.1.1/app",
     "ho st:5000/app", "host\t:5000/app", "host\x00.io/app", "h\u00e9.io/app",
     "user@127.0.0.1:5000/app:1", "user:pw@host.io/app"],
)
def test_garbage_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid image reference"):
        ImageRef.parse(text)
