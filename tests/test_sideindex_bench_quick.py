"""The side index benchmark's quick mode runs end to end against a real docker-registry
and reports every figure for every spacing, beside the lazyfs image and a full pull. Only
that the figures exist and hang together is checked, never their values: timings belong
in bench/, not in tests."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import sideindex_bench
from testkit.registryd import needs_registry

pytestmark = [pytest.mark.mount, pytest.mark.slow, needs_registry,
              pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")]


@pytest.mark.timeout(600)  # the small image pushed, indexed and started at two spacings
def test_quick_sideindex_benchmark_reports_every_figure(tmp_path):
    result = sideindex_bench.run(True, tmp_path)
    assert json.loads((tmp_path / "sideindex.json").read_text()) == result
    assert result["quick"] and result["runs"] == 1
    assert result["image"]["layer_bytes"] > 0 and result["image"]["files"] > 0
    assert all(result["baseline"][k]["median"] > 0 for k in ("gunzip_s", "inflate_s"))
    for case in (result["lazy"], result["full_pull"], result["estargz"]["cold"]):
        assert case["total_s"]["median"] > 0 and case["bytes"]["median"] > 0
    # the eStargz image is read lazily: fewer bytes than the whole image, however small
    assert result["estargz"]["cold_bytes_vs_full"] < 1
    rows = result["spacings"]
    assert [r["label"] for r in rows] == ["512K", "2M"]
    for row in rows:
        assert 0 < row["index_bytes"] and row["checkpoints"] > 0 and row["chunks"] > 0
        assert row["build_s"]["median"] > 0 and row["index_command_s"] > 0
        assert row["cold"]["mount_s"]["median"] > 0 and row["cold"]["bytes"]["median"] > 0
        for ratio in ("index_vs_layers", "build_vs_gunzip", "cold_time_vs_lazy", "cold_bytes_vs_lazy",
                      "cold_time_vs_full", "cold_bytes_vs_full"):
            assert row[ratio] > 0, ratio
    # a closer spacing: more checkpoints, each with its window, so a larger index
    assert rows[0]["checkpoints"] > rows[1]["checkpoints"] and rows[0]["index_bytes"] > rows[1]["index_bytes"]
    goals = result["goals"]
    assert goals.pop("spacing") == 512 << 10
    assert set(goals) == set(sideindex_bench.GOALS)
    assert all(isinstance(g["met"], bool) and g["value"] > 0 for g in goals.values())
    table = (tmp_path / "sideindex.md").read_text()
    for name in ("side index, 512K", "side index, 2M", "eStargz, no side index", "lazyfs format",
                 "full pull"):
        assert f"| {name}" in table, name
