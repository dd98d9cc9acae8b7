"""The learned-prefetch benchmark's quick mode runs end to end and reports every figure,
side by side. Only that they exist and are sane is checked, never their values: timings
belong in bench/, not in tests."""

from __future__ import annotations

import json

import pytest

from bench import trace_bench

pytestmark = [pytest.mark.mount, pytest.mark.slow]

FIGURES = ("ready_s", "mount_s", "workload_s", "requests", "mean_request_bytes", "demand_misses")


@pytest.mark.timeout(600)  # mounts and runs of each mode
def test_quick_trace_benchmark_reports_every_figure(tmp_path):
    report = trace_bench.run(True, tmp_path)
    assert json.loads((tmp_path / "trace.json").read_text()) == report
    for side in ("cold", "traced"):
        for key in FIGURES:
            figure = report[side][key]
            assert len(figure["runs"]) == report["params"]["runs"]
            assert figure["min"] <= figure["median"] <= figure["max"]
        assert report[side]["ready_s"]["min"] > 0 and report[side]["requests"]["min"] > 0
    assert report["traced"]["lead_chunks"]["min"] > 0  # the learned trace was used
    assert report["ratios"]["ready_traced_vs_cold"] > 0
    assert trace_bench.table(report).count("\n") >= 6
