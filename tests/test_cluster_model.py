"""The cluster model (bench/cluster_model.py) and its simulator: small, fast cases whose
answers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster_model import MiB, Params, simulate
from bench.cluster_sim import Sim

ROOT = Path(__file__).resolve().parent.parent
SMALL = Params(nodes=1, containers=1, image_bytes=64 * MiB, chunks=3200, start_bytes=4 * MiB,
               start_requests=20, resolution=0.0)


def test_two_flows_share_a_link_as_the_analytic_answer() -> None:
    sim = Sim()
    link = sim.net.link(100.0)
    done: dict[str, float] = {}
    sim.net.start(100, link, done=lambda: done.setdefault("a", sim.now))
    sim.at(0.5, lambda: sim.net.start(100, link, done=lambda: done.setdefault("b", sim.now)))
    sim.run()
    # a alone for 0.5 s (50 left), then 50 each at 50/s: a at 1.5 s; b's last 50 alone: 2.0 s
    assert done == pytest.approx({"a": 1.5, "b": 2.0})


def test_a_flow_runs_at_its_narrowest_share_and_its_own_cap() -> None:
    sim = Sim()
    wide, narrow, cpu = sim.net.link(1000.0), sim.net.link(100.0), sim.net.link(2.0)
    done: dict[str, float] = {}
    sim.net.start(100, wide, narrow, done=lambda: done.setdefault("flow", sim.now))
    sim.net.start(100, wide, done=lambda: done.setdefault("other", sim.now))
    sim.net.start(3.0, cpu, max_rate=1.0, done=lambda: done.setdefault("cpu", sim.now))
    sim.run()
    assert done["flow"] == pytest.approx(1.0)  # 100/s on the narrow link
    assert done["other"] == pytest.approx(0.2)  # half of the wide link
    assert done["cpu"] == pytest.approx(3.0)  # one core of two


def test_a_cancelled_flow_frees_its_share() -> None:
    sim = Sim()
    link = sim.net.link(10.0)
    done: dict[str, float] = {}
    f = sim.net.start(100, link, done=lambda: done.setdefault("gone", sim.now))
    sim.net.start(10, link, done=lambda: done.setdefault("kept", sim.now))
    sim.at(1.0, lambda: done.setdefault("moved", sim.net.cancel(f)))
    sim.run()
    assert done["moved"] == pytest.approx(5.0) and "gone" not in done
    assert done["kept"] == pytest.approx(1.5)  # 5 at 5/s, the other 5 alone at 10/s


def test_one_node_takes_the_start_from_the_origin_once() -> None:
    r = simulate(Params(**{**SMALL.__dict__, "containers": 3}))
    assert r["all_ready"] and r["containers_ready"] == 3
    assert r["origin_bytes"] == pytest.approx(SMALL.start_bytes, rel=0.001)
    assert r["peer_requests"] == 0


@pytest.mark.parametrize("nodes", [2, 5, 20])
def test_peers_take_one_copy_from_the_origin_whatever_the_nodes(nodes: int) -> None:
    # without hedges, and owners that queue: a hedge that reaches the origin, or a caller
    # turned away (503) whom the next owner serves, is a second copy of its piece by design
    p = Params(**{**SMALL.__dict__, "nodes": nodes, "containers": 2 * nodes, "hedge_burst": 0,
                  "hedge_budget": 0.0, "server_slots": 0})
    r = simulate(p)
    assert r["all_ready"] and r["hedges"] == 0
    assert r["origin_copies"] == pytest.approx(1.0, abs=0.01)
    without = simulate(Params(**{**p.__dict__, "peers": False}))
    assert without["origin_copies"] == pytest.approx(nodes, rel=0.01)


def test_peers_fill_takes_one_image_from_the_origin() -> None:
    r = simulate(Params(**{**SMALL.__dict__, "nodes": 6, "containers": 6, "fill": True}))
    assert r["all_ready"] and r["fill_max_s"] > r["ready_max_s"]
    assert r["origin_copies"] == pytest.approx(1.0, abs=0.01)


def test_a_failed_owner_costs_but_every_other_node_completes() -> None:
    p = Params(**{**SMALL.__dict__, "nodes": 10, "containers": 30, "fill": True})
    base = simulate(p)
    hit = simulate(Params(**{**p.__dict__, "fail_at": base["ready_p50_s"] / 2}))
    assert hit["failed_node"] is not None and hit["cut"] + hit["refused"] > 0
    assert hit["all_ready"] and hit["containers_ready"] == hit["containers_expected"] == 27
    assert (hit["origin_bytes"] > base["origin_bytes"] * 1.001
            or hit["fill_max_s"] > base["fill_max_s"] * 1.001)


def test_lying_peers_never_make_a_node_ready_with_a_wrong_piece() -> None:
    p = Params(**{**SMALL.__dict__, "nodes": 20, "containers": 20, "liars": 0.1})
    r = simulate(p)
    assert r["wrong_rejected"] > 0  # the liars were asked, and caught
    assert r["all_ready"] and r["nodes_ready_with_wrong_bytes"] == 0
    unchecked = simulate(Params(**{**p.__dict__, "verify": False}))
    assert unchecked["nodes_ready_with_wrong_bytes"] > 0  # what the check keeps out


def test_a_tree_bounds_what_one_owner_serves() -> None:
    p = Params(**{**SMALL.__dict__, "nodes": 60, "containers": 60, "server_slots": 0})
    flat, tree = simulate(p), simulate(Params(**{**p.__dict__, "tree": 4}))
    assert flat["all_ready"] and tree["all_ready"]
    assert tree["origin_copies"] == pytest.approx(1.0, abs=0.01)
    assert tree["ready_max_s"] < flat["ready_max_s"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/cluster_model.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_a_bad_calibration_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = cli("--calibrate", str(tmp_path / "none.json"), "--out", str(tmp_path))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"scenario": "registry"}))
    wrong = cli("--calibrate", str(other), "--out", str(tmp_path))
    for done in (missing, wrong):
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert "not a peers_bench result" in wrong.stderr


def test_the_report_writes_json_markdown_and_a_plot(tmp_path: Path) -> None:
    done = cli("--nodes", "12", "--containers", "24", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "cluster.json").read_text())
    assert out["scenarios"]["peers (today)"]["all_ready"]
    assert "| peers, 1% lying peers |" in (tmp_path / "cluster.md").read_text()
    assert (tmp_path / "cluster.png").stat().st_size > 0
