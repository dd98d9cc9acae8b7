"""Durable snapshot records: one SQLite file under the snapshotter's root.

Each change is one transaction (WAL, ``synchronous=FULL``), so after a crash the store
holds exactly the changes that returned. A snapshot keeps its numeric id for life: its
directories are ``snapshots/<id>/fs`` and ``snapshots/<id>/work`` whatever its key becomes
when it is committed. A remote (lazy) snapshot names the image it comes from in ``image``
and has no directories.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AlreadyExistsError, FailedPreconditionError, NotFoundError


class Kind(enum.IntEnum):
    """Values of containerd's snapshots.v1.Kind."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Snapshot:
    id: int
    key: str
    parent: str  # the parent's key; "" for none
    kind: Kind
    labels: dict[str, str]
    created: float
    updated: float
    image: str  # the lazy image this snapshot shows; "" for an ordinary snapshot


SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL,
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    image TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots (parent);
CREATE INDEX IF NOT EXISTS snapshots_by_image ON snapshots (image);
"""


class MetadataStore:
    """Snapshot records; every method is one transaction and safe across threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, key: str) -> Snapshot:
        with self._lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFoundError(f"snapshot {key!r} does not exist")
        return _snapshot(row)

    def find(self, key: str) -> Snapshot | None:
        try:
            return self.get(key)
        except NotFoundError:
            return None

    def list(self) -> builtins.list[Snapshot]:
        with self._lock:
            return [_snapshot(r) for r in self._db.execute("SELECT * FROM snapshots ORDER BY id")]

    def chain(self, key: str) -> builtins.list[Snapshot]:
        """The snapshot and its ancestors, nearest first."""
        out = [self.get(key)]
        while out[-1].parent:
            out.append(self.get(out[-1].parent))
        return out

    def images(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT image FROM snapshots WHERE image != ''")}

    def create(self, key: str, parent: str, kind: Kind, labels: dict[str, str], image: str = "",
               prepare: Callable[[Snapshot], None] | None = None) -> Snapshot:
        """Record a new snapshot. ``prepare`` runs inside the transaction, before it commits
        (it makes the snapshot's directories): a crash before the commit leaves no record,
        only a directory that ``Cleanup`` removes, never a record without its directory."""
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            if parent:
                row = db.execute("SELECT kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
                if row is None:
                    raise NotFoundError(f"parent snapshot {parent!r} does not exist")
                if row[0] != Kind.COMMITTED:
                    raise FailedPreconditionError(f"parent {parent!r} is not a committed snapshot")
            cur = db.execute(
                "INSERT INTO snapshots (key, parent, kind, labels, created, updated, image) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, parent, int(kind), json.dumps(labels, sort_keys=True), now, now, image))
            snap = Snapshot(id=int(cur.lastrowid or 0), key=key, parent=parent, kind=kind,
                            labels=dict(labels), created=now, updated=now, image=image)
            if prepare is not None:
                prepare(snap)
        return snap

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        """Turn active snapshot ``key`` into committed snapshot ``name`` (same id)."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFoundError(f"snapshot {key!r} does not exist")
            if row[3] != Kind.ACTIVE:
                raise FailedPreconditionError(f"snapshot {key!r} is not active")
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            merged = {**json.loads(row[4]), **labels}
            db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ? WHERE id = ?",
                       (name, int(Kind.COMMITTED), json.dumps(merged, sort_keys=True), time.time(), row[0]))
        return self.get(name)

    def remove(self, key: str) -> Snapshot:
        with self.transaction() as db:
            row = db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFoundError(f"snapshot {key!r} does not exist")
            if db.execute("SELECT 1 FROM snapshots WHERE parent = ?", (key,)).fetchone():
                raise FailedPreconditionError(f"snapshot {key!r} has children; remove them first")
            db.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return _snapshot(row)

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self.transaction() as db:
            cur = db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                             (json.dumps(labels, sort_keys=True), time.time(), key))
            if cur.rowcount == 0:
                raise NotFoundError(f"snapshot {key!r} does not exist")
        return self.get(key)

    def uses_image(self, image: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM snapshots WHERE image = ?", (image,)).fetchone()
        return int(row[0])


def _snapshot(row: tuple) -> Snapshot:
    sid, key, parent, kind, labels, created, updated, image = row
    return Snapshot(id=sid, key=key, parent=parent, kind=Kind(kind), labels=json.loads(labels),
                    created=created, updated=updated, image=image)
