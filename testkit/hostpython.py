"""This machine's python3 (and any program) collected as image layers: the host's own files
at their absolute paths, with the shared libraries ``ldd`` names and every symlink on the
way, so the same absolute path resolves the same way in the image (merged /usr and all)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .tarwriter import L1_MTIME_NS, NS


@dataclass(frozen=True)
class HostEntry:
    """One path of a layer collected from the host: its kind, its permission bits, and for a
    symlink its target; a file's content is read from the host path when the tar is written."""

    kind: str  # 'file', 'dir', 'symlink'
    perm: int
    target: str = ""  # symlink target


def add_host_path(path: str, out: dict[str, HostEntry]) -> None:
    """Add path, every directory above it and every symlink on the way (reproduced as
    symlinks, then followed), so the same absolute path resolves the same way in the image."""
    parts = [p for p in os.path.normpath(path).split("/") if p]
    cur = ""
    for i, part in enumerate(parts):
        cur = f"{cur}/{part}"
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(cur)
            out[cur] = HostEntry("symlink", 0o777, target)
            rest = parts[i + 1:]
            nxt = os.path.normpath(os.path.join(os.path.dirname(cur), target, *rest))
            add_host_path(nxt, out)
            return
        if stat.S_ISDIR(st.st_mode):
            if cur not in out:
                out[cur] = HostEntry("dir", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode) and i == len(parts) - 1:
            out[cur] = HostEntry("file", stat.S_IMODE(st.st_mode))
        else:
            raise ValueError(f"cannot put {cur} in an image (mode {st.st_mode:o})")


def _find_python() -> str:
    """The python3 to ship: Debian's /usr/bin/python3 when it is a real ELF, else ours."""
    for cand in ("/usr/bin/python3", sys.executable):
        real = os.path.realpath(cand)
        try:
            with open(real, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return cand
        except OSError:
            continue
    raise RuntimeError("no python3 ELF binary found")


_STDLIB_SKIP_DIRS = {"__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo",
                     "site-packages", "dist-packages"}
_DYNLOAD_SKIP_PREFIXES = ("_test", "_xxtest", "xxlimited", "_ctypes_test")


def ldd(paths: list[str]) -> set[str]:
    """Every shared library (and the dynamic loader) the given ELF files need."""
    res = subprocess.run(["ldd", *paths], capture_output=True, text=True)
    libs: set[str] = set()
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            right = line.split("=>", 1)[1].strip()
            if right.startswith("/"):
                libs.add(right.split(" (", 1)[0])
        elif line.startswith("/") and " (0x" in line:
            libs.add(line.split(" (", 1)[0])
    return libs


_COMPILE_PYC = """
import importlib.util, py_compile, sys
for src in sys.stdin.read().split("\\0"):
    if src:
        try:
            py_compile.compile(src, cfile=sys.argv[1] + importlib.util.cache_from_source(src),
                               dfile=src, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError:
            pass  # e.g. lib2to3 grammar fixtures: the real stdlib ships no pyc for them either
"""


def add_pycs(layer: dict[str, HostEntry], synthetic: dict[str, bytes]) -> None:
    """Add unchecked-hash .pyc files for the layer's .py files (valid whatever the mtimes;
    deterministic), compiled by the image's own python so the magic number matches."""
    py = _find_python()
    sources = sorted(p for p, he in layer.items() if he.kind == "file" and p.endswith(".py"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([py, "-S", "-c", _COMPILE_PYC, tmp], input="\0".join(sources),
                       text=True, check=True)
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                host = os.path.join(dirpath, name)
                path = host[len(tmp):]
                synthetic[path] = Path(host).read_bytes()
                parent = os.path.dirname(path)
                layer.setdefault(parent, HostEntry("dir", 0o755))
                layer[path] = HostEntry("file", 0o644)


def python_layers() -> tuple[list[dict[str, HostEntry]], dict[str, bytes]]:
    """(layer 1 = libraries + sh + /etc, layer 2 = python + stdlib), synthetic files."""
    py = _find_python()
    probe = subprocess.run(
        [py, "-S", "-c", "import os, sys; print(os.path.dirname(os.__file__)); "
         "print(next(p for p in sys.path if p.endswith('lib-dynload')))"],
        capture_output=True, text=True, check=True).stdout.split("\n")
    stdlib, dynload = probe[0], probe[1]

    layer2: dict[str, HostEntry] = {}
    add_host_path(py, layer2)
    elves = [os.path.realpath(py)]
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        if dirpath == dynload:
            filenames = [f for f in filenames if not f.startswith(_DYNLOAD_SKIP_PREFIXES)]
        add_host_path(dirpath, layer2)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            add_host_path(p, layer2)
            if dirpath == dynload and name.endswith(".so"):
                elves.append(p)

    layer1: dict[str, HostEntry] = {}
    sh = "/bin/sh"
    add_host_path(sh, layer1)
    elves.append(os.path.realpath(sh))
    for lib in sorted(ldd(elves)):
        add_host_path(lib, layer1)
    synthetic = {
        "/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
                       b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "/etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    }
    for p in synthetic:
        layer1["/etc"] = HostEntry("dir", 0o755)
        layer1[p] = HostEntry("file", 0o644)
    layer1["/tmp"] = HostEntry("dir", 0o1777)
    layer1["/root"] = HostEntry("dir", 0o700)
    return [layer1, layer2], synthetic


def host_layer_tar(entries: dict[str, HostEntry], synthetic: dict[str, bytes]) -> bytes:
    """A tar of the collected entries (fixed mtimes, sorted), content read from the host
    unless ``synthetic`` has it (path -> bytes)."""
    mtime = L1_MTIME_NS // NS
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(entries, key=lambda p: p.split("/")):
            he = entries[path]
            ti = tarfile.TarInfo(path.lstrip("/"))
            ti.mode, ti.mtime = he.perm, mtime
            if he.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif he.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, he.target
                tf.addfile(ti)
            else:
                data = synthetic[path] if path in synthetic else Path(path).read_bytes()
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


_PYTHON_IMAGE_VERSION = "1"


def python_cache_key(layers: list[dict[str, HostEntry]], synthetic: dict[str, bytes]) -> str:
    """A key that changes when any collected host file does (path, size, mtime, inode)."""
    h = hashlib.sha256(_PYTHON_IMAGE_VERSION.encode())
    for layer in layers:
        for path in sorted(layer):
            he = layer[path]
            sig = ""
            if he.kind == "file" and path not in synthetic:
                st = os.stat(path)
                sig = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            h.update(f"{path}\0{he}\0{sig}\n".encode())
        h.update(b"--layer--\n")
    for path in sorted(synthetic):
        h.update(path.encode() + b"\0" + synthetic[path])
    return h.hexdigest()[:32]
