"""eStargz layers: the footer, the table of contents, and the entries it lists.

An eStargz layer (stargz-snapshotter's ``docs/estargz.md``) is an ordinary tar.gz made of
many gzip members: each non-empty regular file's content starts a member of its own (a
large one is cut into several, its chunks), and the last two members are the TOC (the tar
entry ``stargz.index.json``, JSON) and a 51-byte footer, an empty member whose gzip extra
field says where the TOC starts (subfield ``SG``: ``"%016xSTARGZ"``). The manifest names
the TOC's sha256 in the layer's annotation ``TOC_DIGEST_ANNOTATION``, and the TOC each
chunk's sha256 (``chunkDigest``): every byte a mount serves is checked against the
manifest, as stargz-snapshotter checks it.

    is_estargz_image(manifest)                      # every layer names its TOC's digest
    offset = toc_offset(footer, blob_size)          # the blob's last FOOTER_SIZE bytes
    toc = toc_json(member)                          # the blob from ``offset`` to the footer
    layer = parse_toc(toc, toc_offset=offset)       # -> TocLayer: entries and chunks

What lazyfs does not take (``UnsupportedImageError``): a chunk without ``chunkDigest`` (a
plain stargz layer: nothing to check its bytes against), and chunks that share a member
(``innerOffset``, written with ``--estargz-min-chunk-size``).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import datetime
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Mapping
from typing import Any

from .errors import ImageError, UnsafeImageError, UnsupportedImageError
from .ingest import (
    MAX_FILE_SIZE,
    MAX_ID,
    MAX_MAJOR,
    MAX_MINOR,
    MAX_MTIME_NS,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    symlink_target,
)
from .tree import NO_XATTRS

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
"""The layer annotation that names the sha256 of its TOC's JSON: what marks an eStargz layer."""
TOC_NAME = "stargz.index.json"
FOOTER_SIZE = 51
MAX_TOC = 256 << 20
"""The largest TOC JSON read (about 300 bytes an entry: some 800,000 entries)."""
KINDS = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo"})
LANDMARKS = (b".prefetch.landmark", b".no.prefetch.landmark")
"""Regular files at a layer's root that mark where its prioritised files end; not shown."""
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


@dataclasses.dataclass(frozen=True, slots=True)
class TocChunk:
    """One chunk of a regular file: it starts the gzip member at ``offset`` in the blob,
    whose range runs to ``end`` (the next member the TOC names, or the TOC itself)."""

    offset: int
    end: int
    chunk_offset: int  # in the file
    size: int
    digest: bytes  # sha256 of its bytes, raw


@dataclasses.dataclass(slots=True)
class TocEntry:
    """One file of the layer as its TOC describes it (``kind`` one of ``KINDS``)."""

    name: bytes
    kind: str
    mode: int  # permission bits with setuid, setgid, sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    link: bytes = b""  # symlink target, or the path a hard link names
    rdev: int = 0
    xattrs: Mapping[bytes, bytes] = dataclasses.field(default_factory=lambda: NO_XATTRS)
    chunks: list[TocChunk] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class TocLayer:
    entries: list[TocEntry]
    prefetch: list[bytes]
    """Names of the regular files before the layer's ``.prefetch.landmark``, in order."""


def is_estargz_image(manifest: dict[str, Any]) -> bool:
    """Whether every layer of ``manifest`` names its TOC's digest (``TOC_DIGEST_ANNOTATION``):
    an image a mount reads by its TOCs. With one layer that does not, it is not one."""
    layers = manifest.get("layers")
    return isinstance(layers, list) and bool(layers) and all(
        isinstance(d, dict) and isinstance(d.get("annotations"), dict)
        and _SHA256.fullmatch(str(d["annotations"].get(TOC_DIGEST_ANNOTATION, ""))) is not None
        for d in layers)


def toc_offset(footer: bytes, blob_size: int) -> int:
    """Where the TOC member starts, from the blob's last ``FOOTER_SIZE`` bytes; ImageError if
    they are not an eStargz footer or point outside the blob."""
    if (len(footer) != FOOTER_SIZE or footer[:3] != b"\x1f\x8b\x08" or not footer[3] & 4
            or footer[10:16] != b"\x1a\x00SG\x16\x00" or footer[32:38] != b"STARGZ"):
        raise ImageError("no eStargz footer at the end of the layer")
    try:
        offset = int(footer[16:32].decode("ascii"), 16)
    except ValueError:
        raise ImageError("an eStargz footer whose TOC offset is not hex") from None
    if not 0 <= offset < blob_size - FOOTER_SIZE:
        raise ImageError(f"an eStargz footer that puts the TOC at {offset}, outside the layer")
    return offset


