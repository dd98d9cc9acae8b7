"""The prefetch CPU benchmark runs end to end on a tiny image, against a baseline tree
taken from git: every figure is there for both trees. Its figures are not checked (they
belong in bench/), only that they were measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.mount, pytest.mark.slow]


@pytest.mark.timeout(700)  # its subprocess may take 600 s
def test_prefetch_cpu_benchmark_measures_both_trees(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "prefetch_cpu.py"), "--mib", "24",
                           "--runs", "1", "--reads", "20", "--baseline", "HEAD", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "prefetch_cpu.json").read_text())
    assert out["blob_bytes"] > 0 and out["curl_mb_per_s"] > 0
    assert [name.split()[0] for name in out["trees"]] == ["baseline", "this"]
    for name, tree in out["trees"].items():
        [fill] = tree["fills"]
        assert fill["cpu_seconds"] > 0 and fill["mb_per_s"] > 0, (name, fill)
        assert tree["read_ms_idle_no_prefetch"]["n"] == 20, (name, tree)
        busy = tree["read_ms_while_prefetching"]  # None when the prefetch finished first
        assert busy is None or 0 < busy["p50"] <= busy["p99"], (name, busy)
    assert "| this |" in done.stdout
