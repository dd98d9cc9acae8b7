"""What a mounted tree must look like (``Expected``, one per path) and the checker that
walks a real directory and lists every difference from it (``compare_tree``)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: xattrs compare_tree looks at; anything else (selinux labels, ACLs, ...) is the kernel's.
_COMPARED_XATTR_PREFIXES = (b"user.",)
_COMPARED_XATTR_NAMES = (b"security.capability",)

KIND_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True, kw_only=True)
class Expected:
    """What one path of the merged tree must look like (the fields of ``os.lstat`` and more).

    kind: 'file', 'dir', 'symlink', 'chr', 'blk' or 'fifo'. Hard-linked files are 'file'
      with the same ``link_group``.
    mode: the full st_mode, type bits included (``stat.S_IFREG | 0o4755``).
    size: st_size; ignored for directories (filesystem dependent), len(target) for symlinks.
    mtime_ns: st_mtime_ns.
    nlink: st_nlink, or None to not check it. Files: number of names of the inode in the
      merged tree; directories: 2 + number of subdirectories (what ext4 and tmpfs report).
    rdev: st_rdev for 'chr' and 'blk' (``os.makedev(major, minor)``), else 0.
    target: the symlink target, bytes, for 'symlink'.
    sha256: hex digest of the content, for 'file'.
    xattrs: every ``user.*`` and ``security.capability`` attribute, name -> value.
    link_group: files sharing a group id must share st_ino; files outside it must not.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int | None
    rdev: int = 0
    target: bytes | None = None
    sha256: str | None = None
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)
    link_group: str | None = None


def sha256_file(path: bytes | str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _kind_of(mode: int) -> str:
    for kind, bits in KIND_BITS.items():
        if stat.S_IFMT(mode) == bits:
            return kind
    return f"unknown({stat.S_IFMT(mode):o})"


def _compared_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # ENOTSUP and friends: no xattrs at all
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        bname = os.fsencode(name)
        if bname.startswith(_COMPARED_XATTR_PREFIXES) or bname in _COMPARED_XATTR_NAMES:
            out[bname] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _walk(root: bytes) -> dict[bytes, os.stat_result]:
    found: dict[bytes, os.stat_result] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        for name in os.listdir(root + b"/" + rel if rel else root):
            child = rel + b"/" + name if rel else name
            st = os.lstat(root + b"/" + child)
            found[child] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
    return found


def _show(path: bytes) -> str:
    return repr(path)[2:-1] or "/"


def compare_tree(root: Path, expected: Mapping[bytes, Expected]) -> list[str]:
    """Walk the tree at root (with lstat, never following symlinks) and return one readable
    line per difference from expected; an empty list means equal.

    Checked: missing and extra paths; type and permission bits (st_mode), st_uid, st_gid,
    st_size (not for directories), st_mtime_ns, st_nlink (unless Expected.nlink is None),
    st_rdev of devices, symlink targets, user.* and security.capability xattrs, the sha256 of
    every regular file's content, and that hard-link groups share st_ino while all other
    files have their own."""
    rootb = os.fsencode(root)
    diffs: list[str] = []
    actual = _walk(rootb)
    if b"" in expected:
        actual[b""] = os.lstat(rootb)
    for p in sorted(set(expected) - set(actual)):
        diffs.append(f"{_show(p)}: missing")
    for p in sorted(set(actual) - set(expected)):
        diffs.append(f"{_show(p)}: unexpected {_kind_of(actual[p].st_mode)}")

    inode_names: dict[int, list[bytes]] = {}
    for p in sorted(set(expected) & set(actual)):
        exp, st = expected[p], actual[p]
        full = rootb + b"/" + p if p else rootb
        where = _show(p)
        if st.st_mode != exp.mode:
            diffs.append(f"{where}: st_mode {st.st_mode:o} ({_kind_of(st.st_mode)}), "
                         f"expected {exp.mode:o} ({exp.kind})")
        if _kind_of(st.st_mode) != exp.kind:
            continue  # nothing else is comparable
        for fld, want in (("st_uid", exp.uid), ("st_gid", exp.gid),
                          ("st_mtime_ns", exp.mtime_ns)):
            if getattr(st, fld) != want:
                diffs.append(f"{where}: {fld} {getattr(st, fld)}, expected {want}")
        if exp.kind != "dir" and st.st_size != exp.size:
            diffs.append(f"{where}: st_size {st.st_size}, expected {exp.size}")
        if exp.nlink is not None and st.st_nlink != exp.nlink:
            diffs.append(f"{where}: st_nlink {st.st_nlink}, expected {exp.nlink}")
        if exp.kind in ("chr", "blk") and st.st_rdev != exp.rdev:
            diffs.append(f"{where}: st_rdev {os.major(st.st_rdev)},{os.minor(st.st_rdev)}, "
                         f"expected {os.major(exp.rdev)},{os.minor(exp.rdev)}")
        if exp.kind == "symlink":
            target = os.readlink(full)
            if target != exp.target:
                diffs.append(f"{where}: symlink target {target!r}, expected {exp.target!r}")
        got_x = _compared_xattrs(full)
        want_x = dict(exp.xattrs)
        for name in sorted(set(got_x) | set(want_x)):
            if name not in got_x:
                diffs.append(f"{where}: xattr {_show(name)} missing")
            elif name not in want_x:
                diffs.append(f"{where}: unexpected xattr {_show(name)}={got_x[name]!r}")
            elif got_x[name] != want_x[name]:
                diffs.append(f"{where}: xattr {_show(name)}={got_x[name]!r}, "
                             f"expected {want_x[name]!r}")
        if exp.kind == "file":
            inode_names.setdefault(st.st_ino, []).append(p)
            if exp.sha256 is not None:
                try:
                    digest = sha256_file(full)
                except OSError as exc:
                    diffs.append(f"{where}: cannot read: {exc}")
                else:
                    if digest != exp.sha256:
                        diffs.append(f"{where}: content sha256 {digest}, "
                                     f"expected {exp.sha256}")

    # hard links: one group <-> one inode
    group_inodes: dict[str, set[int]] = {}
    for ino, names in inode_names.items():
        for n in names:
            g = expected[n].link_group
            if g is not None:
                group_inodes.setdefault(g, set()).add(ino)
        groups = {expected[n].link_group for n in names}
        if len(names) > 1 and (None in groups or len(groups) > 1):
            diffs.append("share an inode but are not one hard-link group: "
                         + ", ".join(_show(n) for n in names))
    for g, inos in sorted(group_inodes.items()):
        if len(inos) > 1:
            diffs.append(f"hard-link group {g}: members have {len(inos)} different inodes")
    return diffs


def replace_expected(expected: Mapping[bytes, Expected], path: bytes,
                     **changes: object) -> dict[bytes, Expected]:
    """A copy of expected with one entry changed (for tests of the checker)."""
    out = dict(expected)
    out[path] = dataclasses.replace(out[path], **changes)  # type: ignore[arg-type]
    return out
