"""The merged tree a list of layers must give, computed from the entries themselves.

This is one of the test suite's two reference implementations of OCI whiteouts (the other,
``extract.py``, applies real tars to a real filesystem). It is an oracle: it shares no code
with ``blockindex`` (``tree.py``'s merge, ``ingest.py``), so a mistake there cannot also
hide here, and the two references check each other (``tests/test_imagegen.py``
materializes an image and compares it with this merge).
"""

from __future__ import annotations

import hashlib
import os
import stat

from .tarwriter import Entry
from .treecompare import KIND_BITS, Expected

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


def merge(layers: list[list[Entry]]) -> dict[bytes, Expected]:
    """Apply layers in order with OCI whiteout rules and return the merged tree."""
    tree: dict[bytes, Entry] = {}
    root_of: dict[bytes, Entry] = {}  # hard link name -> the regular entry holding its data

    def drop(path: bytes, *, keep_self: bool = False) -> None:
        prefix = path + b"/" if path else b""
        for p in [p for p in tree if p.startswith(prefix) or (p == path and not keep_self)]:
            del tree[p]
            root_of.pop(p, None)

    for layer in layers:
        for e in layer:  # whiteouts only hide what lower layers put there
            parent, _, base = e.path.rpartition(b"/")
            if base == OPAQUE_MARKER:
                drop(parent, keep_self=True)
            elif base.startswith(WHITEOUT_PREFIX):
                drop((parent + b"/" if parent else b"") + base[len(WHITEOUT_PREFIX):])
        by_path = {e.path: e for e in layer}
        for e in layer:
            if e.path.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX):
                continue
            old = tree.get(e.path)
            if old is not None and not (old.kind == "dir" and e.kind == "dir"):
                drop(e.path)
            tree[e.path] = e
            root_of.pop(e.path, None)
            if e.kind == "hardlink":
                tgt = by_path.get(e.target)
                if tgt is None or tgt.kind != "file":
                    raise ValueError(f"hard link {e.path!r} must point at a file in its layer")
                root_of[e.path] = tgt

    data_of = {p: root_of.get(p, e) for p, e in tree.items() if e.kind in ("file", "hardlink")}
    names_of: dict[int, list[bytes]] = {}
    for p, e in data_of.items():
        names_of.setdefault(id(e), []).append(p)
    subdirs: dict[bytes, int] = {}
    for p, e in tree.items():
        if e.kind == "dir":
            subdirs[p.rpartition(b"/")[0]] = subdirs.get(p.rpartition(b"/")[0], 0) + 1

    out: dict[bytes, Expected] = {}
    for p, e in tree.items():
        if p in data_of:
            d = data_of[p]
            names = sorted(names_of[id(d)])
            out[p] = Expected(
                kind="file", mode=stat.S_IFREG | d.perm, uid=d.uid, gid=d.gid,
                size=len(d.data), mtime_ns=d.mtime_ns, nlink=len(names),
                sha256=hashlib.sha256(d.data).hexdigest(), xattrs=dict(d.xattrs),
                link_group=names[0].decode("utf-8", "surrogateescape") if len(names) > 1
                else None)
            continue
        out[p] = Expected(
            kind=e.kind, mode=KIND_BITS[e.kind] | e.perm, uid=e.uid, gid=e.gid,
            size=len(e.target) if e.kind == "symlink" else 0, mtime_ns=e.mtime_ns,
            nlink=2 + subdirs.get(p, 0) if e.kind == "dir" else 1,
            rdev=os.makedev(*e.rdev) if e.kind in ("chr", "blk") else 0,
            target=e.target if e.kind == "symlink" else None, xattrs=dict(e.xattrs))
    return out
