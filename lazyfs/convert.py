"""Convert an image wherever it lives: pull it from a registry, build, push it back.

    convert("docker://reg/app:1", "docker://reg/app:1-lazy", registry=options)

The format builds from local sources only (``blockindex.convert``); this is the
orchestration above it. A ``docker://`` source is pulled first (``fetcher.pull``) into a
temp OCI layout, which is then the source; a ``docker://`` destination is built in a temp
layout and pushed from it (``fetcher.push``), its blobs mounted from the source
repository when both are on one registry. Temp layouts are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from blockindex.build import BLOB_LIMIT
from blockindex.convert import ConvertResult, check_chunk_size
from blockindex.convert import convert as convert_local
from blockindex.errors import ImageError
from blockindex.format import DEFAULT_CHUNK_SIZE
from blockindex.oci import Layout
from blockindex.sources import SCHEMES
from blockindex.tree import MAX_ENTRIES
from fetcher.imageref import ImageRef
from fetcher.options import RegistryOptions
from fetcher.pull import PULLED_TAG, pull_image
from fetcher.push import PushStats, push_image

REGISTRY = "docker://"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Converted(ConvertResult):
    """What a conversion produced, and what its push did."""

    pushed: PushStats | None = None  # None unless the destination was a registry


def convert(
    src: str,
    dst: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    blob_limit: int = BLOB_LIMIT,
    registry: RegistryOptions | None = None,
    platform: str | None = None,
    prefetch_files: list[bytes] | None = None,
    max_entries: int = MAX_ENTRIES,
) -> Converted:
    """Convert image ``src`` (a local source of ``blockindex.sources``, or
    ``docker://HOST/REPO[:TAG|@DIGEST]``) into lazyfs image ``dst`` (``oci:DIR[:TAG]`` or
    ``docker://HOST/REPO:TAG``).

    ``registry`` says how to reach registries (default: anonymous, no mirrors);
    ``platform`` picks from an image index in a registry. The other arguments, and the
    errors raised, are those of ``blockindex.convert.convert``; a registry that cannot be
    reached or refuses raises ``fetcher.errors.FetchError``. Everything the arguments
    say is checked before any network request.
    """
    check_chunk_size(chunk_size)
    options = registry or RegistryOptions()
    pull_from = _source_ref(src)
    push_to = _destination_ref(dst)
    with contextlib.ExitStack() as cleanup:
        local_src = src
        if pull_from is not None:
            pulled = cleanup.enter_context(_temp_layout("lazyfs-pull-"))
            pull_image(pull_from, pulled, options, platform)
            local_src = f"oci:{pulled}:{PULLED_TAG}"
        local_dst = dst
        if push_to is not None:
            built = cleanup.enter_context(_temp_layout("lazyfs-push-"))
            local_dst = f"oci:{built}:{push_to.tag}"
        result = convert_local(local_src, local_dst, chunk_size=chunk_size, blob_limit=blob_limit,
                               prefetch_files=prefetch_files, max_entries=max_entries)
        pushed = None
        if push_to is not None:
            mount_from = None  # blobs the registry may link from the source, not upload again
            if pull_from is not None and pull_from.registry == push_to.registry:
                mount_from = pull_from.repository
            pushed = push_image(Layout(built), result.manifest_digest, push_to, options, mount_from)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return Converted(**fields, pushed=pushed)


def _source_ref(src: str) -> ImageRef | None:
    """The registry image ``src`` names; None for a local source (checked by the format)."""
    scheme = src.partition(":")[0]
    if scheme == "docker":
        if not src.startswith(REGISTRY):
            raise ImageError(f"{src}: expected docker://HOST/REPO[:TAG]")
        return _parse_ref(src)
    if scheme not in SCHEMES:
        raise ImageError(f"unknown source {src!r}: expected one of "
                         f"{', '.join(s + ':' for s in SCHEMES)}, {REGISTRY}")
    return None


def _destination_ref(dst: str) -> ImageRef | None:
    """The registry image ``dst`` names; None for an OCI layout on disk."""
    if not dst.startswith(REGISTRY):
        if not dst.startswith("oci:"):
            raise ImageError(f"unknown destination {dst!r}: "
                             f"expected oci:DIR[:TAG] or {REGISTRY}HOST/REPO:TAG")
        return None
    ref = _parse_ref(dst)
    if ref.tag is None or ref.digest is not None:
        raise ImageError(f"{dst}: a push destination needs a tag and no digest")
    return ref


def _parse_ref(text: str) -> ImageRef:
    try:
        return ImageRef.parse(text.removeprefix(REGISTRY))
    except ValueError as exc:
        raise ImageError(str(exc)) from None


@contextlib.contextmanager
def _temp_layout(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
