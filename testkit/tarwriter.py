"""Writing test images' tars: PAX layer tars from a list of entries, the classic
``docker save`` archive around them, and bare ustar headers for when tarfile is too slow.

Everything is deterministic (fixed mtimes, sorted entries), so the same entries give the same
bytes, and the same digests, on every machine.

Tar details a converter must honour (the builders in ``imagegen.py`` produce each on purpose):
  - nanosecond mtimes live only in the PAX ``mtime`` record ("1700000000.123456789");
    tarfile's ``TarInfo.mtime`` is a float and loses them: parse ``pax_headers["mtime"]``
    (see ``pax_time_ns``);
  - xattrs are PAX ``SCHILY.xattr.<name>`` records; values are raw bytes, tarfile hands them
    back as str decoded with surrogateescape (``value.encode("utf-8", "surrogateescape")``);
  - a file name that is not UTF-8 is written with ``hdrcharset=BINARY``;
  - a docker-archive layer may be gzip-compressed although it is called ``layer.tar``, as
    ``docker load`` accepts: detect compression from the magic bytes, not the name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NS = 1_000_000_000
#: mtime of everything in layer 1 unless said otherwise (2023-11-14T22:13:20Z).
L1_MTIME_NS = 1_700_000_000 * NS


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One tar entry to write. kind adds 'hardlink' (target = path of the linked file)."""

    path: bytes
    kind: str
    perm: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = L1_MTIME_NS
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)


def _path_key(path: bytes) -> list[bytes]:
    return path.split(b"/")


def _pax_time(ns: int) -> str:
    secs, frac = divmod(ns, NS)
    return f"{secs}.{frac:09d}" if frac else str(secs)


def pax_time_ns(value: str) -> int:
    """Parse a PAX time record ("1700000000.123456789") to integer nanoseconds, exactly."""
    whole, _, frac = value.partition(".")
    if whole.startswith("-"):
        raise ValueError(f"negative PAX time not supported: {value!r}")
    return int(whole) * NS + int((frac + "000000000")[:9] or "0")


def tarinfo_of(e: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.path.decode("utf-8", "surrogateescape"))
    ti.mode = e.perm
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = e.mtime_ns // NS
    if e.mtime_ns % NS:
        ti.pax_headers["mtime"] = _pax_time(e.mtime_ns)
    for name, value in e.xattrs.items():
        key = "SCHILY.xattr." + name.decode("utf-8", "surrogateescape")
        ti.pax_headers[key] = value.decode("utf-8", "surrogateescape")
    if e.kind == "file":
        ti.type, ti.size = tarfile.REGTYPE, len(e.data)
    elif e.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        ti.type, ti.linkname = tarfile.SYMTYPE, e.target.decode("utf-8", "surrogateescape")
    elif e.kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, e.target.decode("utf-8", "surrogateescape")
    elif e.kind in ("chr", "blk"):
        ti.type = tarfile.CHRTYPE if e.kind == "chr" else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = e.rdev
    elif e.kind == "fifo":
        ti.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"unknown entry kind {e.kind!r}")
    return ti


def write_tar(entries: Iterable[Entry]) -> bytes:
    """A PAX tar of entries, sorted so that parents come before children."""
    ordered = sorted(entries, key=lambda e: _path_key(e.path))
    seen: set[bytes] = set()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for e in ordered:
            if e.kind == "hardlink" and e.target not in seen:
                raise ValueError(f"hard link {e.path!r} precedes its target {e.target!r}")
            seen.add(e.path)
            ti = tarinfo_of(e)
            tf.addfile(ti, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def write_docker_archive(out: Path, layer_tars: list[bytes], *, gzip_layers: set[int],
                         repo_tag: str, created: str = "2023-11-14T22:13:20Z") -> None:
    """Write the classic `docker save` layout: <v1id>/{VERSION,json,layer.tar}, <config>.json,
    manifest.json, repositories. Layers in gzip_layers are stored gzip-compressed (mtime 0)."""
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layer_tars]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": f"lazyfs imagegen layer {i + 1}"}
                    for i in range(len(layer_tars))],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"

    members: list[tuple[str, bytes]] = [(config_name, config_bytes)]
    layer_names: list[str] = []
    parent = ""
    for i, layer in enumerate(layer_tars):
        # docker's v1 ids chain the diff ids; any stable unique hex works for a reader.
        v1id = hashlib.sha256((parent + " " + diff_ids[i]).encode()).hexdigest()
        blob = gzip.compress(layer, compresslevel=6, mtime=0) if i in gzip_layers else layer
        v1json = {"id": v1id, "created": created, "os": "linux"}
        if parent:
            v1json["parent"] = parent
        members += [(f"{v1id}/", b""), (f"{v1id}/VERSION", b"1.0"),
                    (f"{v1id}/json", json.dumps(v1json, sort_keys=True).encode()),
                    (f"{v1id}/layer.tar", blob)]
        layer_names.append(f"{v1id}/layer.tar")
        parent = v1id
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    repo, _, tag = repo_tag.rpartition(":")
    members.append(("manifest.json", json.dumps(manifest).encode()))
    members.append(("repositories", json.dumps({repo: {tag: parent}}).encode()))

    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime = L1_MTIME_NS // NS
            if name.endswith("/"):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)


def ustar_header(name: str, *, size: int, mode: int, mtime: int, typeflag: bytes) -> bytes:
    """One POSIX ustar header block for a short ASCII name, uid/gid 0 (what tarfile writes,
    ten times faster: tarfile's TarInfo.tobuf dominates generating 50,000 entries)."""
    def octal(value: int, width: int) -> bytes:
        return b"%0*o\0" % (width - 1, value)

    hdr = b"".join([
        name.encode("ascii").ljust(100, b"\0"), octal(mode, 8), octal(0, 8), octal(0, 8),
        octal(size, 12), octal(mtime, 12), b" " * 8, typeflag, b"\0" * 100,
        b"ustar\x0000", b"\0" * 32, b"\0" * 32, octal(0, 8), octal(0, 8), b"\0" * 155,
        b"\0" * 12])
    checksum = b"%06o\0 " % sum(hdr)
    return hdr[:148] + checksum + hdr[156:]
