"""The suite's images, built without the internet (only the Debian mirror apt already uses)
and cached between runs under ``/var/cache/lazyfs-bench`` (``$LAZYFS_BENCH_CACHE``).

The full suite's image is a Debian rootfs built the way a Dockerfile builds one, in three
steps, each of which becomes a gzip layer of an ordinary OCI image:

1. ``base``: ``debootstrap --variant=minbase`` of the release apt uses;
2. ``python``: ``apt-get install python3`` in it;
3. ``extras``: ``apt-get install python3-numpy``, then ``apt-get clean``.

An entry of the final tree goes into the layer of the step that last changed it (its
type, mode, owner, size, mtime and inode are compared with a record taken after each
step), so the layers are disjoint and unpack, in order, to exactly the final tree, with no
whiteouts. The same rootfs directory is what "local disk" runs and what rclone and
httpdirfs are served. The OCI image is then converted with ``lazyfs convert``.

Quick mode uses ``testkit.imagegen``'s python image (this machine's python3, two layers),
so it needs no debootstrap.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, lazyfs, log, run, source_key
from blockindex.oci import MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json
from testkit import imagegen

CACHE = Path(os.environ.get("LAZYFS_BENCH_CACHE", "/var/cache/lazyfs-bench"))
MEDIA_TYPE_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: bump to rebuild the Debian image
DEBIAN_VERSION = "1"
STEPS = (("python", ["python3"]), ("extras", ["python3-numpy"]))


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """One image in every form a scenario needs."""

    name: str
    images: Path
    """Served as OCI layouts by the origin: ``<images>/<lazy>`` and ``<images>/<pull>``."""
    lazy: str
    """Repository of the converted (lazyfs) image."""
    pull: str
    """Repository of the original image with gzip layers."""
    layers: list[dict[str, Any]]
    """The original image's layer descriptors, in order."""
    rootfs: Path
    """The image's tree on local disk."""
    description: str

    @property
    def trees(self) -> dict[str, Path]:
        """What the origin serves as plain HTTP: the tree, and the gzip layers by hex digest."""
        return {"rootfs": self.rootfs, "blobs": self.images / self.pull / "blobs" / "sha256"}

    def layer_path(self, layer: dict[str, Any]) -> Path:
        algo, hexd = layer["digest"].split(":", 1)
        return self.images / self.pull / "blobs" / algo / hexd


def apt_mirror() -> tuple[str, str]:
    """(URI, suite) of the Debian archive apt is configured with."""
    for path in sorted(Path("/etc/apt").glob("sources.list*")) + \
            sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for uri, suite in re.findall(r"^URIs:\s*(\S+/debian)\s*\nSuites:\s*(\S+)", text, re.M):
            return uri, suite
        for uri, suite in re.findall(r"^deb\s+(\S+/debian)\s+(\S+)\s", text, re.M):
            return uri, suite
    raise RuntimeError("no Debian mirror in /etc/apt/sources.list*: cannot debootstrap")


def _record(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, st.st_ino)
    return out


