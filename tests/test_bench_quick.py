"""The mount benchmark's quick mode runs end to end and every scenario produces its
figures. Only that they exist and are positive is checked, never their values: timings
belong in bench/, not in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import nodes

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


@pytest.mark.timeout(400)  # its subprocess may take 300 s
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


#: the suite (bench/run): scenario -> figures it must report (dotted paths into suite.json)
SUITE_FIGURES = {
    "readiness": [f"modes.{mode}.{key}" for mode in ("full_pull", "lazy_cold", "lazy_cold_prefetch",
                                                      "lazy_warm", "lazy_warm_mounted", "local_disk")
                  for key in ("sh_s", "python_s")]
    + ["ratios.cold_vs_full_pull", "ratios.warm_vs_local_disk", "ratios.warm_mounted_vs_local_disk",
       "ratios.mount_s"],
    "bytes": ["lazy_cold_origin_bytes", "link_bytes.full_pull", "link_bytes.lazy_cold",
              "image_stored_bytes", "gzip_layers_bytes", "image_file_bytes",
              "ratios.cold_origin_vs_stored"],
    "prefetch": ["fill_bytes_per_s", "curl_bytes_per_s", "link_nominal_bytes_per_s",
                 "read_latency_s.idle_no_prefetch.p50", "read_latency_s.idle_no_prefetch.p99",
                 "read_latency_s.cache_complete.p99", "ratios.fill_vs_link"],
    "throughput": [f"{kind}.{mode}" for kind in ("seq_bytes_per_s", "random_4k_bytes_per_s")
                   for mode in ("lazy_cold", "lazy_warm", "local_disk", "memfs")]
    + [f"walk_s.{k}" for k in ("lazy_debian", "local_debian", "lazy_many", "memfs_many")]
    + ["ratios.seq_warm_vs_memfs"],
    "decompress": ["gunzip_cpu_s", "lz4_cpu_s", "zstd_cpu_s", "ratios.gunzip_vs_lz4",
                   "ratios.zstd_vs_lz4_per_gib", "stored_bytes.gzip", "stored_bytes.lz4",
                   "stored_bytes.zstd", "cpu_s_per_gib.zstd"],
    "others": ["rclone.readiness.python_s", "rclone.readiness.link_bytes",
               "rclone.seq_bytes_per_s.cold", "rclone.seq_bytes_per_s.warm",
               "httpdirfs.seq_bytes_per_s.cold", "httpdirfs.seq_bytes_per_s.warm"],
}


def _positive(where: str, value) -> None:
    number = value["median"] if isinstance(value, dict) and "median" in value else value
    if isinstance(value, dict) and "median" in value:
        assert value["min"] > 0 and value["max"] > 0, (where, value)
    assert isinstance(number, (int, float)) and number > 0, (where, value)


#: what may report a status other than "ok" in a quick run, and how that status starts.
#: Anything else that says "not available", "not present", "cannot run" or "failed" is
#: a scenario the run skipped: the test fails (the README's Measured section says why
#: these are expected).
INTENDED = {
    # httpdirfs presents every file with mode 0444, so /bin/sh cannot be executed in its
    # mount: its readiness cannot be measured (its sequential reads are)
    "others.httpdirfs.readiness": "cannot run programs: ",
}


def _statuses(tree, where: str = ""):
    """(dotted path, status) of every entry of the results that reports one."""
    if isinstance(tree, dict):
        if isinstance(tree.get("status"), str):
            yield where, tree["status"]
        for key, value in tree.items():
            yield from _statuses(value, f"{where}.{key}" if where else key)


@pytest.mark.timeout(1300)  # the session's quick suite may take 1200 s
def test_quick_suite_reports_every_scenario(quick_suite):
    """``bench/run --quick`` (the same code as the full suite, tiny inputs) runs every
    scenario, reports each figure, writes the summary and the plots; nothing is skipped
    but what ``INTENDED`` lists. (Each node benchmark's own figures are checked by its own
    test, on this same run.)"""
    done, tmp_path = quick_suite.done, quick_suite.out
    assert done.returncode == 0, done.stderr[-3000:]
    result = quick_suite.result()
    scenarios = result["scenarios"]
    missing = []
    for scenario, figures in SUITE_FIGURES.items():
        for dotted in figures:
            try:
                value = _get(scenarios[scenario], dotted)
            except KeyError:
                missing.append(f"{scenario}.{dotted}")
                continue
            _positive(f"{scenario}.{dotted}", value)
    assert missing == []
    assert "python_s" in scenarios["readiness"]["modes"]["lazy_recorded"]
    assert set(scenarios["nodes"]) == set(nodes.MODULES)
    not_run = {where: status for where, status in _statuses(scenarios)
               if status != "ok" and not status.startswith(INTENDED.get(where, "\0"))}
    assert not_run == {}, "scenarios that did not run"
    plots = ["readiness.png", "throughput.png", "prefetch.png"]
    summary = (tmp_path / "summary.md").read_text()
    if scenarios["nodes"].get("peers_bench", {}).get("status") == "ok" \
            and "no concurrency rows" not in summary:
        plots.append("concurrency.png")
    for name in plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "## Goals" in summary and "readiness.png" in summary
    assert result["meta"]["failed"] == [] and result["meta"]["link"]["mbit"] > 0
