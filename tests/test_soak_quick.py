"""The soak under faults (bench/soak.py) in its quick mode: every figure is reported, no
read returned a wrong byte or outlived its deadline, and every file reads right once the
faults clear. Its latencies are reported, never checked: timings belong in bench/.
The soak checked is the one the session's ``bench/run --quick`` ran (``quick_suite``):
the suite calls the same ``soak.run(True, outdir)``."""

from __future__ import annotations

import json

import pytest

from bench import soak

pytestmark = [pytest.mark.mount, pytest.mark.slow]


@pytest.mark.timeout(1300)  # the session's quick suite may take 1200 s
def test_quick_soak_reports_every_figure_and_no_wrong_byte(quick_suite):
    report = quick_suite.node("soak")
    assert report["params"]["quick"]
    assert json.loads((quick_suite.out / "soak" / "soak.json").read_text()) == report
    for key in ("reads", "reads_ok", "eio", "short_reads", "wrong_reads", "wrong_bytes", "overdue_reads",
                "overdue_detail", "other_errors", "faults_injected", "chunk_requests", "latency",
                "after_clear"):
        assert key in report, key
    for side in ("all", "ok", "eio"):
        assert set(report["latency"][side]) == {"count", "p50_s", "p99_s", "max_s"}
    assert report["reads"] > 0 and report["reads_ok"] > 0
    assert report["chunk_requests"] > 0 and sum(report["faults_injected"].values()) > 0
    assert report["wrong_bytes"] == 0 and report["wrong_reads"] == 0, report
    assert report["overdue_reads"] == 0 and report["stuck_readers"] == 0, (
        f"overdue {report['overdue_reads']}, stuck {report['stuck_readers']}: "
        f"{report['overdue_detail']}; latency {report['latency']}")
    assert report["other_errors"] == {}, report
    assert report["after_clear"] == {"files": report["params"]["files"], "wrong": 0, "failed": 0}
    assert report["mount_alive"]
    assert soak.passed(report)
    assert "wrong bytes 0" in soak.summary(report)
