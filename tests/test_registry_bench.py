"""The registry benchmark's quick mode runs end to end against a real docker-registry and
reports every figure. Only that each figure exists and is positive is checked, never its
value: timings belong in bench/, not in tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.registryd import needs_registry

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.mount, pytest.mark.slow, needs_registry,
              pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")]

FIGURES = {
    "lazy": ["mount_s", "program_s", "total_s", "bytes"],
    "full_pull": ["pull_s", "unpack_s", "program_s", "total_s", "bytes"],
}


@pytest.mark.timeout(400)  # its subprocess may take 300 s
def test_quick_registry_benchmark_reports_every_figure(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "registry_bench.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "registry.json").read_text())
    scenarios = result["scenarios"]
    for scenario, figures in FIGURES.items():
        for figure in figures:
            value = scenarios[scenario][figure]
            assert value["min"] > 0 and value["median"] > 0 and value["max"] > 0, (scenario, figure, value)
    for ratio in ("lazy_vs_full_total", "lazy_vs_full_bytes"):
        assert scenarios["ratios"][ratio] > 0
    assert result["image"]["gzip_layers_bytes"] > 0 and result["image"]["lazy_stored_bytes"] > 0
    assert str(tmp_path / "registry.json") in done.stdout
