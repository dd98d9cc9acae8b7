"""Writing eStargz layers for tests, from the spec (stargz-snapshotter's ``docs/estargz.md``),
independently of ``blockindex.estargz``, which reads them.

    layer = write_estargz(entries, chunk_size=64 << 10)   # -> EstargzBlob
    layer = write_estargz(entries_of_dir(rootfs))          # a root filesystem directory
    push_estargz(registry, tmp, [layer1, layer2], "app:1")

The blob is a gzip-compatible tar, cut into gzip members where the spec puts them: at the
start of the stream, at the start of each non-empty regular file's content and every
``chunk_size`` bytes of it, at the TOC's tar header; then the 51-byte footer. The TOC lists
every entry (directories named with a trailing ``/``, modes with their type bits, as Go's
tar headers have them; xattr values in base64), each chunk with its ``chunkDigest``. Layers
without the TOC-digest annotation (``annotate=False``) are plain gzip layers to a reader
that does not know eStargz, as they are to every reader.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import os
import stat
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from blockindex.oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Layout

from .registryd import Registry
from .tarwriter import NS, Entry, _path_key, tarinfo_of

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_KIND = {"file": "reg", "dir": "dir", "symlink": "symlink", "hardlink": "hardlink",
         "chr": "char", "blk": "block", "fifo": "fifo"}
_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
              "hardlink": stat.S_IFREG, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@dataclasses.dataclass(frozen=True)
class EstargzBlob:
    blob: bytes
    toc: bytes  # the TOC's JSON
    toc_digest: str  # its sha256, the layer's annotation
    diff_id: str  # sha256 of the uncompressed tar
    toc_offset: int


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def footer(toc_offset: int) -> bytes:
    """An empty gzip member whose extra field's subfield SG holds ``%016xSTARGZ``."""
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016xSTARGZ" % toc_offset
    head = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + len(extra).to_bytes(2, "little") + extra
    return head + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def write_estargz(entries: Sequence[Entry], *, chunk_size: int = 64 << 10, landmark: bool = True,
                  edit_toc: Callable[[dict], None] | None = None) -> EstargzBlob:
    """One eStargz layer of ``entries`` (sorted, parents first, as ``write_tar`` sorts
    them). ``landmark`` adds ``.no.prefetch.landmark``; ``edit_toc`` may change the TOC
    before it is written (its digest is of what is written)."""
    ordered = sorted(entries, key=lambda e: _path_key(e.path))
    if landmark:
        ordered.insert(0, Entry(path=b".no.prefetch.landmark", kind="file", perm=0o644, data=b"\x0f"))
    tar = bytearray()
    cuts = [0]  # where a gzip member starts in the uncompressed stream
    toc_entries: list[dict] = []
    chunks: list[tuple[dict, int]] = []  # TOC entries of chunks, and where each starts
    for e in ordered:
        ti = tarinfo_of(e)
        tar += ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        toc_entries.append(_toc_entry(e))
        if e.kind == "file" and e.data:
            toc_entries[-1]["digest"] = _sha(e.data)
            for at in range(0, len(e.data), chunk_size):
                piece = e.data[at : at + chunk_size]
                ent = toc_entries[-1] if at == 0 else {"name": toc_entries[-1]["name"], "type": "chunk",
                                                       "chunkOffset": at}
                ent["chunkSize"] = len(piece) if at + chunk_size < len(e.data) else 0
                ent["chunkDigest"] = _sha(piece)
                if at:
                    toc_entries.append(ent)
                cuts.append(len(tar))
                chunks.append((ent, len(tar)))
                tar += piece
            tar += b"\0" * (-len(e.data) % tarfile.BLOCKSIZE)
    blob = bytearray()
    member_at: dict[int, int] = {}
    for start, end in zip(cuts, [*cuts[1:], len(tar)], strict=True):
        member_at[start] = len(blob)
        if end > start or start == 0:
            blob += gzip.compress(bytes(tar[start:end]), mtime=0)
    for ent, start in chunks:
        ent["offset"] = member_at[start]
    toc = {"version": 1, "entries": toc_entries}
    if edit_toc is not None:
        edit_toc(toc)
    toc_json = json.dumps(toc, indent="\t").encode()
    toc_info = tarfile.TarInfo("stargz.index.json")
    toc_info.size, toc_info.mode = len(toc_json), 0o644
    toc_tar = (toc_info.tobuf(tarfile.GNU_FORMAT) + toc_json + b"\0" * (-len(toc_json) % tarfile.BLOCKSIZE)
               + b"\0" * (2 * tarfile.BLOCKSIZE))
    toc_offset = len(blob)
    blob += gzip.compress(toc_tar, mtime=0) + footer(toc_offset)
    return EstargzBlob(bytes(blob), toc_json, _sha(toc_json), _sha(bytes(tar) + toc_tar), toc_offset)


