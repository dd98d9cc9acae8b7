"""Image inputs: parse a source reference and open its layers as uncompressed tar streams.

    docker-archive:PATH[:TAG]   what ``docker save`` writes (a tar, or that tar unpacked)
    oci:DIR[:TAG]               an OCI image layout (image indexes are followed to linux/amd64)
    dir:PATH                    a root filesystem directory
    tar:PATH                    a root filesystem tar (plain, gzip or zstd)

All of them are local: an image in a registry is pulled into an OCI layout first, by
the orchestration above the format (``lazyfs.convert``).

Each layer is read once, in order; compression is detected from magic bytes, whatever a
media type claims. OCI layer blobs are checked against their digests as they are read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ImageError, UnsafeImageError, UnsupportedImageError
from .format import ARTIFACT_ANNOTATION
from .oci import (
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_OCI_INDEX,
    Layout,
    canonical_json,
    check_digest,
)

SCHEMES = ("docker-archive", "oci", "dir", "tar")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# The config of an image made from a bare root filesystem: fixed, so output is deterministic.
ROOTFS_CONFIG = canonical_json(
    {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {},
    }
)

OpenLayer = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    name: str  # for messages: the file or blob this layer comes from
    open: OpenLayer  # a context manager giving the uncompressed tar stream


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """An opened image source: its config bytes and either layers or a directory."""

    config: bytes
    layers: list[Layer] = dataclasses.field(default_factory=list)
    directory: Path | None = None
    closer: Callable[[], None] | None = None

    def close(self) -> None:
        if self.closer is not None:
            self.closer()


def split_tag(ref: str) -> tuple[str, str | None]:
    """``PATH[:TAG]``: split on the last ':' when what follows has no '/'."""
    i = ref.rfind(":")
    if i > 0 and ref[i + 1 :] and "/" not in ref[i + 1 :]:
        return ref[:i], ref[i + 1 :]
    return ref, None


def open_source(ref: str) -> Source:
    """Open image ``ref`` (one of the forms in the module docstring)."""
    scheme, sep, rest = ref.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ImageError(f"unknown source {ref!r}: expected one of docker-archive:, oci:, dir:, tar:")
    if scheme == "dir":
        directory = Path(rest)
        if not directory.is_dir():
            raise ImageError(f"{rest}: no such directory")
        return Source(ROOTFS_CONFIG, directory=directory)
    if scheme == "tar":
        if not os.path.isfile(rest):
            raise ImageError(f"{rest}: no such file")
        return Source(ROOTFS_CONFIG, [Layer(rest, lambda: _open_file_layer(Path(rest), rest))])
    # A path that exists as written carries no tag, even if it has a ':' in it.
    path, tag = (rest, None) if os.path.exists(rest) else split_tag(rest)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file or directory")
    if scheme == "oci":
        return _oci_source(Layout(path), tag)
    return _docker_archive_source(path, tag)


# -- decompression ------------------------------------------------------------------------


@contextlib.contextmanager
def decompressed(raw: BinaryIO, name: str, magic: bytes | None = None) -> Iterator[BinaryIO]:
    """``raw`` as an uncompressed stream, chosen by its magic bytes (peeked from ``raw``,
    which must then be seekable and at offset 0, unless the caller passes ``magic``)."""
    if magic is None:
        magic = raw.read(4)
        raw.seek(0)
    if magic.startswith(GZIP_MAGIC):
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield gz  # type: ignore[misc]
    elif magic == ZSTD_MAGIC:
        with _zstd_reader(raw, name) as z:
            yield z
    else:
        yield raw


@contextlib.contextmanager
def _zstd_reader(raw: BinaryIO, name: str) -> Iterator[BinaryIO]:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as z:
            yield z
        return
    exe = shutil.which("zstd")
    if exe is None:
        raise UnsupportedImageError(f"{name}: zstd-compressed, but neither the zstandard "
                                    "module nor the zstd program is installed")
    proc = subprocess.Popen(
        [exe, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        try:
            while block := raw.read(1 << 20):
                proc.stdin.write(block)  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]

    feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
    feeder.start()
    ok = False
    try:
        yield proc.stdout  # type: ignore[misc]
        while proc.stdout.read(1 << 20):  # let zstd check the whole stream
            pass
        ok = True
    finally:
        if not ok:
            proc.kill()
        proc.stdout.close()
        rc = proc.wait()
        feeder.join()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    if rc != 0:
        raise ImageError(f"{name}: corrupt zstd data ({err or 'zstd exit ' + str(rc)})")


@contextlib.contextmanager
def _open_file_layer(path: Path, name: str) -> Iterator[BinaryIO]:
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc.strerror})") from exc
    with f, decompressed(f, name) as stream:
        yield stream


class _Verifying(io.RawIOBase):
    """Passes reads through, hashing them; ``verify`` drains the rest and checks sha256."""

    def __init__(self, f: BinaryIO, digest: str, name: str) -> None:
        self._f, self._digest, self._name = f, digest, name
        self._h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        self._h.update(data)
        b[: len(data)] = data
        return len(data)

    def verify(self) -> None:
        while block := self._f.read(1 << 20):
            self._h.update(block)
        if "sha256:" + self._h.hexdigest() != self._digest:
            raise ImageError(f"{self._name}: blob does not match its digest")


# -- OCI layouts ----------------------------------------------------------------------------


def _json_blob(layout: Layout, digest: str, what: str) -> dict[str, Any]:
    return _check_json(layout.read_blob(digest), f"{layout.root}: {what} {digest}")


def _pick_platform(manifests: list[Any], where: str) -> dict[str, Any]:
    if len(manifests) == 1:
        return manifests[0]
    for m in manifests:
        p = m.get("platform")
        if isinstance(p, dict) and p.get("os") == "linux" and p.get("architecture") == "amd64":
            return m
    raise ImageError(f"{where}: an image index with {len(manifests)} images and none linux/amd64")


def _oci_source(layout: Layout, tag: str | None) -> Source:
    if not layout.is_layout():
        raise ImageError(f"{layout.root}: not an OCI image layout (no oci-layout or index.json)")
    desc = layout.resolve(tag)
    for _ in range(8):  # image indexes may nest; a few levels is plenty
        digest = check_digest(desc.get("digest", ""))
        obj = _json_blob(layout, digest, "manifest")
        media_type = obj.get("mediaType") or desc.get("mediaType")
        if media_type in (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST) or (
            "manifests" in obj and "layers" not in obj
        ):
            manifests = [m for m in obj.get("manifests") or [] if isinstance(m, dict)]
            if not manifests:
                raise ImageError(f"{layout.root}: image index {digest} lists no images")
            desc = _pick_platform(manifests, f"{layout.root}: {digest}")
            continue
        return _oci_manifest_source(layout, obj, digest)
    raise ImageError(f"{layout.root}: image indexes nest too deeply")


def _oci_manifest_source(layout: Layout, manifest: dict[str, Any], digest: str) -> Source:
    annotations = manifest.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ImageError(f"{layout.root}: manifest {digest}: annotations are not a JSON object")
    if ARTIFACT_ANNOTATION in annotations:
        raise UnsupportedImageError(f"{layout.root}: {digest} is already a lazyfs image")
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list) or not all(
            isinstance(desc, dict) for desc in layers):
        raise ImageError(f"{layout.root}: manifest {digest} has no config or layers")
    config_bytes = layout.read_blob(check_digest(config.get("digest", "")))
    _check_json(config_bytes, f"{layout.root}: config {config.get('digest')}")
    out = []
    for desc in layers:
        ldigest = check_digest(desc.get("digest", ""))
        path = layout.blob_path(ldigest)
        if not path.is_file():
            raise ImageError(f"{layout.root}: layer blob {ldigest} is missing")
        out.append(Layer(f"{layout.root}: layer {ldigest}", _oci_layer_opener(path, ldigest)))
    return Source(config_bytes, out)


def _oci_layer_opener(path: Path, digest: str) -> OpenLayer:
    @contextlib.contextmanager
    def open_layer() -> Iterator[BinaryIO]:
        name = f"layer {digest}"
        with open(path, "rb") as f:
            magic = f.read(4)
            f.seek(0)
            checked = _Verifying(f, digest, name)
            with decompressed(checked, name, magic) as stream:  # type: ignore[arg-type]
                yield stream
            checked.verify()

    return open_layer


def _check_json(data: bytes, what: str) -> Any:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # too deep: RecursionError
        raise ImageError(f"{what}: malformed JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: not a JSON object")
    return obj


# -- docker save archives --------------------------------------------------------------------


class _Archive:
    """The files of a ``docker save`` output, whether a tar (any compression) or a dir."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if not os.path.isdir(path):
            try:
                self._tar = tarfile.open(path, "r:*", encoding="utf-8", errors="surrogateescape")
                for m in self._tar.getmembers():
                    self._members[_norm(m.name)] = m
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ImageError(f"{path}: not a docker-archive tar ({exc})") from exc

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        norm = _norm(name)
        if norm.startswith("../") or norm == "..":
            raise UnsafeImageError(f"{self.path}: {name!r} points outside the archive")
        try:
            if self._tar is None:
                full = os.path.realpath(os.path.join(self.path, norm))
                if os.path.commonpath([full, os.path.realpath(self.path)]) != os.path.realpath(
                    self.path
                ):
                    raise UnsafeImageError(f"{self.path}: {name!r} points outside the archive")
                with open(full, "rb") as f:
                    yield f
                return
            member = self._members.get(norm)
            if member is None:
                raise ImageError(f"{self.path}: {name!r} is missing from the archive")
            extracted = self._tar.extractfile(member)
            if extracted is None:
                raise ImageError(f"{self.path}: {name!r} is not a file")
            with extracted:
                yield extracted  # type: ignore[misc]
        except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
            raise ImageError(f"{self.path}: cannot read {name!r} ({exc})") from exc

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            try:
                return f.read()
            except (EOFError, OSError) as exc:
                raise ImageError(f"{self.path}: cannot read {name!r} ({exc})") from exc


