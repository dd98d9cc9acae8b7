"""Small lazyfs images for the cache tests: files of random bytes, converted with 64 KiB
chunks, and a way to put an image's manifest, index and chunks into a cache directly."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

from blockindex.codec import decode
from blockindex.convert import convert
from blockindex.oci import Layout
from blockindex.reader import IndexReader
from cache.images import ImageStore
from cache.store import ChunkStore

CHUNK = 64 << 10


def make_image(images_root: Path, name: str, sizes: dict[str, int], seed: int) -> dict[str, bytes]:
    """Convert a rootfs of random files to ``images_root/name`` (tag 1); returns the files."""
    rootfs = images_root.parent / f"rootfs-{name}"
    rootfs.mkdir(parents=True)
    rng = random.Random(seed)
    files = {rel: rng.randbytes(size) for rel, size in sizes.items()}
    for rel, data in files.items():
        (rootfs / rel).write_bytes(data)
    convert(f"dir:{rootfs}", f"oci:{images_root / name}:1", chunk_size=CHUNK)
    shutil.rmtree(rootfs)
    return files


def manifest_of(images_root: Path, name: str) -> tuple[str, bytes, dict]:
    layout = Layout(images_root / name)
    digest = layout.resolve("1")["digest"]
    data = layout.read_blob(digest)
    return digest, data, json.loads(data)


def install(images_root: Path, name: str, cache: Path, *, ref: str | None = None) -> tuple[str, str]:
    """Put image ``name``'s manifest, index and every chunk into ``cache``, as a finished
    prefetch would. Returns (manifest digest, index digest)."""
    layout = Layout(images_root / name)
    digest, data, manifest = manifest_of(images_root, name)
    index_desc = manifest["layers"][0]
    images = ImageStore(cache)
    images.save_manifest(ref, digest, data)
    path = images.save_index(index_desc["digest"], layout.read_blob(index_desc["digest"]))
    store = ChunkStore(cache)
    reader = IndexReader(path)
    try:
        for c in reader.all_chunks():
            blob = layout.read_blob(c.blob.digest)
            store.put(c.digest, decode(c.codec, c.size, blob[c.offset : c.offset + c.stored_size]))
    finally:
        reader.close()
    images.mark_complete(digest)
    return digest, index_desc["digest"]


def chunk_digests(images_root: Path, name: str) -> set[bytes]:
    layout = Layout(images_root / name)
    _, _, manifest = manifest_of(images_root, name)
    reader = IndexReader(layout.blob_path(manifest["layers"][0]["digest"]))
    try:
        return {c.digest for c in reader.all_chunks()}
    finally:
        reader.close()


def drop_from_page_cache(paths: Iterable[Path | str]) -> None:
    """Put these files out of the page cache (written back first: dirty pages stay), as a
    drop of the whole page cache would, without costing every other process its own."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path: Path | str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages it has), asked with ``mincore``, which
    reads nothing: a read that must not wait (``RWF_NOWAIT``) still starts the kernel's
    readahead, so on a fast disk asking that way brings in the pages it asks about."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = -(-size // mmap.PAGESIZE)
        if not pages:
            return 0, 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path}")
            return sum(b & 1 for b in vec.raw), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
