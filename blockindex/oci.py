"""OCI image layouts on disk: read and write blobs, manifests and tags.

A layout is a directory with ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``
(OCI image-spec ``image-layout.md``). Tags are the ``org.opencontainers.image.ref.name``
annotation of a manifest descriptor in ``index.json``.

An image index (in a layout or a registry) lists one image per platform; ``pick_platform``
is the one place that chooses among them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import ImageError, NoPlatformError

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

Descriptor = dict[str, Any]


def check_digest(digest: str) -> str:
    """``digest`` if it is a well-formed sha256 digest; ImageError otherwise."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ImageError(f"malformed digest {digest!r}")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Stable JSON bytes: sorted keys, no spaces (the same object gives the same digest)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> str:
    """This machine's platform as image indexes name it: ``linux/amd64``, ``linux/arm64``."""
    machine = os.uname().machine
    return f"linux/{_ARCHES.get(machine, machine)}"


def pick_platform(index: dict[str, Any], platform: str | None, *, where: str = "image index") -> Descriptor:
    """The descriptor in image ``index`` (its parsed JSON) of the image for ``platform``
    (``os/arch[/variant]``; this machine's when None). The variant counts only when
    ``platform`` names one; an index of a single image that names no platform is that
    image. ``NoPlatformError`` when no entry matches, ``ImageError`` for an index with no
    list of manifests; ``where`` starts their messages."""
    platform = platform or host_platform()
    want = platform.split("/")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{where} has no manifests list")
    for desc in entries:
        plat = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(plat, dict) or not isinstance(desc.get("digest"), str):
            continue
        have = [plat.get("os"), plat.get("architecture")]
        if len(want) > 2:
            have.append(plat.get("variant"))
        if have == want:
            return desc
    only = entries[0] if len(entries) == 1 else None
    if isinstance(only, dict) and "platform" not in only and isinstance(only.get("digest"), str):
        return only
    raise NoPlatformError(f"{where} lists no image for platform {platform} "
                          f"(of {len(entries)} entries)")


class Layout:
    """One OCI image layout directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def is_layout(self) -> bool:
        return (self.root / "oci-layout").is_file() and (self.root / "index.json").is_file()

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest).removeprefix("sha256:")

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise ImageError(f"{self.root}: blob {digest} is missing") from exc
        if sha256_digest(data) != digest:
            raise ImageError(f"{self.root}: blob {digest} does not match its digest")
        return data

    def index(self) -> dict[str, Any]:
        try:
            index = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError as exc:
            raise ImageError(f"{self.root}: not an OCI image layout (no index.json)") from exc
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # too deep: RecursionError
            raise ImageError(f"{self.root}/index.json: malformed JSON ({exc})") from exc
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise ImageError(f"{self.root}/index.json: not an OCI image index")
        if not all(isinstance(d, dict) for d in index.get("manifests", [])):
            raise ImageError(f"{self.root}/index.json: a manifest entry that is not a JSON object")
        return index

    def tags(self) -> dict[str, Descriptor]:
        """Tag name to manifest descriptor."""
        out: dict[str, Descriptor] = {}
        for desc in self.index().get("manifests", []):
            annotations = desc.get("annotations")
            name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
            if isinstance(name, str) and name:
                out[name] = desc
        return out

    def resolve(self, tag: str | None) -> Descriptor:
        """The manifest descriptor for ``tag``; with no tag, the only manifest there is."""
        manifests = self.index().get("manifests", [])
        if tag is None:
            if len(manifests) == 1:
                return manifests[0]
            tags = self.tags()
            if "latest" in tags:
                return tags["latest"]
            raise ImageError(f"{self.root}: holds {len(manifests)} images; name one with :TAG")
        try:
            return self.tags()[tag]
        except KeyError:
            raise ImageError(f"{self.root}: no image tagged {tag!r}") from None

    # -- writing ----------------------------------------------------------------------

    def init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").exists():
            _atomic_write(self.root / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not (self.root / "index.json").exists():
            _atomic_write(
                self.root / "index.json",
                canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": []}),
            )

    def write_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            _atomic_write(path, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_blob_file(self, src: Path, digest: str) -> None:
        """Move a finished file (whose sha256 is ``digest``) into the blob store."""
        path = self.blob_path(digest)
        if path.exists():
            src.unlink()
        else:
            os.replace(src, path)

    def tag(self, desc: Descriptor, tag: str) -> None:
        """Point ``tag`` at manifest ``desc`` (replacing what it pointed at before)."""
        index = self.index()
        kept = [
            d for d in index.get("manifests", [])
            if not isinstance(d.get("annotations"), dict) or d["annotations"].get(REF_NAME) != tag
        ]
        kept.append({**desc, "annotations": {REF_NAME: tag}})
        index["manifests"] = kept
        _atomic_write(self.root / "index.json", canonical_json(index))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
