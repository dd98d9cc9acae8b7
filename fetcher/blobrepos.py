"""Which repositories of a registry hold which blobs, as far as this machine has seen:
the memory that makes cross-repository mounts possible.

A lazy image's blobs (its config, index and chunk blobs) exist in no source repository,
so ``?mount=D&from=SOURCE`` alone would never hit. But chunk blobs follow the source
layers, so converting a second image that shares a base layer with one pushed earlier to
another repository produces blobs that registry already holds there. Each push records
``registry -> digest -> [repository, ...]``; the next push into another repository asks
the registry to mount from a recorded one instead of uploading (docker keeps the same
kind of record for the same reason).

The record is a hint, never trusted: a mount the registry refuses (202) becomes an
ordinary upload. It lives in ``$XDG_STATE_HOME/lazyfs/blob-repos.json`` (by default
``~/.local/state/lazyfs/``; the directory 0700, the file 0600), is bounded, written
atomically and merged with what other processes wrote meanwhile; a record that cannot be
read or written is logged and ignored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: Repositories remembered per blob (the most recent ones).
REPOS_PER_BLOB = 4
#: Blobs remembered per registry (the most recently recorded ones).
BLOBS_PER_REGISTRY = 50_000
#: Registries remembered (the most recently pushed to).
REGISTRIES = 64


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lazyfs" / "blob-repos.json"


def _private_dir(path: Path) -> None:
    """Make lazyfs's state directory 0700, or tighten it to that: it names the registries
    and repositories this user pushed to. ``convert`` runs with the user's umask (its output
    is the user's), so this directory, its own state, is made private here. Raises OSError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


class BlobRepos:
    """The record for one registry."""

    def __init__(self, registry: str, path: Path | None = None) -> None:
        self.registry = registry
        self.path = path or default_path()
        self._known: dict[str, list[str]] = self._load().get(registry, {})
        self._new: dict[str, list[str]] = {}

    def _load(self) -> dict[str, dict[str, list[str]]]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the blob record %s: %s", self.path, exc)
            return {}
        if not isinstance(doc, dict):
            return {}
        return {reg: {d: [r for r in repos if isinstance(r, str)]
                      for d, repos in blobs.items() if isinstance(repos, list)}
                for reg, blobs in doc.items() if isinstance(blobs, dict)}

    def holders(self, digest: str, exclude: str) -> list[str]:
        """Repositories recorded as holding ``digest``, most recent first, but ``exclude``."""
        repos = self._new.get(digest) or self._known.get(digest, [])
        return [r for r in reversed(repos) if r != exclude]

    def add(self, digest: str, repository: str) -> None:
        repos = [r for r in (self._new.get(digest) or self._known.get(digest, [])) if r != repository]
        self._new[digest] = (repos + [repository])[-REPOS_PER_BLOB:]

    def save(self) -> None:
        """Merge what was added into the file (re-read first: another push may have
        written meanwhile), atomically."""
        if not self._new:
            return
        try:
            doc = self._load()
            blobs = doc.pop(self.registry, {})
            doc[self.registry] = blobs  # last: the most recently pushed to
            for registry in list(doc)[: max(0, len(doc) - REGISTRIES)]:
                del doc[registry]
            for digest, repos in self._new.items():
                merged = [r for r in blobs.pop(digest, []) if r not in repos] + repos
                blobs[digest] = merged[-REPOS_PER_BLOB:]
            for digest in list(blobs)[: max(0, len(blobs) - BLOBS_PER_REGISTRY)]:
                del blobs[digest]
            _private_dir(self.path.parent)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".blob-repos.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, separators=(",", ":"))
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot update the blob record %s: %s", self.path, exc)
