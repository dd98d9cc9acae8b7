"""Property and fuzz tests of the tar reader (ingest) and the merge (tree) with hostile layers.

Arbitrary sequences of tar members (names with ``..``, absolute paths, empty and ``.``
components, whiteouts, symlinks and hard links pointing anywhere, devices, fifos,
duplicates, odd modes) are written as layers and converted. Either the conversion fails
with ``ImageError`` (the converter's documented error) and a flat reference model of
docker's layer semantics says the image is bad too, or it succeeds and every path of the
result, its type, mode bits, content, symlink target, device number and hard-link
identity equal the model's. Nothing is ever written outside the output layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import os
import signal
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from blockindex.convert import convert
from blockindex.errors import ImageError
from blockindex.format import ROOT_INO, InodeT

from .imagekit import Image, entry, make_tar, oci_layout

CS = 4096
RANDOM = bytes((i * 7919 + 13) % 251 for i in range(2 * CS + 7))  # fixed, not compressible
DATA = [b"", b"x", b"hello", bytes(CS), bytes(CS) + b"z", RANDOM]
# Weighted: mostly plain names, so most images are accepted and compared with the model.
PARTS = ["a"] * 6 + ["b"] * 6 + ["c"] * 3 + ["..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq"]
TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]
HANG = 120  # seconds: only catches a hang, a conversion here takes milliseconds


@contextlib.contextmanager
def no_hang(seconds: int = HANG) -> Iterator[None]:
    """One example's own limit (hypothesis replays a failing example while shrinking: the
    test's limit would be spent by then). It borrows the SIGALRM timer of pytest-timeout's
    limit for the test, and gives back what is left of it."""
    def fail(*_: object) -> None:
        raise AssertionError(f"no answer in {seconds} s: a hang")

    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


@contextlib.contextmanager
def sandbox() -> Iterator[tuple[Path, Path]]:
    """A fresh directory holding ``src/`` and ``out/``, with the process's temp dir and
    working directory pointed at an empty sentinel; on exit, checks that the conversion
    left nothing beside ``out/`` and nothing in the sentinel."""
    saved_tmp, saved_cwd = tempfile.tempdir, os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as top:
        root = Path(top)
        (root / "src").mkdir()
        sentinel = root / "sentinel"
        sentinel.mkdir()
        tempfile.tempdir = str(sentinel)
        os.chdir(sentinel)
        try:
            yield root / "src", root / "out"
        finally:
            tempfile.tempdir = saved_tmp
            os.chdir(saved_cwd)
        assert sorted(p.name for p in root.iterdir()) in (
            ["sentinel", "src"], ["out", "sentinel", "src"])
        assert list(sentinel.iterdir()) == []
        if (root / "out").exists():
            assert not [p for p in (root / "out").iterdir() if p.name.startswith(".convert-")]


def convert_layers(src: Path, out: Path, layers: list[bytes]) -> Image | None:
    """Convert; the image, or None if the converter refused it (ImageError)."""
    if len(layers) == 1:
        (src / "layer.tar").write_bytes(layers[0])
        ref = f"tar:{src / 'layer.tar'}"
    else:
        lay, mdesc = oci_layout(src / "oci", layers)
        lay.tag(mdesc, "latest")
        ref = f"oci:{src / 'oci'}"
    try:
        with no_hang():
            res = convert(ref, f"oci:{out}", chunk_size=CS)
    except ImageError:
        return None
    return Image(out, res.index_digest)


# -- the reference: docker's layer semantics over a flat map of paths ---------------------


class Refused(Exception):
    pass


@dataclasses.dataclass(eq=False)
class RefNode:
    kind: int  # stat.S_IFxxx
    perm: int
    data: bytes = b""
    target: bytes = b""
    rdev: int = 0


def norm(name: str) -> tuple[str, ...]:
    out: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not out:
                raise Refused("climbs out")
            out.pop()
        else:
            out.append(p)
    return tuple(out)


class Reference:
    def __init__(self) -> None:
        self.nodes: dict[tuple[str, ...], RefNode] = {(): RefNode(stat.S_IFDIR, 0o755)}
        self.layer_of: dict[tuple[str, ...], int] = {}
        self.layer = 0

    def _under(self, p: tuple[str, ...]) -> list[tuple[str, ...]]:
        return [q for q in self.nodes if len(q) > len(p) and q[: len(p)] == p]

    def _remove(self, p: tuple[str, ...]) -> None:
        for q in [p, *self._under(p)]:
            self.nodes.pop(q, None)
            self.layer_of.pop(q, None)

    def _get(self, p: tuple[str, ...]) -> RefNode | None:
        for i in range(len(p)):  # every proper prefix must be a directory
            n = self.nodes.get(p[:i])
            if n is None or n.kind != stat.S_IFDIR:
                return None
        return self.nodes.get(p)

    def _add(self, p: tuple[str, ...], node: RefNode) -> None:
        for i in range(1, len(p)):
            n = self.nodes.get(p[:i])
            if n is None:
                self.nodes[p[:i]] = RefNode(stat.S_IFDIR, 0o755)
                self.layer_of[p[:i]] = self.layer
            elif n.kind != stat.S_IFDIR:
                raise Refused("under a non-directory")
        old = self.nodes.get(p)
        if old is not None and old.kind == node.kind == stat.S_IFDIR:
            old.perm = node.perm
        else:
            self._remove(p)
            self.nodes[p] = node
        self.layer_of[p] = self.layer

    def apply(self, ti: tarfile.TarInfo, data: bytes) -> None:
        p = norm(ti.name)
        if p and p[-1].startswith(".wh."):
            parent, wh = p[:-1], p[-1]
            if wh == ".wh..wh..opq":
                d = self._get(parent)
                if d is None:
                    self._add(parent, RefNode(stat.S_IFDIR, 0o755)) if parent else None
                    return
                for q in self._under(parent):
                    if q in self.nodes and any(
                        self.layer_of[q[:i]] < self.layer for i in range(len(parent) + 1, len(q) + 1)
                    ):
                        self._remove(q)
                return
            d, name = self._get(parent), wh[len(".wh."):]
            q = (*parent, name)
            if d is not None and d.kind == stat.S_IFDIR and q in self.nodes \
                    and self.layer_of[q] < self.layer:
                self._remove(q)
            return
        if ti.islnk():
            if not p:
                raise Refused("hard link at the root")
            t = norm(ti.linkname)
            target = self._get(t)
            if target is None or target.kind == stat.S_IFDIR:
                raise Refused("hard link to nothing or a directory")
            if t != p:
                self._add(p, target)
            return
        kind = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
                tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                tarfile.FIFOTYPE: stat.S_IFIFO}.get(ti.type, stat.S_IFREG)
        if not p:
            if kind != stat.S_IFDIR:
                raise Refused("root is not a directory")
            self.nodes[()].perm = ti.mode & 0o7777
            return
        node = RefNode(kind, ti.mode & 0o7777)
        if kind == stat.S_IFREG:
            node.data = data
        elif kind == stat.S_IFLNK:
            if not ti.linkname:
                raise Refused("empty symlink target")
            node.target = ti.linkname.encode("utf-8", "surrogateescape")
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = os.makedev(ti.devmajor, ti.devminor)
        self._add(p, node)

    def merge(self, layers: list[bytes]) -> dict[tuple[str, ...], RefNode]:
        for number, layer in enumerate(layers):
            self.layer = number
            with tarfile.open(fileobj=io.BytesIO(layer), mode="r:",
                              encoding="utf-8", errors="surrogateescape") as tf:
                for ti in tf:
                    f = tf.extractfile(ti) if ti.isreg() else None
                    self.apply(ti, f.read() if f else b"")
        return self.nodes


def walk(img: Image) -> dict[tuple[str, ...], tuple[int, object]]:
    """Every path of a converted image: (inode number, what it holds)."""
    out: dict[tuple[str, ...], tuple[int, object]] = {}
    root = img.r.attr(InodeT(ROOT_INO))
    out[()] = (root.ino, (stat.S_IFMT(root.mode), root.mode & 0o7777))
    stack: list[tuple[tuple[str, ...], int]] = [((), ROOT_INO)]
    while stack:
        prefix, ino = stack.pop()
        for _pos, name, node in img.r.children(InodeT(ino)):
            p = (*prefix, name.decode("utf-8", "surrogateescape"))
            assert b"/" not in name and name not in (b"", b".", b"..")
            kind = stat.S_IFMT(node.mode)
            extra: object = None
            if kind == stat.S_IFREG:
                extra = img.read("/".join(p).encode("utf-8", "surrogateescape"))
            elif kind == stat.S_IFLNK:
                extra = img.r.readlink(node.ino)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                extra = node.rdev
            out[p] = (node.ino, (kind, node.mode & 0o7777, extra))
            if kind == stat.S_IFDIR:
                stack.append((p, node.ino))
    return out


def expected(nodes: dict[tuple[str, ...], RefNode]) -> dict[tuple[str, ...], object]:
    out: dict[tuple[str, ...], object] = {}
    for p, n in nodes.items():
        if p == ():
            out[p] = (n.kind, n.perm)
            continue
        extra = {stat.S_IFREG: n.data, stat.S_IFLNK: n.target}.get(n.kind)
        if n.kind in (stat.S_IFCHR, stat.S_IFBLK):
            extra = n.rdev
        out[p] = (n.kind, n.perm, extra)
    return out


# -- strategies ------------------------------------------------------------------------------

def _paths(leaves: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda lead, parts, leaf: lead + "/".join([*parts, leaf]),
        st.sampled_from(["", "", "/", "./"]),
        st.lists(st.sampled_from(PARTS), min_size=0, max_size=2),
        st.sampled_from(leaves),
    )


# Non-directories mostly get leaf names of their own, so that not every other image is
# refused for a file that later entries treat as a directory (some still are).
dir_paths = _paths(PARTS)
file_paths = _paths(PARTS + ["f", "g", "h"] * 6)
members = st.sampled_from(TYPES[:3] * 3 + TYPES).flatmap(lambda type_: st.tuples(
    st.just(type_), dir_paths if type_ == tarfile.DIRTYPE else file_paths,
    st.sampled_from(DATA), file_paths,
    st.integers(0, 0o7777), st.integers(0, 300), st.integers(0, 300),
))
layer_lists = st.lists(st.lists(members, max_size=8), min_size=1, max_size=3)


def build_layer(spec: list[tuple]) -> bytes:
    out = []
    for type_, name, data, link, mode, major, minor in spec:
        if type_ == tarfile.REGTYPE:
            out.append(entry(name, data, mode=mode))
        elif type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            out.append(entry(name, type=type_, linkname=link, mode=mode))
        else:
            out.append(entry(name, type=type_, mode=mode, devmajor=major, devminor=minor))
    return make_tar(out)


SETTINGS = settings(max_examples=int(os.environ.get("LAZYFS_FUZZ_EXAMPLES", "150")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(layer_lists)
def test_any_member_sequence_converts_like_the_reference_or_is_refused(spec):
    layers = [build_layer(layer) for layer in spec]
    try:
        want: dict | None = expected(Reference().merge(layers))
    except Refused:
        want = None
    with sandbox() as (src, out):
        img = convert_layers(src, out, layers)
        event("refused" if img is None else "converted")
        if img is None:
            assert want is None, "the converter refused an image the reference accepts"
            return
        got = walk(img)
    assert want is not None, "the converter accepted an image the reference refuses"
    assert {p: v for p, (_ino, v) in got.items()} == want
    # Hard links: two paths share an inode exactly when they share a node in the model.
    nodes = Reference().merge(layers)
    for p, (ino, (kind, *_rest)) in got.items():
        if kind == stat.S_IFDIR:
            continue
        same_ino = {q for q, (i, _v) in got.items() if i == ino}
        same_node = {q for q, n in nodes.items() if n is nodes[p]}
        assert same_ino == same_node, p


# -- byte-level fuzzing of a valid layer -----------------------------------------------------


def _base_layer() -> bytes:
    return make_tar([
        entry("etc/", type=tarfile.DIRTYPE, mode=0o755),
        entry("etc/f", RANDOM, pax={"SCHILY.xattr.user.k": "v"}),
        entry("etc/s", type=tarfile.SYMTYPE, linkname="/etc/f"),
        entry("etc/h", type=tarfile.LNKTYPE, linkname="etc/f"),
        entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
        entry("etc/.wh.x"),
        entry("z", b"tail" * 100, pax={"mtime": "12.5"}),
    ])


BASE = _base_layer()
HEADERS = [off for off in range(0, len(BASE), 512) if BASE[off + 257: off + 262] == b"ustar"]


def _fix_checksum(buf: bytearray, off: int) -> None:
    block = buf[off: off + 512]
    block[148:156] = b" " * 8
    buf[off + 148: off + 156] = b"%06o\0 " % sum(block)


def _convert_bytes(data: bytes) -> None:
    with sandbox() as (src, out):
        (src / "layer.tar").write_bytes(data)
        try:
            with no_hang():
                convert(f"tar:{src / 'layer.tar'}", f"oci:{out}", chunk_size=CS)
        except ImageError:
            return


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(BASE)))
def test_flipped_bytes_of_a_tar_are_refused_or_converted(flips, cut):
    data = bytearray(BASE)
    for pos, value in flips:
        data[pos] = value
    _convert_bytes(bytes(data[:cut]) if cut else bytes(data))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(HEADERS), st.integers(0, 511), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_mutated_headers_with_good_checksums_are_refused_or_converted(edits):
    """The header checksum would refuse most random flips; fixing it reaches the fields."""
    data = bytearray(BASE)
    for off, pos, value in edits:
        data[off + pos] = value
        _fix_checksum(data, off)
    _convert_bytes(bytes(data))


GZ = gzip.compress(BASE, mtime=0)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(GZ) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(GZ)))
def test_mutated_gzip_is_refused_or_converted(flips, cut):
    data = bytearray(GZ)
    for pos, value in flips:
        data[pos] = value
    _convert_bytes(bytes(data[:cut]) if cut else bytes(data))
