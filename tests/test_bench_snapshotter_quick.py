"""The snapshotter benchmark's quick mode runs end to end through real containerd and
reports every figure. Timings are only checked to exist: they belong in bench/. Bytes are
behaviour: a lazy pull and run fetches less than the whole lazy image."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.slow]


@pytest.mark.timeout(600)  # containerd pulls and runs of each mode
def test_quick_snapshotter_benchmark_reports_every_figure(tmp_path):
    if not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "containerd-shim-runc-v2")):
        pytest.skip("needs containerd, ctr and runc (tests/setup.sh installs them)")
    from bench.snapshotter_bench import run

    result = run(quick=True, outdir=tmp_path)
    assert json.loads((tmp_path / "snapshotter.json").read_text()) == json.loads(json.dumps(result))
    for mode in ("lazy", "full_pull"):
        figures = result["modes"][mode]
        for key in ("pull_s", "run_s", "total_s", "registry_bytes", "registry_requests"):
            assert figures[key]["median"] > 0, (mode, key)
    assert result["modes"]["lazy"]["registry_bytes"]["median"] < result["image"]["lazy_stored_bytes"]
    assert result["modes"]["full_pull"]["registry_bytes"]["median"] >= result["image"]["gzip_layers_bytes"]
    assert set(result["ratios"]) == {"total_lazy_vs_full_pull", "bytes_lazy_vs_full_pull"}
