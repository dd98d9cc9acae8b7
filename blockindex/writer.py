"""Write a block index: rows in, one deterministic SQLite file out."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .format import (
    CODEC_GZIP_MEMBER,
    ESTARGZ_FORMAT_VERSION,
    FORMAT_VERSION,
    SCHEMA,
    SIDE_FORMAT_VERSION,
    SIDE_SCHEMA,
    format_for,
)


class IndexWriter:
    """Collects the rows of an index and writes them as one compact file.

    The caller chooses inode numbers, directory positions and chunk ids; the same calls
    in the same order give a byte-identical file. Rows collect in memory, or in the work
    file ``spill`` when given (what a conversion does: memory then stays at SQLite's page
    cache however many entries the image has; the file is a scratch copy, never synced).
    The ``format`` meta entry is the lowest version that has every codec of the chunks
    added (``format.format_for``), so an index without zstd chunks stays format 1. A side
    index (``side``) has the checkpoints table too, and is format 3 whatever its codecs; an
    index of eStargz members is format 4.
    """

    def __init__(self, chunk_size: int, spill: str | Path | None = None, *, side: bool = False) -> None:
        self._db = sqlite3.connect(":memory:" if spill is None else str(spill))
        if spill is not None:
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute("PRAGMA cache_size = -4096")  # KiB: 4 MiB of pages
        self._db.executescript(SCHEMA)
        if side:
            self._db.executescript(SIDE_SCHEMA)
        self._side = side
        self.set_meta("format", FORMAT_VERSION)
        self.set_meta("chunk_size", str(chunk_size))
        self._codecs: set[int] = set()

    @property
    def format_version(self) -> str:
        if self._side:
            return SIDE_FORMAT_VERSION
        if CODEC_GZIP_MEMBER in self._codecs:
            return ESTARGZ_FORMAT_VERSION
        return format_for(self._codecs)

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_inode(
        self,
        ino: int,
        *,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        nlink: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO inodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ino, mode, uid, gid, size, mtime_ns, nlink, rdev, target),
        )

    def add_dirent(self, parent: int, pos: int, name: bytes, ino: int) -> None:
        self._db.execute("INSERT INTO dirents VALUES (?, ?, ?, ?)", (parent, pos, name, ino))

    def add_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._db.execute("INSERT INTO xattrs VALUES (?, ?, ?)", (ino, name, value))

    def add_blob(self, blob_id: int, digest: str, size: int) -> None:
        self._db.execute("INSERT INTO blobs VALUES (?, ?, ?)", (blob_id, digest, size))

    def add_chunk(
        self,
        chunk_id: int,
        digest: bytes,
        *,
        blob: int,
        offset: int,
        stored_size: int,
        size: int,
        codec: int,
    ) -> None:
        self._codecs.add(codec)
        self._db.execute(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
            (chunk_id, digest, blob, offset, stored_size, size, codec),
        )

    def add_checkpoint(self, checkpoint_id: int, *, blob: int, uoffset: int, coffset: int,
                       bits: int, window: bytes) -> None:
        """A deflate block boundary of a gzip layer (a side index's ``checkpoints``)."""
        self._db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                         (checkpoint_id, blob, uoffset, coffset, bits, window))

    def add_extent(self, ino: int, idx: int, chunk_id: int) -> None:
        self._db.execute("INSERT INTO extents VALUES (?, ?, ?)", (ino, idx, chunk_id))

    def write(self, path: str | Path) -> None:
        """Write the index to ``path`` (replaced if it exists)."""
        path = Path(path)
        if path.exists():
            os.unlink(path)
        self.set_meta("format", self.format_version)
        self._db.commit()
        self._db.execute("VACUUM INTO ?", (str(path),))

    def close(self) -> None:
        self._db.close()
