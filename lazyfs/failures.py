"""One log line per failed read, naming everything involved as ``key=value`` fields.

    read failed (EIO): kind=integrity image=sha256:... path=/usr/bin/python3 inode=812
        range=0+131072 chunk=<blake3 hex> blob=sha256:... source=origin error="..."

``kind`` is integrity (bytes failed their digest), timeout (no answer within the
deadline), network (refused, reset, 5xx, ...), offline (not cached, no network) or
index (the index is damaged). The chunk, blob and source come from the error where the
fetcher knew them (``FetchError.about``), else from the read's own chunk when it
covers one. Paths are looked up only on failure (the index has no inode-to-path
index) and remembered.

A mount serves one image, so ``tag_warnings`` also appends ``image=<manifest digest>`` to
every warning and error its process logs (the fetcher's, the prefetcher's, the cache's),
which do not know the image themselves.
"""

from __future__ import annotations

import collections
import logging

from blockindex.format import InodeT
from blockindex.reader import IndexReader
from fetcher.errors import DeadlineError, FetchError, IntegrityError, UnreachableError

log = logging.getLogger("lazyfs.read")


def kind_of(exc: BaseException) -> str:
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, DeadlineError):
        return "timeout"
    if isinstance(exc, UnreachableError) and "offline" in str(exc):
        return "offline"
    if isinstance(exc, FetchError):
        return "network"
    return "index"


def _field(value: object) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in '"=' for ch in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class ReadFailures:
    """Logs failed reads of one image with the fields that find the cause."""

    def __init__(self, index: IndexReader, image: str | None) -> None:
        self._index = index
        self._image = image
        self._paths: collections.OrderedDict[int, str] = collections.OrderedDict()

    def path(self, ino: int) -> str:
        found = self._paths.get(ino)
        if found is None:
            try:
                raw = self._index.path_of(InodeT(ino))
            except Exception:  # noqa: BLE001 - a damaged index must not hide the failure itself
                raw = None
            found = raw.decode(errors="backslashreplace") if raw is not None else "?"
            self._paths[ino] = found
            if len(self._paths) > 1024:
                self._paths.popitem(last=False)
        return found

    def fields(self, ino: int, offset: int, size: int, exc: BaseException) -> dict[str, object]:
        chunk = getattr(exc, "chunk", None)
        blob = getattr(exc, "blob", None)
        if chunk is None:
            try:
                hits = [s.chunk for s in self._index.chunks(InodeT(ino), offset, size) if s.chunk is not None]
            except Exception:  # noqa: BLE001 - as above
                hits = []
            if len(hits) == 1:
                chunk = hits[0].hexdigest
                blob = blob or hits[0].blob.digest
        out: dict[str, object] = {"kind": kind_of(exc), "image": self._image or "?", "path": self.path(ino),
                                  "inode": ino, "range": f"{offset}+{size}"}
        for key, value in (("chunk", chunk), ("blob", blob), ("source", getattr(exc, "source", None))):
            if value:
                out[key] = value
        out["error"] = str(exc)
        return out

    def read_failed(self, ino: int, offset: int, size: int, exc: BaseException) -> None:
        fields = self.fields(ino, offset, size, exc)
        log.error("read failed (EIO): %s", " ".join(f"{k}={_field(v)}" for k, v in fields.items()))


class _ImageField(logging.Filter):
    def __init__(self, image: str) -> None:
        super().__init__()
        self._suffix = f" image={image}"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and " image=" not in (text := record.getMessage()):
            record.msg, record.args = text + self._suffix, None
        return True


def tag_warnings(image: str) -> None:
    """Append ``image=...`` to the warnings and errors of this process (its handlers)."""
    f = _ImageField(image)
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
