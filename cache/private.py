"""The directories lazyfs keeps its state in are their owner's alone.

A cache holds the bytes of private images (a 0600 file of an image is a chunk like any
other), the names of every file in them (the indexes), manifests and logs. Every lazyfs
command but ``convert`` runs under a umask of 077 (``lazyfs.cli.main``; forked and
spawned mount processes inherit it and set it again), so whatever lazyfs creates in a
cache, the snapshotter's root or its own state is 0700 or 0600, whichever command creates
it first. ``convert`` keeps the user's umask, since its output layout is the user's own,
and makes its state directory 0700 itself (``fetcher.blobrepos``).

What is left is a directory that exists already with group or other bits: made by hand,
or by a lazyfs from before. ``claim`` tightens it to 0700, and every directory inside it
too (a user who opened one while it was open could otherwise go on looking names up
from that descriptor), and says so in one warning; the next process finds it tight and
says nothing. It changes the modes only of a directory that is plainly lazyfs's (empty,
or holding the entry its kind always has, ``chunks/`` for a cache, or nothing but entries
lazyfs makes there: a cache seeded with a trace carried from another node) and refuses
any other: ``--cache /var/cache`` by mistake, or a shared ``/tmp``, is an error, never
``chmod 700``.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from .errors import CacheError

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
"""The umask of every lazyfs process that keeps state: directories 0700, files 0600."""

_OPEN = 0o077

CACHE_ENTRIES = frozenset({"chunks", "manifests", "refs", "indexes", "checked", "layers", "complete", "pins",
                           "traces", "logs", "evict.lock"})
"""What lazyfs makes at the top of a cache (``cache.store``, ``cache.images``,
``cache.trace``, ``cache.evict``, the mount launcher's logs)."""


def claim(root: Path, *, holds: str = "chunks", known: frozenset[str] = CACHE_ENTRIES,
          what: str = "cache directory", inner: bool = True) -> None:
    """Make ``root`` (and its missing parents) 0700 if it is missing; tighten it (and,
    with ``inner``, every directory below it) if it is open to others and is empty, holds
    ``holds``, or holds nothing but ``known`` names. Raises CacheError when it cannot be
    made or changed, or is open to others and holds something else."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(root.stat().st_mode)
        if not mode & _OPEN:
            return
        if not (root / holds).exists() and any(p.name not in known for p in root.iterdir()):
            raise CacheError(f"{what} {root} is open to other users (mode {mode:04o}) and holds files "
                             f"that are not lazyfs's; give lazyfs a directory of its own, or chmod 700 it")
        os.chmod(root, 0o700)
        tightened = _tighten_below(root) if inner else 0
    except OSError as exc:
        raise CacheError(f"{what} {root} is not usable: {exc.strerror}") from exc
    log.warning("%s %s was mode %04o, open to other users: made it 0700%s", what, root, mode,
                f" (and {tightened} directories in it)" if tightened else "")


def _tighten_below(root: Path) -> int:
    tightened = 0
    for top, dirs, _files in os.walk(root):  # never follows symlinks
        for name in dirs:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_mode & _OPEN:
                os.chmod(path, 0o700)
                tightened += 1
    return tightened
