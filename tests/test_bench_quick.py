"""The mount benchmark's quick mode runs end to end and every scenario produces its
figures. Only that they exist and are positive is checked, never their values: timings
belong in bench/, not in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.mount, pytest.mark.slow]

#: scenario -> the figures it must report (dotted paths into mount.json's "scenarios")
FIGURES = {
    "readiness": ["lazy_cold.mount_s", "lazy_cold.first_byte_s", "lazy_cold.program_s",
                  "lazy_warm.program_s", "full_pull.pull_s", "full_pull.program_s",
                  "local_disk.program_s", "ratios.cold_program_vs_full_pull",
                  "ratios.cold_first_byte_vs_full_pull", "ratios.warm_program_vs_local_disk"],
    "bytes": ["origin_bytes", "image_stored_bytes", "gzip_layers_bytes", "ratios.vs_stored",
              "ratios.vs_gzip_layers"],
    "seq_read": ["cold_gbps", "warm_gbps", "hot_gbps", "ceiling_gbps", "ceiling_hot_gbps",
                 "ratios.cold_vs_ceiling", "ratios.warm_vs_ceiling", "ratios.hot_vs_ceiling_hot"],
    "prefetch": ["prefetch_gbps", "curl_gbps", "prefetch_bytes", "ratios.prefetch_vs_curl"],
    "walk": ["lazyfs_s", "ceiling_s", "entries", "ratios.lazyfs_vs_ceiling"],
}


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def test_quick_benchmark_reports_every_figure(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "mount_bench.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "mount.json").read_text())
    scenarios = result["scenarios"]
    missing = []
    for scenario, figures in FIGURES.items():
        for dotted in figures:
            try:
                value = _get(scenarios[scenario], dotted)
            except KeyError:
                missing.append(f"{scenario}.{dotted}")
                continue
            number = value["median"] if isinstance(value, dict) else value
            if isinstance(value, dict):
                assert value["min"] > 0 and value["max"] > 0, (scenario, dotted, value)
            assert isinstance(number, (int, float)) and number > 0, (scenario, dotted, value)
    assert missing == []
    assert "scenario" in done.stdout and str(tmp_path / "mount.json") in done.stdout
