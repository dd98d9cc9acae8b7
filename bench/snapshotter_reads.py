"""The snapshotter benchmark's reads and memory: what an image costs once it is mounted.

- ``measure_complete``: one containerd with the lazyfs snapshotter (prefetch on, as a node
  runs it) and containerd's overlayfs. The lazy image is pulled and filled to completion,
  then distinct lazy images (``variant_repos``) are pulled one by one, each filled too,
  and the PSS of every mount process summed at each of ``mount_counts``. Then, each with
  the page cache dropped: ``tar -c`` of ``/usr`` and of the whole tree through the lazyfs
  mount, through a read-only overlayfs view of the full pull's snapshot (local disk), and
  through ``bench/memfs.py`` serving a copy of that tree from memory (the pyfuse3 ceiling),
  once with pyfuse3's own request loop (``memfs``) and once with lazyfs's (``memfs_lazyloop``);
  random 4 KiB ``pread``s over the image's larger files through lazyfs and overlayfs; and
  the PSS of the lazy mount once it has served the whole image.
- ``measure_cold``: ``lazyfs mount --no-prefetch`` straight from the registry into a fresh
  cache, then ``tar -c`` of the whole tree: seconds, and the registry's requests and bytes;
  then ``lazyfs umount``: its seconds, and whether the mount process outlived its wait.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    MEDIA_TYPE_GZIP_LAYER,
    Harness,
    _cached_convert,
    drop_caches,
    lazyfs,
    log,
    wait_complete,
)
from blockindex.oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json
from lazyfs import mountinfo
from lazyfs.snapshotter.client import chain_ids
from testkit import containerdkit as kit
from testkit.waiting import wait_until

VARIANT_FILE = "etc/lazyfs-bench-variant"


# -- inputs: distinct images of the same content ----------------------------------------------

def variant_repos(images: Path, plain: str, lazy: str, count: int, work: Path) -> list[str]:
    """``count`` converted images, each the plain image plus one layer holding
    ``/etc/lazyfs-bench-variant`` with its number: distinct digests and layer chains (the
    snapshotter mounts each image once, and answers a known chain without mounting), the
    same files otherwise. Converted once and kept beside ``lazy``; blobs equal to ``lazy``'s
    are hard links to them."""
    base = Layout(images / plain)
    manifest = json.loads(base.read_blob(base.resolve("1")["digest"]))
    config = json.loads(base.read_blob(manifest["config"]["digest"]))
    repos = []
    for i in range(1, count + 1):
        repo = f"{lazy}-v{i}"
        repos.append(repo)
        if (images / repo / "index.json").exists():
            continue
        src = work / f"variant-{i}"
        layout = Layout(src)
        layout.init()
        for desc in manifest["layers"]:
            target = layout.blob_path(desc["digest"])
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(base.blob_path(desc["digest"]), target)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            data = f"{i}\n".encode()
            info = tarfile.TarInfo(VARIANT_FILE)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
        extra = buf.getvalue()
        layer = layout.write_blob(gzip.compress(extra, mtime=0), MEDIA_TYPE_GZIP_LAYER)
        cfg = dict(config, rootfs={"type": "layers", "diff_ids": [
            *config["rootfs"]["diff_ids"], "sha256:" + hashlib.sha256(extra).hexdigest()]})
        if "history" in cfg:
            cfg["history"] = [*cfg["history"], {"created_by": "lazyfs bench variant"}]
        cfg_desc = layout.write_blob(canonical_json(cfg), MEDIA_TYPE_OCI_CONFIG)
        layout.tag(layout.write_blob(canonical_json({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST, "config": cfg_desc,
            "layers": [*manifest["layers"], layer]}), MEDIA_TYPE_OCI_MANIFEST), "1")
        _cached_convert(images, repo, f"oci:{src}:1")
        shutil.rmtree(src)
        _link_same_blobs(images / repo, images / lazy)
    return repos


def _link_same_blobs(layout_dir: Path, like: Path) -> None:
    for blob in (layout_dir / "blobs" / "sha256").iterdir():
        twin = like / "blobs" / "sha256" / blob.name
        if twin.exists() and not blob.samefile(twin):
            tmp = blob.with_name(blob.name + ".link")
            os.link(twin, tmp)
            os.replace(tmp, blob)


def own_bytes(images: Path, repos: list[str]) -> int:
    """Disk the layouts of ``repos`` take of their own: their files that no hard link shares
    (for variants of one image, their indexes and variant layers)."""
    return sum(st.st_size for repo in repos for path in (images / repo).rglob("*")
               if (st := path.lstat()).st_nlink == 1 and path.is_file())


# -- small tools --------------------------------------------------------------------------------

def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages divided among their sharers)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def tar_read(root: Path, what: str) -> tuple[float, int]:
    """(seconds, archive bytes) of ``tar -c`` of ``what`` under ``root``, the archive read
    here (GNU tar skips reading files it writes to /dev/null, so it never goes there)."""
    buf = bytearray(1 << 20)
    total = 0
    t = time.perf_counter()
    with subprocess.Popen(["tar", "-cf", "-", "--numeric-owner", "-C", str(root), what],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        while n := proc.stdout.readinto(buf):
            total += n
        err = proc.stderr.read()
    took = time.perf_counter() - t
    if proc.returncode != 0:
        last = err.decode(errors="replace")[-300:]
        raise RuntimeError(f"tar -c {root / what} exited {proc.returncode}: {last}")
    return took, total


def random_picks(root: Path, n: int, min_size: int, seed: int = 4096) -> list[tuple[str, int]]:
    """``n`` (path under root, 4 KiB-aligned offset), uniform over the bytes of the regular
    files of at least ``min_size``: the same picks for every mode."""
    files: list[tuple[str, int]] = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000 and st.st_size >= min_size:
                files.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size))
    files.sort()
    if not files:
        raise RuntimeError(f"no file of {min_size} bytes or more under {root}")
    rng = random.Random(seed)
    chosen = rng.choices(files, weights=[size for _, size in files], k=n)
    return [(path, rng.randrange(0, size // 4096) * 4096) for path, size in chosen]


def random_rate(root: Path, picks: list[tuple[str, int]]) -> float:
    """Bytes a second of the 4 KiB preads (files opened before the clock starts)."""
    fds = {path: os.open(root / path, os.O_RDONLY) for path in {p for p, _ in picks}}
    try:
        t = time.perf_counter()
        for path, off in picks:
            if len(os.pread(fds[path], 4096, off)) != 4096:
                raise RuntimeError(f"{root / path}: short read at {off}")
        took = time.perf_counter() - t
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(picks) * 4096 / took


def _live_mounts(root: Path) -> set[Path]:
    mounts = root / "mounts"
    return {p for p in mounts.iterdir() if mountinfo.find(p) is not None} if mounts.exists() else set()


def _overlay_view(sock: Path, plain_layout: Path, key: str, target: Path) -> None:
    """Mount a read-only view of the pulled plain image's top snapshot at ``target``."""
    layout = Layout(plain_layout)
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    diff_ids = json.loads(layout.read_blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]
    out = kit.ctr(sock, "snapshots", "--snapshotter", "overlayfs", "view", "--mounts", key,
                  chain_ids(diff_ids)[-1])
    [m] = json.loads(out.stdout)
    m = {k.lower(): v for k, v in m.items()}  # ctr prints Go's field names (Type, Source, Options)
    target.mkdir()
    subprocess.run(["mount", "-t", m["type"], m["source"], "-o", ",".join(m.get("options") or []),
                    str(target)], check=True, capture_output=True)