def entries_of_dir(root: Path) -> list[Entry]:
    """The entries of a root filesystem directory (not following symlinks; a file's second
    name a hard link to its first in path order; sockets left out), with their modes,
    owners and whole-second mtimes."""
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chr",
             stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}
    broot = os.fsencode(root)
    found = [os.path.relpath(os.path.join(d, n), broot) for d, dirs, files in os.walk(broot)
             for n in dirs + files]
    out: list[Entry] = []
    first: dict[tuple[int, int], bytes] = {}
    for rel in sorted(found, key=_path_key):
        path = os.path.join(broot, rel)
        st = os.lstat(path)
        kind = kinds.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            continue
        e = Entry(path=rel, kind=kind, perm=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                  mtime_ns=st.st_mtime_ns // NS * NS)
        if kind == "file" and st.st_nlink > 1 and (st.st_dev, st.st_ino) in first:
            e = dataclasses.replace(e, kind="hardlink", target=first[(st.st_dev, st.st_ino)])
        elif kind == "file":
            first[(st.st_dev, st.st_ino)] = rel
            with open(path, "rb") as f:
                e = dataclasses.replace(e, data=f.read())
        elif kind == "symlink":
            e = dataclasses.replace(e, target=os.readlink(path))
        elif kind in ("chr", "blk"):
            e = dataclasses.replace(e, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        out.append(e)
    return out


def _toc_entry(e: Entry) -> dict:
    name = e.path.decode("utf-8", "surrogateescape") + ("/" if e.kind == "dir" else "")
    ent: dict = {"name": name, "type": _KIND[e.kind], "mode": _TYPE_BITS[e.kind] | e.perm,
                 "uid": e.uid, "gid": e.gid,
                 "modtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.mtime_ns // NS))}
    if e.kind == "file":
        ent["size"] = len(e.data)
    if e.kind in ("symlink", "hardlink"):
        ent["linkName"] = e.target.decode("utf-8", "surrogateescape")
    if e.kind in ("chr", "blk"):
        ent["devMajor"], ent["devMinor"] = e.rdev
    if e.xattrs:
        ent["xattrs"] = {k.decode("utf-8", "surrogateescape"): base64.b64encode(v).decode()
                         for k, v in e.xattrs.items()}
    return ent


def write_layout(root: Path, layers: Sequence[EstargzBlob], *,
                 annotate: Sequence[bool] | bool = True) -> Path:
    """An OCI layout at ``root`` holding one image of ``layers``, tagged ``1``; each layer
    annotated with its TOC digest where ``annotate`` says."""
    marks = [annotate] * len(layers) if isinstance(annotate, bool) else list(annotate)
    layout = Layout(root)
    layout.init()
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}}
    descs = []
    for layer, mark in zip(layers, marks, strict=True):
        desc = layout.write_blob(layer.blob, LAYER_MEDIA_TYPE)
        if mark:
            desc["annotations"] = {TOC_DIGEST_ANNOTATION: layer.toc_digest}
        descs.append(desc)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": layout.write_blob(json.dumps(config).encode(), MEDIA_TYPE_OCI_CONFIG),
                "layers": descs}
    layout.tag(layout.write_blob(json.dumps(manifest).encode(), MEDIA_TYPE_OCI_MANIFEST), "1")
    return root


def push_estargz(registry: Registry, tmp: Path, layers: Sequence[EstargzBlob], repo_tag: str, *,
                 annotate: Sequence[bool] | bool = True) -> None:
    """Push an image of ``layers`` to ``registry`` as ``repo_tag`` (skopeo keeps the
    manifest, and so the annotations, as written)."""
    root = write_layout(tmp / f"estargz-{repo_tag.replace(':', '-').replace('/', '-')}", layers,
                        annotate=annotate)
    registry.skopeo_copy(f"oci:{root}:1", repo_tag)

