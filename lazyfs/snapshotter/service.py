"""containerd's Snapshots API (v1): overlay snapshots, plus remote snapshots of lazy images.

Ordinary images get what containerd's overlayfs snapshotter gives: each snapshot owns
``snapshots/<id>/fs`` (its upper layer) and ``work``; an active snapshot mounts as an
overlay of its ancestors' ``fs`` dirs (a bind mount without ancestors), a view as a
read-only bind of its one lower dir or a read-only overlay of several.

Lazy images follow the remote-snapshot protocol of stargz and Nydus: when Prepare carries
``containerd.io/snapshot.ref`` (the chain id containerd wants) and the CRI labels naming
the image (``containerd.io/snapshot/cri.image-ref`` and ``.../cri.manifest-digest``), the
image is mounted by the ``FileSystem`` (one mount per image, shared by all its layers and
containers), a committed snapshot named after the target is recorded, and the answer is
ALREADY_EXISTS: containerd then downloads nothing. Every snapshot of a lazy image shows the
whole merged image, so in a chain the image's mount stands for all its layers; containers
get the mount as their lower dir and their own upper and work dirs.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotLazyImageError, UserError
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    SnapshotError,
    UnavailableError,
)
from .filesystem import FileSystem
from .labels import LABEL_DEFER, LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_TARGET
from .metadata import Kind, MetadataStore, Snapshot

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Mount:
    """One entry of containerd's types.Mount."""

    type: str
    source: str
    options: list[str]


def image_of(labels: dict[str, str]) -> str:
    """The pinned reference (``HOST/REPO@DIGEST``) the CRI labels name, or ""."""
    ref, digest = labels.get(LABEL_IMAGE_REF, ""), labels.get(LABEL_MANIFEST, "")
    if not ref or not digest:
        return ""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name.rsplit(":", 1)[0]
    return f"{name}@{digest}"