# -- the phases ----------------------------------------------------------------------------------

def measure_complete(d: Path, *, images: Path, ref_lazy: str, ref_plain: str, plain: str,
                     variant_refs: list[str], mount_counts: tuple[int, ...], random_reads: int,
                     large_file: int) -> dict[str, Any]:
    """One sample of every complete-image figure (the docstring at the top)."""
    d.mkdir()
    procs = kit.Procs()
    h = Harness(d, None)
    view = d / "overlay-root"
    try:
        snap_root = d / "lazyfs"
        kit.start_snapshotter(procs, d / "s.sock", snap_root, d / "snapshotter.log")
        _proc, sock = kit.start_containerd(procs, d, kit.containerd_config(d, d / "c.sock", d / "s.sock"))
        kit.ctr(sock, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref_plain, timeout=600)
        _overlay_view(sock, images / plain, "lzb-view", view)

        out: dict[str, Any] = {"pss_bytes": {}}
        mounts: list[Path] = []
        for ref in [ref_lazy, *variant_refs][:max(mount_counts)]:
            before = _live_mounts(snap_root)
            lazyfs("pull", "--address", str(sock), ref)
            # the snapshotter brings a pulled image's mount up in the background
            wait_until(lambda before=before: _live_mounts(snap_root) - before, timeout=120,
                       what=f"the mount of {ref}")
            [mnt] = _live_mounts(snap_root) - before
            wait_complete(h, mnt, timeout=600)
            mounts.append(mnt)
            if len(mounts) in mount_counts:
                out["pss_bytes"][f"mounts_{len(mounts)}"] = sum(pss_bytes(h.status(m)["pid"]) for m in mounts)
        lazy = mounts[0]
        roots = {"lazyfs": lazy, "overlayfs": view, "memfs": h.memfs(from_dir=view),
                 "memfs_lazyloop": h.memfs(from_dir=view, loop="lazyfs")}
        for what, scope in (("usr", "usr"), (".", "whole")):
            for mode, root in roots.items():
                drop_caches()
                took, size = tar_read(root, what)
                out[f"tar_{scope}_s_{mode}"] = took
                out[f"tar_{scope}_bytes_{mode}"] = size
        picks = random_picks(view, random_reads, large_file)
        for mode in ("lazyfs", "overlayfs"):
            drop_caches()
            out[f"random_4k_bytes_per_s_{mode}"] = random_rate(roots[mode], picks)
        out["random_files"] = len({p for p, _ in picks})
        out["pss_bytes"]["after_whole_read"] = pss_bytes(h.status(lazy)["pid"])
        return out
    finally:
        h.close()
        subprocess.run(["umount", "-l", str(view)], capture_output=True)
        kit.teardown(d, procs)
        shutil.rmtree(d, ignore_errors=True)


