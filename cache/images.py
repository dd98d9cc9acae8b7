"""What the cache keeps about images, beside their chunks: manifests, indexes, tags.

Under the cache root::

    manifests/<hex>        manifest bytes, named by their sha256
    indexes/<hex>          block index files, named by their sha256
    built/<hex>            the digest of the index this node built from what <hex> hashes
                           (an eStargz image's: its layers and their TOCs)
    refs/<quoted ref>      the manifest digest a reference last resolved to
    complete/<hex>         present once every chunk of that manifest's image is cached
    checked/<hex>          the version of the check that index passed here
    layers/<hex>-<hex>     a side index's layer check for an image (manifest, index):
                           ``verified``, or ``failed: why``

With these an image whose prefetch completed mounts again with no network at all.
Everything read back is checked against its digest first.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
from pathlib import Path

from .atomic import sweep_dead_temps, write_atomic
from .errors import CacheError
from .private import claim

log = logging.getLogger(__name__)


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ValueError(f"malformed digest {digest!r}")
    return hexd


def _matches(path: Path, digest: str, hasher: hashlib._Hash) -> bool:
    """Whether the file ``path``, hashed into ``hasher``, is ``digest``'s; one that is not is
    dropped."""
    if hasher.hexdigest() == _hex(digest):
        return True
    log.warning("cached %s does not match its digest %s; dropped", path, digest)
    path.unlink(missing_ok=True)
    return False


class ImageStore:
    """Manifests, indexes and tag resolutions kept for offline mounts."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        claim(self.root)
        try:
            for sub in ("manifests", "indexes", "refs", "complete", "checked", "layers", "built"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root} is not usable: {exc.strerror}") from exc
        # temp files of dead writers; these directories hold a few files per image
        sweep_dead_temps([self.root / d for d in ("manifests", "indexes", "refs", "complete",
                                                   "checked", "layers", "built", "pins", "traces")])

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, [data])
        except OSError as exc:
            raise CacheError(f"cannot write {path}: {exc.strerror}") from exc

    def _read_verified(self, path: Path, digest: str) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data if _matches(path, digest, hashlib.sha256(data)) else None

    # -- manifests and references --------------------------------------------------------

    def save_manifest(self, ref: str | None, digest: str, data: bytes) -> None:
        self._write(self.root / "manifests" / _hex(digest), data)
        if ref:
            self._write(self._ref_path(ref), digest.encode())

    def manifest(self, digest: str) -> bytes | None:
        return self._read_verified(self.root / "manifests" / _hex(digest), digest)

    def resolve(self, ref: str) -> str | None:
        """The manifest digest ``ref`` last resolved to on this node, if any."""
        try:
            digest = self._ref_path(ref).read_text().strip()
            _hex(digest)
        except (FileNotFoundError, ValueError):
            return None
        return digest

    def _ref_path(self, ref: str) -> Path:
        return self.root / "refs" / urllib.parse.quote(ref, safe="")

    # -- indexes --------------------------------------------------------------------------

    def index_path(self, digest: str) -> Path:
        return self.root / "indexes" / _hex(digest)

    def verified_index(self, digest: str) -> Path | None:
        """The path of the cached index with this digest, checked (hashed a piece at a
        time: an index may be large); None when absent."""
        path = self.index_path(digest)
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while piece := f.read(1 << 20):
                    hasher.update(piece)
        except FileNotFoundError:
            return None
        return path if _matches(path, digest, hasher) else None

    def save_index(self, digest: str, data: bytes) -> Path:
        path = self.index_path(digest)
        self._write(path, data)
        return path

    def built_index(self, key: str) -> Path | None:
        """The index this node built from what ``key`` (a sha256 digest) names, checked
        against its digest; None when it built none (or it is gone)."""
        try:
            digest = (self.root / "built" / _hex(key)).read_text().strip()
            _hex(digest)
        except (OSError, ValueError):
            return None
        return self.verified_index(digest)

    def save_built_index(self, key: str, digest: str, data: bytes) -> Path:
        """Keep an index this node built (``data``, whose sha256 is ``digest``) under ``key``."""
        path = self.save_index(digest, data)
        self._write(self.root / "built" / _hex(key), digest.encode())
        return path

    def index_checked(self, digest: str, rules: str) -> bool:
        """Whether the index with this digest passed ``IndexReader.check`` here before,
        under the check's version ``rules`` (an older check may have let through what
        the current one refuses; the index itself is verified against the digest at
        every use)."""
        try:
            return (self.root / "checked" / _hex(digest)).read_bytes() == rules.encode()
        except OSError:  # never checked here, or the mark is unreadable: check again
            return False

    def mark_index_checked(self, digest: str, rules: str) -> None:
        self._write(self.root / "checked" / _hex(digest), rules.encode())

    # -- side indexes checked against their layers (``lazyfs.layercheck``) ----------------

    def _layers_path(self, manifest_digest: str, index_digest: str) -> Path:
        return self.root / "layers" / f"{_hex(manifest_digest)}-{_hex(index_digest)}"

    def record_layer_check(self, manifest_digest: str, index_digest: str, problem: str | None) -> None:
        """The side index ``index_digest`` matched the layers of image ``manifest_digest``
        (``problem`` None), or did not, and why."""
        verdict = "verified" if problem is None else f"failed: {problem}"
        self._write(self._layers_path(manifest_digest, index_digest), verdict.encode())

    def layer_check(self, manifest_digest: str, index_digest: str) -> str | None:
        """``verified``, ``failed: why``, or None if this node never finished the check."""
        try:
            return self._layers_path(manifest_digest, index_digest).read_bytes().decode(errors="replace")
        except OSError:
            return None

    # -- completion -----------------------------------------------------------------------

    def mark_complete(self, manifest_digest: str) -> None:
        self._write(self.root / "complete" / _hex(manifest_digest), b"")

    def is_complete(self, manifest_digest: str) -> bool:
        return (self.root / "complete" / _hex(manifest_digest)).exists()
