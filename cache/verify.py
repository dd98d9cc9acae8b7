"""Check every cache entry in full: its header and block checksums (xxh3), and that its
bytes' BLAKE3 digest is its name (or their sha256: an eStargz chunk's; an entry of the
earlier format counts as bad). A bad
entry is deleted (it is fetched again when needed) and every image that counted on it
loses its ``complete`` marker.

Reads check the xxh3 of each block they use, and the mount's completeness scan checks
only lengths (one stat per chunk), so a whole-length entry with flipped bytes would
otherwise be found only when read: with the registry gone, that read fails. ``lazyfs
cache verify`` finds it first.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from blockindex.codec import named_by

from .entry import check_entry, entry_plain
from .evict import unmark_complete
from .images import ImageStore
from .store import ChunkStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyResult:
    checked: int = 0
    checked_bytes: int = 0
    bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """``(digest hex, what was wrong)`` of each entry dropped."""
    incomplete: list[str] = dataclasses.field(default_factory=list)
    """Manifests of images no longer complete."""


def entry_problem(store: ChunkStore, digest: bytes) -> str | None:
    """What is wrong with the entry of ``digest`` (None: it is whole and right)."""
    try:
        with open(store.path(digest), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    problem = check_entry(data)
    if problem:
        return problem
    if not named_by(entry_plain(data), digest):
        return "wrong bytes (digest mismatch)"
    return None


def verify(store: ChunkStore, images: ImageStore) -> VerifyResult:
    """Check every entry; delete the bad ones. Blocking (reads the whole cache)."""
    result = VerifyResult()
    gone: set[bytes] = set()
    for digest, st in store.entries():
        problem = entry_problem(store, digest)
        result.checked += 1
        result.checked_bytes += st.st_size
        if problem is None:
            continue
        log.warning("cache entry %s is %s; dropped", digest.hex(), problem)
        result.bad.append((digest.hex(), problem))
        try:
            os.unlink(store.path(digest))
        except FileNotFoundError:
            pass
        gone.add(digest)
    if gone:
        result.incomplete = unmark_complete(images, gone)
    return result
