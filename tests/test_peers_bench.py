"""The peers benchmark's quick mode runs end to end: every figure is there for 1 and 2
nodes in each arrangement (peers, no peers, a site mirror, Dragonfly-style node proxies),
and the plot is drawn. Timings are not checked (they belong in
bench/); what peers must do to the origin's load is, since it does not depend on speed.
The run checked is the one the session's ``bench/run --quick`` made (``quick_suite``): the
suite calls the same ``run(quick=True, outdir)`` as ``bench/peers_bench.py --quick``."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.slow]

MODES = ["peers", "no_peers", "mirror", "proxy"]
FIGURES = ["program_s", "ready_p50_s", "cache_complete_s", "mounted_s", "origin_sent_bytes",
           "origin_requests", "node_cpu_s", "origin_vs_one_node"]
RATIOS = ["program_peers_vs_no_peers", "cache_complete_peers_vs_no_peers", "origin_bytes_peers_vs_no_peers"]


@pytest.mark.timeout(1300)  # the session's quick suite may take 1200 s
def test_quick_peers_benchmark_reports_every_figure_and_draws_the_plot(quick_suite):
    out = quick_suite.node("peers_bench")
    tmp_path = quick_suite.out / "peers_bench"
    assert json.loads((tmp_path / "peers.json").read_text()) == out
    assert out["params"]["nodes"] == [1, 2]
    stored = out["params"]["image_stored_bytes"]
    assert stored > 0
    assert out["params"]["image_chunks"] > 0  # what bench/cluster_model.py --calibrate reads
    assert out["params"]["modes"] == MODES
    assert sorted(out["results"]) == sorted(MODES)
    for mode in MODES:
        for n in ("1", "2"):
            r = out["results"][mode][n]
            for figure in FIGURES:
                assert r[figure]["median"] > 0 and len(r[figure]["runs"]) == 1, (mode, n, figure, r)
            assert r["ready_p50_s"]["median"] <= r["program_s"]["median"]
    for n in ("1", "2"):
        assert all(out["ratios"][n][k] > 0 for k in RATIOS), out["ratios"][n]
    # every node's cache was completed from about one copy at the origin with peers, two
    # without. Two nodes starting a 2 MiB image in the same instant on a busy machine can
    # both fetch a few chunks (a peer slower than the hedge delay is hedged to the origin),
    # so the bound here is looser than the 1.1x that tests/test_peers.py holds six nodes to.
    assert out["results"]["peers"]["2"]["origin_bytes"]["median"] <= 1.5 * stored
    assert out["results"]["no_peers"]["2"]["origin_bytes"]["median"] >= 1.9 * stored
    assert out["results"]["peers"]["2"]["peer_bytes"]["median"] > 0
    # how often the origin was asked past the peers is counted, for the README to say
    for key in ("origin_after_peers", "hedged", "hedge_wins", "stalled", "peer_failures"):
        assert out["results"]["peers"]["2"][key]["median"] >= 0
        assert out["results"]["no_peers"]["2"][key]["median"] == 0  # no peers: nothing past them
    assert out["results"]["no_peers"]["2"]["origin_requests"]["median"] > 0
    # the mirror and the node proxies each ran: a site cache filled (the mirror's whole
    # blobs; the seed's slices), every node proxy kept its own copy of the chunks, and the
    # origin sent the image about once for two nodes (the caches lock each blob or slice)
    for mode in ("mirror", "proxy"):
        r = out["results"][mode]["2"]
        assert r["site_cache_bytes"]["median"] >= stored, (mode, r)
        assert r["origin_sent_bytes"]["median"] <= 1.5 * out["params"]["one_node_needs_bytes"], (mode, r)
        assert r["peer_bytes"]["median"] == 0
    assert out["results"]["proxy"]["2"]["node_proxy_cache_bytes"]["median"] >= stored
    assert out["results"]["mirror"]["2"]["node_proxy_cache_bytes"]["median"] == 0
    png = tmp_path / out["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(tmp_path / "peers.json") in quick_suite.done.stdout
