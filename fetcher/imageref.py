"""Image references: ``[registry/]repository[:tag][@digest]``, as docker spells them.

The first path component is a registry when it has a ``.`` or a ``:`` or is
``localhost``; otherwise the image is on Docker Hub (registry ``docker.io``) and a
one-component name lives under ``library/``. A reference with neither tag nor digest
means the tag ``latest``.
"""

from __future__ import annotations

import dataclasses
import re

from .address import split_host_port

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


def is_digest(s: str) -> bool:
    """Whether ``s`` is a sha256 or sha512 digest in canonical (lowercase hex) form."""
    return bool(_DIGEST_RE.match(s))


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRef:
    """Where an image lives: registry host[:port], repository, and tag and/or digest."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, s: str) -> ImageRef:
        """Parse a reference; ValueError saying what is wrong with it."""
        if not isinstance(s, str) or not s or s != s.strip():
            raise ValueError(f"invalid image reference {s!r}: empty or has spaces")
        if "://" in s:
            raise ValueError(f"invalid image reference {s!r}: drop the scheme (no http://)")
        rest, digest = s, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if "/" not in rest and "/" in digest:
                raise ValueError(f"invalid image reference {s!r}: no user@ before the registry "
                                 "(give credentials with --creds or a credentials file)")
            if not is_digest(digest):
                raise ValueError(f"invalid image reference {s!r}: bad digest {digest!r}")
        registry = DOCKER_HUB
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            try:
                split_host_port(first)
            except ValueError as exc:
                raise ValueError(f"invalid image reference {s!r}: bad registry {first!r}: {exc}") from None
            registry = DOCKER_HUB if first in _HUB_ALIASES else first
            rest = remainder
        tag = None
        name, colon, maybe_tag = rest.rpartition(":")
        if colon and "/" not in maybe_tag:
            if not _TAG_RE.match(maybe_tag):
                raise ValueError(f"invalid image reference {s!r}: bad tag {maybe_tag!r}")
            rest, tag = name, maybe_tag
        if not _REPOSITORY_RE.match(rest):
            hint = " (repository names are lowercase)" if rest.lower() != rest else ""
            raise ValueError(f"invalid image reference {s!r}: bad repository {rest!r}{hint}")
        if registry == DOCKER_HUB and "/" not in rest:
            rest = "library/" + rest
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, rest, tag, digest)

    @property
    def reference(self) -> str:
        """What to ask the manifest endpoint for: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out
