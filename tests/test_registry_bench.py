"""The registry benchmark's quick mode runs end to end against a real docker-registry and
reports every figure. Only that each figure exists and is positive is checked, never its
value: timings belong in bench/, not in tests. The run checked is the one the session's
``bench/run --quick`` made (``quick_suite``): the suite calls the same ``run(quick=True,
outdir)`` as ``bench/registry_bench.py --quick``."""

from __future__ import annotations

import json
import shutil

import pytest

from testkit.registryd import needs_registry

pytestmark = [pytest.mark.mount, pytest.mark.slow, needs_registry,
              pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")]

FIGURES = {
    "lazy": ["mount_s", "program_s", "total_s", "bytes"],
    "full_pull": ["pull_s", "unpack_s", "program_s", "total_s", "bytes"],
}


@pytest.mark.timeout(1300)  # the session's quick suite may take 1200 s
def test_quick_registry_benchmark_reports_every_figure(quick_suite):
    result = quick_suite.node("registry_bench")
    tmp_path = quick_suite.out / "registry_bench"
    assert json.loads((tmp_path / "registry.json").read_text()) == result
    assert result["quick"] and result["runs"] == 1
    scenarios = result["scenarios"]
    for scenario, figures in FIGURES.items():
        for figure in figures:
            value = scenarios[scenario][figure]
            assert value["min"] > 0 and value["median"] > 0 and value["max"] > 0, (scenario, figure, value)
    for ratio in ("lazy_vs_full_total", "lazy_vs_full_bytes"):
        assert scenarios["ratios"][ratio] > 0
    assert result["image"]["gzip_layers_bytes"] > 0 and result["image"]["lazy_stored_bytes"] > 0
    assert str(tmp_path / "registry.json") in quick_suite.done.stdout
