"""The snapshotter benchmark's quick mode runs end to end through real containerd and
reports every figure. Timings are only checked to exist: they belong in bench/. Bytes are
behaviour: a lazy pull and run fetches less than the whole lazy image; the complete image
reads as the same tar through lazyfs, overlayfs and memfs; a cold tree read fetches the
whole image; more mounts take more memory; the distinct images mounted for that share their
blobs on disk. The run checked is the one the session's ``bench/run --quick`` made
(``quick_suite``): the suite calls the same ``run(quick=True, outdir)``."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.slow]


@pytest.mark.timeout(1300)  # the session's quick suite may take 1200 s
def test_quick_snapshotter_benchmark_reports_every_figure(request):
    if not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "containerd-shim-runc-v2")):
        pytest.skip("needs containerd, ctr and runc (tests/setup.sh installs them)")
    quick_suite = request.getfixturevalue("quick_suite")
    result = quick_suite.node("snapshotter_bench")
    assert json.loads((quick_suite.out / "snapshotter_bench" / "snapshotter.json").read_text()) == result
    assert result["image"]["name"] == "python"
    # the mounted variants share the image's blobs on disk: what they add is far less than one copy
    assert 0 < result["image"]["variants_own_bytes"] < result["image"]["lazy_stored_bytes"] / 2
    assert len(result["meta"]["loadavg"]["runs"]) == result["meta"]["params"]["runs"]
    for mode in ("lazy", "full_pull", "lazy_in_process"):
        figures = result["modes"][mode]
        for key in ("pull_s", "run_s", "total_s", "registry_bytes", "registry_requests"):
            assert figures[key]["median"] > 0, (mode, key)
    assert result["modes"]["lazy"]["registry_bytes"]["median"] < result["image"]["lazy_stored_bytes"]
    assert result["modes"]["full_pull"]["registry_bytes"]["median"] >= result["image"]["gzip_layers_bytes"]
    assert set(result["ratios"]) >= {"total_lazy_vs_full_pull", "bytes_lazy_vs_full_pull"}
    for name, ratio in result["ratios"].items():
        assert (ratio["median"] if isinstance(ratio, dict) else ratio) > 0, name

    steps = result["pull_breakdown"]["steps_s"]
    assert set(steps) >= {"interpreter_s", "imports_s", "registry_s", "content_store_s",
                          "snapshot_prepare_s", "exit_s"}
    for name, figure in steps.items():
        assert figure["median"] > 0, name
    parts = result["pull_breakdown"]["prepare_parts_s"]
    assert set(parts) == {"to_first_request_s", "mount_registry_s", "index_open_and_fuse_s",
                          "mounted_to_reply_s"}

    complete = result["complete"]
    for scope in ("usr", "whole"):
        modes = ("lazyfs", "overlayfs", "memfs", "memfs_lazyloop")
        for mode in modes:
            assert complete[f"tar_{scope}_s_{mode}"]["median"] > 0, (scope, mode)
        sizes = {complete[f"tar_{scope}_bytes_{mode}"]["median"] for mode in modes}
        assert len(sizes) == 1 and sizes.pop() > 0, scope
    assert complete["tar_whole_bytes_lazyfs"]["median"] > complete["tar_usr_bytes_lazyfs"]["median"]
    for mode in ("lazyfs", "overlayfs"):
        assert complete[f"random_4k_bytes_per_s_{mode}"]["median"] > 0, mode
    pss = complete["pss"]
    counts = result["meta"]["params"]["mount_counts"]
    for key in ("first_mount_bytes", "marginal_per_mount_bytes", "after_whole_read_bytes",
                *(f"mounts_{n}_bytes" for n in counts)):
        assert pss[key]["median"] > 0, key
    assert pss[f"mounts_{max(counts)}_bytes"]["median"] > pss[f"mounts_{min(counts)}_bytes"]["median"]

    cold = result["cold"]
    for key in ("mount_s", "read_s", "total_s", "registry_requests", "requests_per_mib"):
        assert cold[key]["median"] > 0, key
    assert cold["registry_bytes"]["median"] >= result["image"]["lazy_stored_bytes"] * 0.9
    assert cold["tar_bytes"]["median"] == complete["tar_whole_bytes_lazyfs"]["median"]

    assert len(result["goals"]) == 9
    assert all(isinstance(g["met"], bool) and g["value"] > 0 for g in result["goals"])
