"""The chunk-size benchmark's quick mode runs end to end and reports every figure for
every chunk size and readahead it measures (the ends of each range). Only that they exist
and are sane is checked, never their values: timings belong in bench/, not in tests."""

from __future__ import annotations

import json

import pytest

from bench import chunk_size

pytestmark = [pytest.mark.mount, pytest.mark.slow]


@pytest.mark.timeout(600)  # a conversion and mounts per chunk size
def test_quick_chunk_size_benchmark_reports_every_figure(tmp_path):
    report = chunk_size.run(True, tmp_path)
    assert json.loads((tmp_path / "chunk_size.json").read_text()) == report
    rows = {(r["chunk_size"], r["readahead_kib"]): r for r in report["rows"]}
    assert (report["chunk_sizes"], report["readaheads_kib"]) == (["1M", "256K"], [1024, 32])
    assert set(rows) == {(c, r) for c in report["chunk_sizes"] for r in report["readaheads_kib"]}
    for row in rows.values():
        assert row["bytes_received"] > 0 and row["requests"] > 0 and row["seconds"] > 0
        assert row["fuse_read_bytes"] > 0 and row["fuse_reads"] > 0
        assert row["chunks_fetched"] >= row["requests"]  # a request fetches one chunk or more
    # smaller chunks: more of them for the same reads
    assert rows[("256K", 1024)]["chunks_fetched"] > rows[("1M", 1024)]["chunks_fetched"]
    # a smaller readahead: more, smaller FUSE reads
    assert rows[("1M", 32)]["fuse_reads"] > rows[("1M", 1024)]["fuse_reads"]