def toc_json(member: bytes) -> bytes:
    """The JSON of the TOC from its gzip member (a tar entry ``stargz.index.json``);
    ImageError if the member holds no such entry or a larger one than ``MAX_TOC``."""
    d = zlib.decompressobj(wbits=31)
    try:
        tar = d.decompress(member, MAX_TOC + (64 << 10))
    except zlib.error as exc:
        raise ImageError(f"the eStargz TOC does not inflate ({exc})") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
            ti = tf.next()
            if ti is None or ti.name != TOC_NAME or not ti.isreg():
                raise ImageError(f"the eStargz TOC member holds no {TOC_NAME}")
            if ti.size > MAX_TOC:
                raise UnsupportedImageError(f"an eStargz TOC of {ti.size} bytes (at most {MAX_TOC})")
            f = tf.extractfile(ti)
            assert f is not None
            data = f.read()
    except (tarfile.TarError, EOFError) as exc:
        raise ImageError(f"the eStargz TOC member is not a tar ({exc})") from None
    if len(data) != ti.size:
        raise ImageError("the eStargz TOC member is truncated")
    return data


def parse_toc(data: bytes, *, toc_offset: int) -> TocLayer:
    """The entries of a TOC (already checked against its digest), each chunk with its
    range in the blob; ImageError (or Unsafe/Unsupported) for one lazyfs cannot mount."""
    try:
        toc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"the eStargz TOC is not JSON ({exc})") from None
    raw = toc.get("entries") if isinstance(toc, dict) else None
    if not isinstance(toc, dict) or toc.get("version") != 1 or not isinstance(raw, list):
        raise ImageError("the eStargz TOC is not version 1 with a list of entries")
    entries: list[TocEntry] = []
    prefetch: list[bytes] = []
    landmark = False
    starts: list[tuple[int, int, int, bytes]] = []  # per chunk: offset, chunk offset, size, digest
    for e in raw:
        if not isinstance(e, dict):
            raise ImageError("an eStargz TOC entry that is not an object")
        name = _name(e)
        if e.get("type") == "chunk":
            if not entries or entries[-1].kind != "reg" or entries[-1].name != name:
                raise ImageError(f"eStargz chunk of {name!r} does not follow its file")
            starts.append(_chunk(e, entries[-1], toc_offset))
            continue
        if starts:
            _close_file(entries[-1], starts)
        entry = _entry(e, name)
        entries.append(entry)
        if entry.kind == "reg" and entry.size:
            starts.append(_chunk(e, entry, toc_offset))
        if entry.name.strip(b"/") == LANDMARKS[0]:
            landmark = True
        elif entry.kind == "reg" and not landmark:
            prefetch.append(entry.name)
    if starts:
        _close_file(entries[-1], starts)
    _set_ends(entries, toc_offset)
    return TocLayer(entries, prefetch if landmark else [])


def _name(e: dict[str, Any]) -> bytes:
    name = e.get("name")
    if not isinstance(name, str) or not name:
        raise ImageError("an eStargz TOC entry without a name")
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise UnsafeImageError(f"entry {raw!r} has a NUL byte in its name")
    return raw


def _int(e: dict[str, Any], key: str, hi: int, default: int = 0) -> int:
    value = e.get(key, default)
    if type(value) is not int or not 0 <= value <= hi:
        raise UnsafeImageError(f"eStargz entry {e.get('name')!r}: {key} {str(value)[:40]!r} is impossible")
    return value