def _chroot_apt(root: Path, *args: str) -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C"}
    done = subprocess.run(["chroot", str(root), "apt-get", "-q", "-y", *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get {' '.join(args)} in {root}: {done.stderr.strip()[-500:]}")


def _build_debian_rootfs(dest: Path) -> dict[str, dict[str, tuple]]:
    """debootstrap and the apt steps; returns the record taken after each step."""
    uri, suite = apt_mirror()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.monotonic()
    log(f"image: debootstrap --variant=minbase {suite} from {uri} (once; cached in {CACHE})")
    run("debootstrap", "--variant=minbase", suite, str(tmp), uri, timeout=3600)
    records = {"base": _record(tmp)}
    for step, packages in STEPS:
        log(f"image: apt-get install {' '.join(packages)}")
        _chroot_apt(tmp, "install", "--no-install-recommends", *packages)
        if step == STEPS[-1][0]:
            _chroot_apt(tmp, "clean")
        records[step] = _record(tmp)
    os.replace(tmp, dest)
    log(f"image: rootfs built in {time.monotonic() - t:.0f}s")
    return records


def _layer_lists(root: Path, records: dict[str, dict[str, tuple]]) -> dict[str, list[str]]:
    """Each final entry in the layer of the last step that changed it; directories also
    in every layer holding something below them."""
    final = records[STEPS[-1][0]]
    names = ["base", *[s for s, _ in STEPS]]
    lists: dict[str, set[str]] = {n: set() for n in names}
    for rel, sig in final.items():
        layer = names[-1]
        for i, n in enumerate(names):
            if records[n].get(rel) == sig and all(records[m].get(rel) == sig for m in names[i:]):
                layer = n
                break
        lists[layer].add(rel)
        if layer != "base":
            parent = os.path.dirname(rel)
            while parent:
                lists[layer].add(parent)
                parent = os.path.dirname(parent)
    return {n: sorted(lists[n]) for n in names}


def _write_oci(dest: Path, layer_tars: list[Path], tag: str = "1") -> list[dict[str, Any]]:
    """An OCI layout of gzip layers (gzip -6, as docker and buildkit write them)."""
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    layout = Layout(tmp)
    layout.init()
    layers, diff_ids = [], []
    for tar in layer_tars:
        h = hashlib.sha256()
        with open(tar, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        diff_ids.append(f"sha256:{h.hexdigest()}")
        gz = tar.with_suffix(".tar.gz")
        with open(gz, "wb") as out:
            subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], stdout=out, check=True)
        layers.append(layout.write_blob(gz.read_bytes(), MEDIA_TYPE_GZIP_LAYER))
        gz.unlink()
    config = canonical_json({"architecture": "amd64", "os": "linux",
                             "config": {"Cmd": ["/bin/sh"]},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    cfg = layout.write_blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                               "config": cfg, "layers": layers})
    layout.tag(layout.write_blob(manifest, MEDIA_TYPE_OCI_MANIFEST), tag)
    os.replace(tmp, dest)
    return layers


def _manifest_layers(layout_dir: Path) -> list[dict[str, Any]]:
    layout = Layout(layout_dir)
    return json.loads(layout.read_blob(layout.resolve("1")["digest"]))["layers"]


def convert_cached(images: Path, repo: str, source: str, *options: str) -> None:
    """``lazyfs convert SOURCE`` (with ``options``) into ``images/repo``, once."""
    dest = images / repo
    if (dest / "index.json").exists():
        return
    tmp = images / f".{repo}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.monotonic()
    lazyfs("convert", source, f"oci:{tmp}:1", *options)
    os.replace(tmp, dest)
    log(f"image: converted {repo} in {time.monotonic() - t:.1f}s")


ESTARGZ_CHUNK = 4 << 20
"""Chunk size of the eStargz variant: a file's content is cut into gzip members this big."""


def estargz_cached(image: ImageSet) -> str:
    """The image's tree as a one-layer eStargz image (``testkit.estargz``: a gzip member
    per file and per ``ESTARGZ_CHUNK`` of a big one, the TOC, the footer), an OCI layout
    in ``image.images`` tagged ``1``, built once per tree and writer. Its repository name."""
    h = hashlib.sha256(image.pull.encode())
    for name in ("estargz.py", "tarwriter.py"):
        h.update((ROOT / "testkit" / name).read_bytes())
    repo = f"{image.name}-estargz-{h.hexdigest()[:12]}"
    dest = image.images / repo
    if (dest / "index.json").exists():
        return repo
    from testkit import estargz  # the writer is test code: loaded only when it is needed

    tmp = image.images / f".{repo}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.monotonic()
    layer = estargz.write_estargz(estargz.entries_of_dir(image.rootfs), chunk_size=ESTARGZ_CHUNK)
    estargz.write_layout(tmp, [layer])
    os.replace(tmp, dest)
    log(f"image: eStargz {repo} ({len(layer.blob) >> 20} MiB) in {time.monotonic() - t:.1f}s")
    return repo


def debian_image() -> ImageSet:
    base = CACHE / f"debian-v{DEBIAN_VERSION}"
    base.mkdir(parents=True, exist_ok=True)
    rootfs = base / "rootfs"
    images = base / "images"
    images.mkdir(exist_ok=True)
    pull = "debian-gzip"
    if not (images / pull / "index.json").exists():
        if rootfs.exists():
            shutil.rmtree(rootfs)  # its step records are gone with the process that made it
        records = _build_debian_rootfs(rootfs)
        lists = _layer_lists(rootfs, records)
        tars = []
        for name, entries in lists.items():
            listing = base / f"{name}.list"
            listing.write_text("".join(e + "\n" for e in entries))
            tar = base / f"{name}.tar"
            run("tar", "-C", str(rootfs), "--numeric-owner", "--no-recursion", "--xattrs",
                "-cf", str(tar), "--verbatim-files-from", "-T", str(listing), timeout=1800)
            tars.append(tar)
            log(f"image: layer {name}: {len(entries)} entries, {tar.stat().st_size >> 20} MiB")
        _write_oci(images / pull, tars)
        for tar in tars:
            tar.unlink()
    layers = _manifest_layers(images / pull)
    lazy = f"debian-lazy-{source_key()}"
    convert_cached(images, lazy, f"oci:{images / pull}:1")
    _, suite = apt_mirror()
    return ImageSet("debian", images, lazy, pull, layers, rootfs,
                    f"Debian {suite} minbase + python3 + python3-numpy (debootstrap), "
                    f"{len(layers)} gzip layers: base, python, extras")


def quick_image(work: Path) -> ImageSet:
    """This machine's python3 as a two-layer image (testkit.imagegen), gzip layers."""
    base = CACHE / "quick"
    base.mkdir(parents=True, exist_ok=True)
    images = base / "images"
    images.mkdir(exist_ok=True)
    tar = imagegen.build_python_image(work / "python.tar", cache_dir=base / "inputs", with_pyc=True)
    key = hashlib.sha256(tar.read_bytes()).hexdigest()[:12]
    pull = f"python-gzip-{key}"
    if not (images / pull / "index.json").exists():
        layer_tars = []
        with tarfile.open(tar) as tf:
            [entry] = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
            for i, name in enumerate(entry["Layers"]):
                raw = tf.extractfile(name).read()  # type: ignore[union-attr]
                if raw[:2] == b"\x1f\x8b":
                    raw = gzip.decompress(raw)
                path = work / f"layer{i}.tar"
                path.write_bytes(raw)
                layer_tars.append(path)
        _write_oci(images / pull, layer_tars)
    tar.unlink()
    layers = _manifest_layers(images / pull)
    rootfs = base / f"rootfs-{key}"
    if not rootfs.exists():
        tmp = base / f"rootfs-{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for layer in layers:
            algo, hexd = layer["digest"].split(":", 1)
            run("tar", "-xzf", str(images / pull / "blobs" / algo / hexd), "-C", str(tmp),
                "--numeric-owner")
        os.replace(tmp, rootfs)
    lazy = f"python-lazy-{key}-{source_key()}"
    convert_cached(images, lazy, f"oci:{images / pull}:1")
    return ImageSet("quick-python", images, lazy, pull, layers, rootfs,
                    "this machine's python3 and its libraries (testkit/imagegen.py), 2 gzip layers")


__all__ = ["CACHE", "ImageSet", "ROOT", "convert_cached", "debian_image", "quick_image"]
