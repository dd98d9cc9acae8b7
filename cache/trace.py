"""Learned prefetch traces: which chunks a workload reads first, and in what order.

A mount records the first read of each chunk during its first seconds (``TraceRecorder``);
one mount's recording is a *run*. ``TraceStore`` keeps an image's last ``KEEP_RUNS`` runs
under the cache root, keyed by the image's manifest digest::

    traces/<manifest hex>.json     {"mediaType": TRACE_MEDIA_TYPE, "version": 1,
                                    "manifest": "sha256:...", "runs": [run, ...]}
    run = {"recorded": "2026-11-22T07:00:00Z", "window": 30.0, "source": "recorded",
           "entries": [{"chunk": "<blake3 hex>", "file": "usr/bin/x", "offset": 0,
                        "t": 0.012, "bytes": 4096}, ...]}        # in first-read order

A run's ``source`` says where this node got it: ``recorded`` (a mount here), ``registry``
(an OCI referrer) or ``peer http://HOST:PORT``. It is kept in the cache only: a trace that
leaves the node (``to_json(sources=False)``: pushed, or served to a peer) carries none,
and whoever receives it labels the runs by where it got them.

``Trace.merged()`` is the order a replay uses: every chunk read by one of the kept runs,
sorted by the median of its positions in the runs that read it (ties by its median time).
A chunk that none of the last ``KEEP_RUNS`` runs read has dropped out with the run that
last read it, so a workload that changes sheds the chunks it stopped reading.

The same document is what ``lazyfs trace push`` attaches to an image in a registry, so a
trace from anywhere (this node, another node, a registry) is parsed by ``Trace.parse``,
which checks every field and size: a trace is a hint, and a bad one is dropped, never
trusted with more than an order of chunks the index already names (``Trace.restrict``
drops the chunks the image does not have).

Traces from several places merge by run (``Trace.merge``): the runs of all of them, each
once, and the newest ``KEEP_RUNS`` by their recording time are kept, so a node that gets
the registry's trace and a peer's newer recordings replays the recent workload.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blockindex.format import Chunk, Span

from .atomic import write_atomic
from .errors import CacheError
from .private import claim

log = logging.getLogger(__name__)

TRACE_MEDIA_TYPE = "application/vnd.lazyfs.trace.v1+json"
VERSION = 1
KEEP_RUNS = 3
"""Runs kept per image: a chunk none of the last three runs read drops out."""
DEFAULT_WINDOW = 30.0
"""Seconds after mounting during which first reads are recorded (``--record-window``)."""
MAX_ENTRIES = 200_000
"""Chunks one run records at most (1 MiB chunks: 200 GB of first reads)."""
MAX_TRACE_BYTES = 32 << 20
"""A trace document larger than this is refused (from disk or from a registry)."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_RECORDED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)?$")
MAX_SOURCE = 300


class TraceError(ValueError):
    """A trace document is malformed, too large, or for another image."""


@dataclasses.dataclass(frozen=True, slots=True)
class TraceEntry:
    """The first read of one chunk in a run."""

    chunk: str
    """BLAKE3 digest of the chunk, hex."""
    file: str
    """A path (relative to the image root) of the file whose read asked for it."""
    offset: int
    """Where in that file the chunk starts."""
    t: float
    """Seconds from the mount to this first read."""
    bytes: int
    """Stored (network) size of the chunk."""


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    recorded: str
    """When the run ended, ``YYYY-MM-DDTHH:MM:SSZ`` (UTC; sorts as text)."""
    window: float | None
    entries: tuple[TraceEntry, ...]
    source: str | None = None
    """Where this node got the run: ``recorded``, ``registry``, ``peer URL``; None: unknown."""

    def same_run(self) -> tuple[str, float | None, tuple[TraceEntry, ...]]:
        """What identifies a run wherever it travelled (its source aside)."""
        return self.recorded, self.window, self.entries


@dataclasses.dataclass
class Trace:
    """The runs recorded for one image (oldest first)."""

    manifest: str
    runs: list[Run] = dataclasses.field(default_factory=list)

    def add_run(self, run: Run, keep: int = KEEP_RUNS) -> None:
        self.runs.append(run)
        del self.runs[:-keep]

    def merged(self) -> list[TraceEntry]:
        """Every chunk of the kept runs once, in merged first-read order (see the module
        docstring). The entry kept for a chunk is the latest run's, with the median time."""
        positions: dict[str, list[int]] = {}
        times: dict[str, list[float]] = {}
        latest: dict[str, TraceEntry] = {}
        for run in self.runs:
            for pos, e in enumerate(run.entries):
                positions.setdefault(e.chunk, []).append(pos)
                times.setdefault(e.chunk, []).append(e.t)
                latest[e.chunk] = e
        order = sorted(latest, key=lambda c: (statistics.median(positions[c]), statistics.median(times[c])))
        return [dataclasses.replace(latest[c], t=round(statistics.median(times[c]), 4)) for c in order]

    def labelled(self, source: str) -> Trace:
        """The same runs, each labelled as got from ``source``."""
        return Trace(self.manifest, [dataclasses.replace(r, source=source) for r in self.runs])

    def restrict(self, known: Callable[[str], bool]) -> tuple[Trace, int]:
        """The trace without the chunks for which ``known(hex digest)`` is false (chunks
        of another image), and how many distinct chunks were dropped. TraceError if no
        chunk is left: such a trace is not for this image, whatever it says."""
        verdict: dict[str, bool] = {}
        runs = []
        for r in self.runs:
            kept = []
            for e in r.entries:
                ok = verdict.get(e.chunk)
                if ok is None:
                    ok = verdict[e.chunk] = known(e.chunk)
                if ok:
                    kept.append(e)
            runs.append(dataclasses.replace(r, entries=tuple(kept)))
        if verdict and not any(verdict.values()):
            raise TraceError(f"none of its {len(verdict)} chunks is a chunk of this image")
        return Trace(self.manifest, runs), sum(not ok for ok in verdict.values())

    @classmethod
    def merge(cls, manifest: str, traces: Sequence[Trace], keep: int = KEEP_RUNS) -> Trace:
        """The runs of ``traces`` (the same run from two places once: the first one's
        label), the newest ``keep`` by recording time, oldest first."""
        seen: set[tuple[str, float | None, tuple[TraceEntry, ...]]] = set()
        runs = []
        for t in traces:
            for r in t.runs:
                if r.same_run() not in seen:
                    seen.add(r.same_run())
                    runs.append(r)
        runs.sort(key=lambda r: r.recorded)  # stable: ties keep the order given
        return cls(manifest, runs[-keep:] if keep else [])

    def to_json(self, *, sources: bool = True) -> bytes:
        """The document; ``sources=False`` for a trace that leaves this node."""
        def run(r: Run) -> dict[str, Any]:
            out: dict[str, Any] = {"recorded": r.recorded, "window": r.window,
                                   "entries": [dataclasses.asdict(e) for e in r.entries]}
            if sources and r.source is not None:
                out["source"] = r.source
            return out

        doc = {"mediaType": TRACE_MEDIA_TYPE, "version": VERSION, "manifest": self.manifest,
               "runs": [run(r) for r in self.runs]}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, manifest: str | None = None) -> Trace:
        """A trace from its JSON bytes; TraceError if anything in it is off, or if it is
        for another manifest than ``manifest`` (when given)."""
        if len(data) > MAX_TRACE_BYTES:
            raise TraceError(f"trace is {len(data)} bytes, over the {MAX_TRACE_BYTES}-byte limit")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TraceError(f"trace is not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("mediaType") != TRACE_MEDIA_TYPE:
            raise TraceError("not a lazyfs trace (wrong mediaType)")
        if doc.get("version") != VERSION:
            raise TraceError(f"trace version {doc.get('version')!r} is not {VERSION}")
        digest = doc.get("manifest")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise TraceError("trace names no valid manifest digest")
        if manifest is not None and digest != manifest:
            raise TraceError(f"trace is for image {digest[:19]}, not {manifest[:19]}")
        runs = doc.get("runs")
        if not isinstance(runs, list) or len(runs) > 64:
            raise TraceError("trace runs are missing or too many")
        return cls(digest, [_parse_run(r) for r in runs])


def _parse_run(r: Any) -> Run:
    if not isinstance(r, dict) or not isinstance(r.get("entries"), list):
        raise TraceError("malformed trace run")
    window = r.get("window")
    if window is not None and (not isinstance(window, (int, float)) or isinstance(window, bool)
                               or not window >= 0):
        raise TraceError("malformed trace window")
    recorded = r.get("recorded", "")
    if not isinstance(recorded, str) or not _RECORDED.match(recorded):
        raise TraceError("malformed trace recording time")
    source = r.get("source")
    if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE
                               or not source.isprintable()):
        raise TraceError("malformed trace run source")
    if len(r["entries"]) > MAX_ENTRIES:
        raise TraceError("trace run has too many entries")
    entries = []
    for e in r["entries"]:
        try:
            entry = TraceEntry(chunk=e["chunk"], file=e["file"], offset=e["offset"], t=e["t"],
                               bytes=e["bytes"])
        except (KeyError, TypeError):
            raise TraceError("malformed trace entry") from None
        if (not isinstance(entry.chunk, str) or not _HEX64.match(entry.chunk)
                or not isinstance(entry.file, str) or len(entry.file) > 4096
                or not isinstance(entry.offset, int) or entry.offset < 0
                or not isinstance(entry.t, (int, float)) or not 0 <= entry.t < math.inf
                or not isinstance(entry.bytes, int) or entry.bytes < 0):
            raise TraceError("malformed trace entry")
        entries.append(entry)
    return Run(recorded, None if window is None else float(window), tuple(entries), source)


class TraceStore:
    """The traces of a node cache: ``CACHE/traces/<manifest hex>.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._dir = self.root / "traces"
        claim(self.root)
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root} is not usable: {exc.strerror}") from exc

    def path(self, manifest: str) -> Path:
        if not _DIGEST.match(manifest):
            raise ValueError(f"malformed manifest digest {manifest!r}")
        return self._dir / (manifest.removeprefix("sha256:") + ".json")

    def load(self, manifest: str) -> Trace | None:
        """The trace kept for this image, or None (absent, or unreadable: logged)."""
        path = self.path(manifest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("trace %s unreadable (%s); ignored", path, exc.strerror)
            return None
        try:
            return Trace.parse(data, manifest)
        except TraceError as exc:
            log.warning("trace %s ignored: %s", path, exc)
            return None

    def save(self, trace: Trace) -> Path:
        path = self.path(trace.manifest)
        try:
            write_atomic(path, [trace.to_json()])
        except OSError as exc:
            raise CacheError(f"cannot write trace {path}: {exc.strerror}") from exc
        return path

    def add_run(self, manifest: str, run: Run) -> Trace:
        """Merge one more run into the image's trace and write it back."""
        trace = self.load(manifest) or Trace(manifest)
        trace.add_run(run)
        self.save(trace)
        return trace


class TraceRecorder:
    """Notes the first read of each chunk by one mount, for ``window`` seconds after
    ``started`` (None: until the mount ends). Plain and cheap: it is called on every read."""

    def __init__(self, window: float | None, *, started: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self.started = clock() if started is None else started
        self._seen: set[bytes] = set()
        self._entries: list[tuple[Chunk, int, int, float]] = []
        self.active = window is None or window > 0

    @property
    def recorded(self) -> int:
        return len(self._entries)

    def read(self, ino: int, spans: Sequence[Span]) -> None:
        """A read asked for ``spans`` of file ``ino``."""
        if not self.active:
            return
        t = self._clock() - self.started
        if self.window is not None and t > self.window:
            self.active = False
            return
        for s in spans:
            c = s.chunk
            if c is None or c.digest in self._seen:
                continue
            if len(self._entries) >= MAX_ENTRIES:
                self.active = False
                return
            self._seen.add(c.digest)
            self._entries.append((c, ino, s.file_offset - s.chunk_offset, t))

    def stop(self) -> None:
        self.active = False

    def run(self, paths: dict[int, bytes]) -> Run:
        """What was recorded, as a run; ``paths`` names the files (``IndexReader.paths``)."""
        entries = tuple(
            TraceEntry(chunk=c.hexdigest, file=paths.get(ino, b"").decode("utf-8", "surrogateescape"),
                       offset=off, t=round(t, 4), bytes=c.stored_size)
            for c, ino, off, t in self._entries)
        recorded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return Run(recorded, self.window, entries, "recorded")

    def inodes(self) -> set[int]:
        return {ino for _, ino, _, _ in self._entries}