def measure_cold(d: Path, *, port: int, repo: str, access: Any) -> dict[str, float]:
    """``lazyfs mount --no-prefetch`` into a fresh cache, then ``tar -c`` of the whole tree;
    requests and bytes are the registry's, from the mount's start."""
    d.mkdir()
    h = Harness(d, None)
    h.port = port
    try:
        drop_caches()
        mark = access.mark()
        t0 = time.perf_counter()
        mnt = h.mount(repo, h.fresh("cache"), "--no-prefetch")
        t1 = time.perf_counter()
        read_s, size = tar_read(mnt, ".")
        sent, requests = access.since(mark)
        t2 = time.perf_counter()
        try:
            h.umount(mnt)
            failed = 0
        except RuntimeError as exc:
            # after the figures: a mount process slow to exit is reported, not a lost run
            # (the harness's close ends it)
            failed = 1
            tail = Path(str(mnt) + ".log").read_text(errors="replace").splitlines()[-15:]
            log(f"cold tree read: {exc}; the mount's log ends:\n" + "\n".join(tail))
        return {"mount_s": t1 - t0, "read_s": read_s, "total_s": t1 - t0 + read_s, "tar_bytes": size,
                "registry_bytes": sent, "registry_requests": requests,
                "umount_s": time.perf_counter() - t2, "umount_failed": failed}
    finally:
        h.close()
        shutil.rmtree(d, ignore_errors=True)