class SnapshotService:
    """The Snapshots API in plain Python; ``grpc_server`` puts it on a socket."""

    def __init__(self, root: Path, fs: FileSystem, store: MetadataStore | None = None) -> None:
        self.root = root
        self.fs = fs
        (root / "snapshots").mkdir(parents=True, exist_ok=True)
        self.store = store or MetadataStore(root / "metadata.db")
        # Locks, always taken in this order: an image's lock (its mount and unmount, and the
        # creation of its remote snapshots), then the metadata lock (one change at a time).
        # Mounting an image takes seconds; only that image's callers wait for it.
        self._lock = threading.RLock()
        self._image_locks: dict[str, threading.Lock] = {}
        self._image_locks_guard = threading.Lock()
        self._not_lazy: set[str] = set()
        self._mounting: dict[str, threading.Event] = {}
        """Images whose mount comes up in the background (``LABEL_DEFER``): set when it has
        come up or failed."""

    # -- containerd's methods -----------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, labels, Kind.ACTIVE)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, labels, Kind.VIEW)

    def mounts(self, key: str) -> list[Mount]:
        snap = self.store.get(key)
        if snap.kind == Kind.COMMITTED:
            raise FailedPreconditionError(f"snapshot {key!r} is committed; mounts are for active or views")
        self._ensure_chain_mounted(snap.parent)
        return self._mounts(snap)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        with self._lock:
            return self.store.commit(name, key, labels)

    def remove(self, key: str) -> None:
        with self._lock:
            snap = self.store.remove(key)
            shutil.rmtree(self._dir(snap), ignore_errors=True)
        if snap.image:
            with self._image_lock(snap.image):  # no remote snapshot of it is made meanwhile
                self._wait_mounting(snap.image)  # or it would come up after the unmount
                if self.store.uses_image(snap.image) == 0:
                    self.fs.unmount(self.fs.mountpoint(snap.image))

    def stat(self, key: str) -> Snapshot:
        return self.store.get(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        with self._lock:
            snap = self.store.get(key)
            if not paths:
                new = dict(labels)
            else:
                new = dict(snap.labels)
                for path in paths:
                    if path == "labels":
                        new = dict(labels)
                    elif path.startswith("labels."):
                        name = path.removeprefix("labels.")
                        if name in labels:
                            new[name] = labels[name]
                        else:
                            new.pop(name, None)
                    else:
                        raise InvalidArgumentError(f"cannot update field {path!r} of a snapshot")
            return self.store.set_labels(key, new)

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes on disk, inodes) a snapshot accounts for, so kubelet's disk accounting
        (CRI sums the usage of every snapshot) sees real bytes.

        An ordinary snapshot, and every active one (a container, also over a lazy image),
        reports its own fs (upper) dir, as containerd's overlayfs snapshotter does. A lazy
        (remote) snapshot stands for one layer of its image and reports that layer's
        entries in the node cache (the cached index file, or the cached chunks of a chunk
        blob: see usage.py), so an image's snapshots together report what the image takes
        in the cache, growing as its chunks arrive."""
        snap = self.store.get(key)
        if snap.image:
            layer = snap.labels.get(LABEL_LAYER, "")
            return self.fs.usage(snap.image, layer) if layer else (0, 0)
        return _disk_usage(self._dir(snap) / "fs")

    def list(self) -> builtins.list[Snapshot]:
        return self.store.list()

    def cleanup(self) -> None:
        """Remove snapshot dirs that no record owns (left by a crash mid-change)."""
        with self._lock:
            owned = {str(s.id) for s in self.store.list()}
            for d in (self.root / "snapshots").iterdir():
                if d.name not in owned:
                    log.info("cleanup: removing %s", d)
                    shutil.rmtree(d, ignore_errors=True)

    # -- restarts -----------------------------------------------------------------------

    def restore(self) -> None:
        """After a (re)start: take back the image mounts that are alive (their processes
        outlive the snapshotter), remount the dead or missing ones. A remount reads the
        registry when it answers and the node cache alone when it does not, which is enough
        for an image whose prefetch completed; an image that cannot be remounted now is
        tried again when a container next needs it (``_ensure_mounted``)."""
        for image in sorted(self.store.images()):
            mnt = self.fs.mountpoint(image)
            try:
                self.fs.check(mnt)
                log.info("restore: took back the live mount of %s at %s", image, mnt)
                continue
            except UserError:
                pass
            try:
                self._ensure_mounted(image)
            except UnavailableError as exc:
                log.error("restore: %s", exc)

    # -- internals ----------------------------------------------------------------------

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: Kind) -> builtins.list[Mount]:
        if not key:
            raise InvalidArgumentError("a snapshot needs a key")
        target = labels.get(LABEL_TARGET, "")
        image = image_of(labels)
        if target and image and image not in self._not_lazy:
            self._prepare_remote(target, parent, labels, image)  # raises AlreadyExists
        if parent:
            self._ensure_chain_mounted(parent)
        def make_dirs(snap: Snapshot) -> None:
            d = self._dir(snap)
            # an id whose record a crash rolled back can come again: start afresh
            shutil.rmtree(d, ignore_errors=True)
            try:
                (d / "fs").mkdir(parents=True)
                # a layer's or container's root directory: 0755 as containerd's overlay
                # snapshotter makes it, whatever the umask (077 here), or no non-root user
                # in a container could reach its own files
                (d / "fs").chmod(0o755)
                if kind == Kind.ACTIVE:
                    (d / "work").mkdir()
            except OSError:
                shutil.rmtree(d, ignore_errors=True)
                raise

        with self._lock:
            snap = self.store.create(key, parent, kind, labels, prepare=make_dirs)
            try:
                return self._mounts(snap)
            except (OSError, SnapshotError):  # no half-made snapshot stays behind
                self.store.remove(key)
                shutil.rmtree(self._dir(snap), ignore_errors=True)
                raise

    def _prepare_remote(self, target: str, parent: str, labels: dict[str, str], image: str) -> None:
        """Mount the image and record ``target`` as a committed snapshot of it, then raise
        AlreadyExists (containerd downloads nothing); return when the layer must be
        unpacked as usual instead."""
        if self.store.find(target) is not None:
            raise AlreadyExistsError(f"target snapshot {target!r} already exists")
        with self._image_lock(image):
            try:
                if labels.get(LABEL_DEFER) == "1":
                    self._mount_in_background(image, labels)
                else:
                    self._wait_mounting(image)
                    self.fs.mount(image, labels)
            except NotLazyImageError as exc:
                log.info("%s is not a lazy image (%s): unpacking it as usual", image, exc)
                self._not_lazy.add(image)
                return
            # Mounting failed otherwise: let containerd fall back to downloading the layer.
            except UserError as exc:
                log.warning("cannot mount %s (%s): unpacking it as usual", image, exc)
                return
            with self._lock:
                self.store.create(target, parent, Kind.COMMITTED, labels, image=image)
        log.info("remote snapshot %s of %s", target, image)
        raise AlreadyExistsError(f"target snapshot {target!r} already exists (remote)")

    def _mount_in_background(self, image: str, labels: dict[str, str]) -> None:
        """Start mounting ``image`` unless it is mounting already, and return at once:
        ``lazyfs pull`` knows the image is a lazyfs image, and its pull need not wait
        for the mount process to fetch the index and come up. Whoever needs the mount
        next waits for it (``_wait_mounting``). Called with the image's lock held."""
        if image in self._mounting:
            return
        done = self._mounting[image] = threading.Event()

        def mount() -> None:
            try:
                self.fs.mount(image, labels)
            except Exception as exc:  # noqa: BLE001 - whoever needs the mount tries again
                log.error("background mount of %s failed: %s", image, exc)
            finally:
                done.set()

        threading.Thread(target=mount, name=f"mount {image}", daemon=True).start()

    def _wait_mounting(self, image: str) -> None:
        """Wait for a background mount of ``image`` to come up or fail (its failure is
        logged; the caller's own check then finds no mount and mounts again). Called with
        the image's lock held, so no second mount starts meanwhile."""
        done = self._mounting.get(image)
        if done is None:
            return
        done.wait()  # bounded: the mount gives up after FileSystem.ready_timeout
        self._mounting.pop(image, None)

    def _image_lock(self, image: str) -> threading.Lock:
        with self._image_locks_guard:
            return self._image_locks.setdefault(image, threading.Lock())

    def _dir(self, snap: Snapshot) -> Path:
        return self.root / "snapshots" / str(snap.id)

    def _ensure_mounted(self, image: str) -> Path:
        """The image's mountpoint, with a live mount on it: a mount whose process died (or
        that a reboot took) is replaced before anything is handed the mountpoint."""
        mnt = self.fs.mountpoint(image)
        with self._image_lock(image):
            self._wait_mounting(image)
            try:
                self.fs.check(mnt)
                return mnt
            except UserError:
                pass
            try:
                self.fs.mount(image, {})
            except UserError as exc:
                raise UnavailableError(f"lazy image {image} is not mounted and cannot be remounted: {exc}"
                                       ) from exc
        log.info("remounted %s at %s", image, mnt)
        return mnt

    def _ensure_chain_mounted(self, key: str) -> None:
        """Every lazy image under snapshot ``key`` is mounted (before the metadata lock)."""
        for image in dict.fromkeys(s.image for s in self.store.chain(key) if s.image) if key else ():
            self._ensure_mounted(image)

    def _lowers(self, snap: Snapshot) -> builtins.list[str]:
        lowers: list[str] = []
        for s in self.store.chain(snap.parent)[0:] if snap.parent else []:
            path = str(self.fs.mountpoint(s.image) if s.image else self._dir(s) / "fs")
            if not lowers or lowers[-1] != path:
                lowers.append(path)
        return lowers

    def _mounts(self, snap: Snapshot) -> builtins.list[Mount]:
        if snap.image:
            return [Mount("bind", str(self.fs.mountpoint(snap.image)), ["ro", "rbind"])]
        lowers = self._lowers(snap)
        d = self._dir(snap)
        if snap.kind == Kind.ACTIVE:
            if not lowers:
                return [Mount("bind", str(d / "fs"), ["rw", "rbind"])]
            return [Mount("overlay", "overlay", [
                f"workdir={d / 'work'}", f"upperdir={d / 'fs'}", f"lowerdir={':'.join(lowers)}"])]
        if not lowers:
            return [Mount("bind", str(d / "fs"), ["ro", "rbind"])]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ["ro", "rbind"])]
        return [Mount("overlay", "overlay", [f"lowerdir={':'.join(lowers)}"])]


def _disk_usage(path: Path) -> tuple[int, int]:
    size = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes
