"""Learned prefetch, unit level: traces merge by median first-read position, chunks that
stop being read drop out, bad documents are refused, the recorder keeps its window."""

from __future__ import annotations

import json

import pytest

from blockindex.format import Blob, Chunk, ChunkDigest, Span
from cache.trace import KEEP_RUNS, Run, Trace, TraceEntry, TraceError, TraceRecorder, TraceStore

M = "sha256:" + "ab" * 32


def entry(name: str, t: float = 0.0) -> TraceEntry:
    return TraceEntry(chunk=name * 64 if len(name) == 1 else name, file=f"f/{name}", offset=0, t=t, bytes=10)


def run(*names: str) -> Run:
    return Run("2026-01-01T00:00:00Z", 30.0, tuple(entry(n, i / 10) for i, n in enumerate(names)))


def order(trace: Trace) -> list[str]:
    return [e.chunk[0] for e in trace.merged()]


def test_merge_orders_by_median_position():
    trace = Trace(M)
    trace.add_run(run("a", "b", "c", "d"))
    trace.add_run(run("b", "a", "c", "d"))
    trace.add_run(run("b", "a", "d", "c"))
    # median positions: a 1, b 0, c 2, d 3
    assert order(trace) == ["b", "a", "c", "d"]


def test_chunk_not_read_in_the_last_runs_drops_out():
    trace = Trace(M)
    trace.add_run(run("a", "x", "b"))
    for _ in range(KEEP_RUNS - 1):
        trace.add_run(run("a", "b"))
    assert "x" in order(trace)  # still read by a kept run
    trace.add_run(run("a", "b"))
    assert order(trace) == ["a", "b"]  # the run that read x is gone
    assert len(trace.runs) == KEEP_RUNS


def test_new_chunk_joins_in_place():
    trace = Trace(M)
    trace.add_run(run("a", "b", "c"))
    trace.add_run(run("a", "n", "b", "c"))
    assert order(trace) == ["a", "n", "b", "c"]  # n at 1; b at 1.5, c at 2.5


def test_round_trip_and_store(tmp_path):
    store = TraceStore(tmp_path)
    assert store.load(M) is None
    trace = store.add_run(M, run("a", "b"))
    store.add_run(M, run("b", "c"))
    again = store.load(M)
    assert again is not None and len(again.runs) == 2
    assert Trace.parse(trace.to_json(), M).runs == trace.runs
    # written through a temp file beside it and renamed: only the trace itself is left
    assert [p.name for p in (tmp_path / "traces").iterdir()] == [M.removeprefix("sha256:") + ".json"]


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(mediaType="application/json"),
    lambda d: d.update(version=2),
    lambda d: d.update(manifest="sha256:" + "cd" * 32),
    lambda d: d["runs"][0]["entries"][0].update(chunk="zz"),
    lambda d: d["runs"][0]["entries"][0].update(offset=-1),
    lambda d: d["runs"][0]["entries"][0].pop("file"),
    lambda d: d.update(runs="x"),
])
def test_bad_documents_are_refused(mutate):
    doc = json.loads(Trace(M, [run("a")]).to_json())
    mutate(doc)
    with pytest.raises(TraceError):
        Trace.parse(json.dumps(doc).encode(), M)


def test_unreadable_trace_in_the_cache_is_ignored(tmp_path, caplog):
    store = TraceStore(tmp_path)
    store.path(M).write_bytes(b"{not json")
    assert store.load(M) is None
    assert "ignored" in caplog.text


def _chunk(i: int) -> Chunk:
    return Chunk(ChunkDigest(bytes([i]) * 32), Blob(1, "sha256:" + "0" * 64, 100), i * 10, 10, 20, 0)


def test_recorder_keeps_first_reads_in_its_window():
    now = [0.0]
    rec = TraceRecorder(5.0, started=0.0, clock=lambda: now[0])
    c1, c2, c3 = _chunk(1), _chunk(2), _chunk(3)
    rec.read(7, [Span(0, 20, c1, 0), Span(20, 5, None, 0)])
    now[0] = 1.0
    rec.read(8, [Span(100, 20, c2, 0), Span(120, 20, c1, 0)])  # c1 again: not a first read
    now[0] = 6.0
    rec.read(9, [Span(0, 20, c3, 0)])  # past the window
    assert not rec.active
    r = rec.run({7: b"usr/bin/a", 8: b"etc/b"})
    assert r.source == "recorded"
    assert [(e.chunk, e.file, e.offset, e.t) for e in r.entries] == [
        (c1.hexdigest, "usr/bin/a", 0, 0.0), (c2.hexdigest, "etc/b", 100, 1.0)]


def test_recorder_without_window_and_off():
    rec = TraceRecorder(None, started=0.0, clock=lambda: 1e6)
    rec.read(1, [Span(0, 1, _chunk(1), 0)])
    assert rec.recorded == 1 and rec.active
    off = TraceRecorder(0, started=0.0, clock=lambda: 0.0)
    off.read(1, [Span(0, 1, _chunk(1), 0)])
    assert off.recorded == 0


def _run_at(when: str, *names: str) -> Run:
    return Run(when, 30.0, tuple(entry(n, i / 10) for i, n in enumerate(names)))


def test_merge_keeps_each_run_once_and_the_newest():
    shared = _run_at("2026-01-02T00:00:00Z", "a", "b")
    registry = Trace(M, [_run_at("2026-01-01T00:00:00Z", "x"), shared]).labelled("registry")
    peer = Trace(M, [shared, _run_at("2026-01-03T00:00:00Z", "b", "c"),
                     _run_at("2026-01-04T00:00:00Z", "c", "d")]).labelled("peer http://10.0.0.5:7070")
    merged = Trace.merge(M, [registry, peer])
    assert [r.recorded[:10] for r in merged.runs] == ["2026-01-02", "2026-01-03", "2026-01-04"]
    # the run both had is kept once, under the first one's label
    assert [r.source for r in merged.runs] == ["registry", "peer http://10.0.0.5:7070",
                                               "peer http://10.0.0.5:7070"]
    assert "x" not in order(merged)  # the oldest run fell out
    assert Trace.merge(M, [registry]).runs == registry.runs


def test_restrict_drops_chunks_of_other_images():
    trace = Trace(M, [run("a", "z", "b"), run("z", "b")])
    kept, dropped = trace.restrict(lambda hexd: hexd[0] != "z")
    assert dropped == 1 and order(kept) == ["a", "b"]
    assert [len(r.entries) for r in kept.runs] == [2, 1]
    with pytest.raises(TraceError, match="none of its 3 chunks"):
        trace.restrict(lambda hexd: False)


def test_sources_stay_in_the_cache_only():
    trace = Trace(M, [run("a")]).labelled("peer http://10.0.0.5:7070")
    assert Trace.parse(trace.to_json(), M).runs[0].source == "peer http://10.0.0.5:7070"
    leaving = json.loads(trace.to_json(sources=False))
    assert "source" not in leaving["runs"][0]
    assert Trace.parse(trace.to_json(sources=False), M).runs[0].source is None


@pytest.mark.parametrize("mutate", [
    lambda d: d["runs"][0].update(recorded="9999"),
    lambda d: d["runs"][0].update(recorded=5),
    lambda d: d["runs"][0].update(source=["x"]),
    lambda d: d["runs"][0].update(source="x" * 1000),
    lambda d: d["runs"][0].update(window=-1),
    lambda d: d["runs"][0]["entries"][0].update(t=float("inf")),
])
def test_bad_run_fields_are_refused(mutate):
    doc = json.loads(Trace(M, [run("a")]).to_json())
    mutate(doc)
    with pytest.raises(TraceError):
        Trace.parse(json.dumps(doc).encode(), M)