def _entry(e: dict[str, Any], name: bytes) -> TocEntry:
    kind = e.get("type")
    if kind not in KINDS:
        raise UnsupportedImageError(f"eStargz entry {name!r} of type {str(kind)[:20]!r}")
    entry = TocEntry(name, str(kind), _int(e, "mode", 0o7777777) & 0o7777,
                     uid=_int(e, "uid", MAX_ID), gid=_int(e, "gid", MAX_ID),
                     mtime_ns=_mtime_ns(e, name), xattrs=_xattrs(e, name))
    if kind == "reg":
        entry.size = _int(e, "size", MAX_FILE_SIZE)
    elif kind in ("symlink", "hardlink"):
        link = e.get("linkName")
        if not isinstance(link, str):
            raise ImageError(f"eStargz {kind} {name!r} without a linkName")
        entry.link = link.encode("utf-8", "surrogateescape")
        if kind == "symlink":
            entry.link = symlink_target(name, entry.link)
    elif kind in ("char", "block"):
        entry.rdev = os.makedev(_int(e, "devMajor", MAX_MAJOR), _int(e, "devMinor", MAX_MINOR))
    return entry


def _chunk(e: dict[str, Any], file: TocEntry, toc_offset: int) -> tuple[int, int, int, bytes]:
    """``(offset, chunk offset, size, digest)`` of the chunk entry ``e`` of ``file``."""
    if e.get("innerOffset", 0) != 0:
        raise UnsupportedImageError(f"eStargz file {file.name!r} shares a gzip member with others "
                                    "(innerOffset; written with a minimum chunk size)")
    offset = _int(e, "offset", toc_offset - 1, default=-1)
    at = _int(e, "chunkOffset", MAX_FILE_SIZE)
    size = _int(e, "chunkSize", MAX_FILE_SIZE) or file.size - at
    digest = e.get("chunkDigest")
    m = _SHA256.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise UnsupportedImageError(f"eStargz file {file.name!r} has a chunk without a sha256 "
                                    "chunkDigest (a stargz layer, not eStargz: nothing to check it by)")
    return offset, at, size, bytes.fromhex(m[1])


def _close_file(file: TocEntry, starts: list[tuple[int, int, int, bytes]]) -> None:
    """Give ``file`` its chunks (ends set later), checked to cover it exactly, in order."""
    at = 0
    for offset, chunk_offset, size, digest in starts:
        if chunk_offset != at or size <= 0:
            raise ImageError(f"eStargz file {file.name!r}: a chunk at {chunk_offset} of {size} "
                             f"bytes where {at} was expected")
        file.chunks.append(TocChunk(offset, 0, chunk_offset, size, digest))
        at += size
    if at != file.size:
        raise ImageError(f"eStargz file {file.name!r}: chunks of {at} bytes for a file of {file.size}")
    starts.clear()


def _set_ends(entries: list[TocEntry], toc_offset: int) -> None:
    """Each chunk's range: from its member to the next member the TOC names."""
    offsets = sorted({c.offset for e in entries for c in e.chunks} | {toc_offset})
    for e in entries:
        e.chunks = [dataclasses.replace(c, end=offsets[bisect.bisect_right(offsets, c.offset)])
                    for c in e.chunks]


def _mtime_ns(e: dict[str, Any], name: bytes) -> int:
    text = e.get("modtime", "")
    if text == "":
        return 0
    try:
        when = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ImageError(f"eStargz entry {name!r}: modtime {str(text)[:40]!r} is not RFC 3339") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    ns = (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if not -MAX_MTIME_NS <= ns <= MAX_MTIME_NS:
        raise UnsafeImageError(f"eStargz entry {name!r} has an impossible modtime {text[:40]!r}")
    return ns


def _xattrs(e: dict[str, Any], name: bytes) -> Mapping[bytes, bytes]:
    """Values are base64 (Go's JSON of ``[]byte``)."""
    raw = e.get("xattrs")
    if not raw:
        return NO_XATTRS
    if not isinstance(raw, dict):
        raise ImageError(f"eStargz entry {name!r}: xattrs that are not an object")
    out: dict[bytes, bytes] = {}
    for key, value in raw.items():
        try:
            out[key.encode("utf-8", "surrogateescape")] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"eStargz entry {name!r}: xattr {key[:64]!r} is not base64") from None
    for xname, xvalue in out.items():
        if not xname or b"\0" in xname or len(xname) > MAX_XATTR_NAME or len(xvalue) > MAX_XATTR_VALUE:
            raise UnsafeImageError(f"eStargz entry {name!r}: an impossible xattr {xname[:64]!r}")
    return out