def _norm(name: str) -> str:
    return posixpath.normpath(name.lstrip("/")) if name.strip("/.") else "."


def _docker_archive_source(path: str, tag: str | None) -> Source:
    archive = _Archive(path)
    try:
        manifest = _parse_json_list(archive.read("manifest.json"), f"{path}: manifest.json")
        entry = _pick_docker_image(manifest, tag, path)
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageError(f"{path}: manifest.json: an entry without Config or Layers")
        config = archive.read(config_name)
        _check_json(config, f"{path}: {config_name}")
    except BaseException:
        archive.close()
        raise

    def opener(name: str) -> OpenLayer:
        @contextlib.contextmanager
        def open_layer() -> Iterator[BinaryIO]:
            with archive.open(name) as raw, decompressed(raw, f"{path}: {name}") as stream:
                yield stream

        return open_layer

    layers = [Layer(f"{path}: {n}", opener(str(n))) for n in layer_names]
    return Source(config, layers, closer=archive.close)


def _parse_json_list(data: bytes, what: str) -> list[Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # too deep: RecursionError
        raise ImageError(f"{what}: malformed JSON ({exc})") from exc
    if not isinstance(obj, list) or not obj or not all(isinstance(e, dict) for e in obj):
        raise ImageError(f"{what}: expected a non-empty list of images")
    return obj


def _pick_docker_image(manifest: list[dict[str, Any]], tag: str | None, path: str) -> dict:
    if tag is None:
        if len(manifest) == 1:
            return manifest[0]
        raise ImageError(f"{path}: holds {len(manifest)} images; name one with :TAG")
    for entry in manifest:
        for repo_tag in entry.get("RepoTags") or []:
            if repo_tag == tag or repo_tag.endswith(":" + tag) or repo_tag.split(":")[0] == tag:
                return entry
    raise ImageError(f"{path}: no image tagged {tag!r}")
