"""Runs of the cluster model (``bench/cluster_model.py``): the scenarios at 1,000 nodes,
the comparison with DADI and FaaSNet, and the calibration against ``peers_bench``.

    python3 bench/cluster_report.py                         # scenarios, 1,000 nodes
    python3 bench/cluster_report.py --nodes 200 --containers 2000
    python3 bench/cluster_report.py --calibrate bench/results/<UTC>/peers_bench/peers.json

Writes ``cluster.json``, ``cluster.md`` and ``cluster.png`` (or ``calibration.*``) to
``--out`` (default ``bench/results/<UTC>/cluster_model/``). Exit code 2 with one line for a
calibration file that is missing or is not a peers_bench result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster_model import MiB, Params, simulate  # noqa: E402

OTHERS = {
    "DADI": {"containers": 10000, "nodes": 1000, "seconds": 4.0,
             "how": "P2P tree per layer blob, nodes fetch from parents (USENIX ATC '20)"},
    "FaaSNet": {"containers": 2500, "nodes": 1000, "seconds": 8.3,
                "how": "a function tree per image over the VMs, each VM forwards to its children "
                       "(USENIX ATC '21)"},
}
"""Published cold starts of one image on 1,000 hosts (as their papers report them)."""


def with_tree(base: Params) -> Params:
    """What the design would need at 1,000 nodes: owners that queue instead of answering
    503, and a fan-out of 4 below each owner (with today's batches of 64 chunks)."""
    return dataclasses.replace(base, server_slots=0, tree=4)


def scenarios(base: Params, fail_today: float, fail_tree: float) -> dict[str, Params]:
    """What the report runs: today's design, its faults, and what would change the answer;
    an owner fails at half the p50 time to ready of the design it is in."""
    r = dataclasses.replace
    tree = with_tree(base)
    return {
        "no peers": r(base, peers=False),
        "peers (today)": base,
        "peers, owner fails mid-run": r(base, fail_at=fail_today),
        "peers, 1% lying peers": r(base, liars=0.01),
        "peers, one chunk a request (before batches)": r(base, chunks_per_request=1),
        "peers, owners queue (no 503)": r(base, server_slots=0),
        "tree fan-out 4 + owners queue": tree,
        "the tree, its busiest owner fails mid-run": r(tree, fail_at=fail_tree),
        "the tree, 1% lying peers": r(tree, liars=0.01),
    }


def run_scenarios(base: Params) -> dict[str, Any]:
    out: dict[str, Any] = {}
    first: dict[Params, dict[str, Any]] = {}
    for p in (base, with_tree(base)):
        began = time.process_time()
        first[p] = simulate(p)
        first[p]["cpu_s"] = round(time.process_time() - began, 1)
    fails = [max(0.01, r["ready_p50_s"] / 2) for r in first.values()]
    for name, p in scenarios(base, *fails).items():
        began = time.process_time()
        res = first[p] if p in first else simulate(p)
        res.setdefault("cpu_s", round(time.process_time() - began, 1))
        res["params"] = {k: v for k, v in dataclasses.asdict(p).items() if v != getattr(Params(), k)}
        out[name] = res
        print(f"{name}: ready p50 {res['ready_p50_s']:.2f} s, p99 {res['ready_p99_s']:.2f} s, origin "
              f"{res['origin_copies']:.2f}x ({res['cpu_s']} s)", flush=True)
    return out


def compare(base: Params) -> dict[str, Any]:
    """Our design, today's and the tree variant, at each published system's scale."""
    out: dict[str, Any] = {}
    for name, o in OTHERS.items():
        p = dataclasses.replace(base, nodes=o["nodes"], containers=o["containers"])
        today = simulate(p)
        tree = simulate(with_tree(p))
        out[name] = {**o, "ours_today_max_s": today["ready_max_s"], "ours_today_origin_copies":
                     today["origin_copies"], "ours_tree_max_s": tree["ready_max_s"],
                     "ours_tree_origin_copies": tree["origin_copies"]}
    return out


# -- calibration against peers_bench ---------------------------------------------------------

class CalibrationError(Exception):
    pass


def load_measurement(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        data["params"]["nodes"], data["results"]["peers"], data["params"]["image_stored_bytes"]
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read {path}: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise CalibrationError(f"{path} is not a peers_bench result (no {exc})") from exc
    if data.get("scenario") != "peers":
        raise CalibrationError(f"{path} is not a peers_bench result (scenario {data.get('scenario')!r})")
    return data


def bench_params(m: dict[str, Any], n: int, peers: bool, **fit: float) -> Params:
    """The model of one peers_bench run: ``n`` nodes on one machine (its cores shared by
    all), loopback links, the origin capped and delayed as measured, the prefetch on."""
    mp = m["params"]
    stored = int(mp["image_stored_bytes"])
    chunks = int(mp.get("image_chunks") or max(1, round(stored / (19 << 10))))
    rate = float(mp.get("origin_mibps") or 0) * MiB or 1e12
    return Params(nodes=n, containers=n, image_bytes=stored, chunks=chunks, fill=True, peers=peers,
                  start_bytes=min(stored, int(fit.get("start_bytes", 6 * MiB))), start_requests=30,
                  fill_request=4 * MiB, node_bps=2e9, node_rtt=0.0002, origin_bps=rate,
                  origin_rtt=0.0002 + float(mp.get("origin_delay") or 0.0),
                  shared_cores=int(m.get("machine", {}).get("cpus") or 2),
                  request_cost=fit["request_cost"], recv_cost=fit["recv_cost"], mount_cpu=fit["mount_cpu"],
                  start_cpu=fit["start_cpu"], resolution=0.0005)


def measured(m: dict[str, Any], mode: str, n: int) -> dict[str, float]:
    r = m["results"][mode][str(n)]
    return {"program_s": r["program_s"]["median"], "cache_complete_s": r["cache_complete_s"]["median"],
            "origin_mib": r["origin_bytes"]["median"] / MiB}


def modelled(m: dict[str, Any], mode: str, n: int, fit: dict[str, float]) -> dict[str, float]:
    r = simulate(bench_params(m, n, mode == "peers", **fit))
    return {"program_s": r["ready_max_s"], "cache_complete_s": r["fill_max_s"],
            "origin_mib": r["origin_bytes"] / MiB}


GRID = {"request_cost": (0.0005, 0.001, 0.002, 0.004), "recv_cost": (0.0, 0.0005, 0.001, 0.002),
        "mount_cpu": (0.2, 0.4), "start_cpu": (0.3, 0.6, 1.0)}
"""CPU costs fitted to the measurement (seconds): per peer request served, per chunk
received, per mount, per program start."""


def calibrate(m: dict[str, Any]) -> dict[str, Any]:
    """Fit the model's CPU costs to the measurement (least squared log error over every
    N and mode), then set model and measurement side by side."""
    counts = [n for n in m["params"]["nodes"]]
    modes = [k for k in ("peers", "no_peers") if k in m["results"]]

    def error(fit: dict[str, float]) -> float:
        e = 0.0
        for mode, n in itertools.product(modes, counts):
            got, want = modelled(m, mode, n, fit), measured(m, mode, n)
            e += sum(math.log(max(got[k], 1e-3) / max(want[k], 1e-3)) ** 2
                     for k in ("program_s", "cache_complete_s"))
        return e

    fits = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    best = min(fits, key=error)
    rows = []
    for n, mode in itertools.product(counts, modes):
        rows.append({"nodes": n, "mode": mode, "measured": measured(m, mode, n),
                     "model": modelled(m, mode, n, best)})
    return {"fit": best, "fit_error": error(best), "rows": rows,
            "measurement": {"when": m.get("when"), "image": m["params"].get("image"),
                            "origin_mibps": m["params"].get("origin_mibps")}}


# -- writing it down --------------------------------------------------------------------------

def fmt(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def markdown(out: dict[str, Any]) -> str:
    lines = []
    if "scenarios" in out:
        p = out["params"]
        lines += [f"{p['nodes']:,} nodes, {p['containers']:,} containers, "
                  f"image {p['image_bytes'] / MiB:.0f} MiB "
                  f"({p['chunks']:,} chunks), a start reads {p['start_bytes'] / MiB:.0f} MiB in "
                  f"{p['start_requests']} requests; nodes {p['node_bps'] * 8 / 1e9:g} Gbit/s, origin "
                  f"{p['origin_bps'] * 8 / 1e9:g} Gbit/s", "",
                  "| scenario | ready p50 s | ready p99 s | origin (x start) | fill p99 s | origin (x image) "
                  "| peer requests | 503s | lies caught |", "|" + " --- |" * 9]
        for name, r in out["scenarios"].items():
            fill = out.get("fill", {}).get(name, {})
            lines.append(f"| {name} | {fmt(r['ready_p50_s'])} | {fmt(r['ready_p99_s'])} | "
                         f"{fmt(r['origin_copies'])} | {fmt(fill.get('fill_p99_s', math.nan))} | "
                         f"{fmt(fill.get('origin_copies', math.nan))} | {r['peer_requests']:,} | "
                         f"{r['busy']:,} | {r['wrong_rejected']:,} |")
    if "others" in out:
        lines += ["", "| system | containers / hosts | published s | ours today: last ready s (origin x) "
                      "| ours with a tree: last ready s (origin x) |", "| --- | --- | --- | --- | --- |"]
        for name, o in out["others"].items():
            lines.append(f"| {name} | {o['containers']:,} / {o['nodes']:,} | {o['seconds']} | "
                         f"{fmt(o['ours_today_max_s'])} ({fmt(o['ours_today_origin_copies'], 1)}) | "
                         f"{fmt(o['ours_tree_max_s'])} ({fmt(o['ours_tree_origin_copies'], 1)}) |")
    if "calibration" in out:
        c = out["calibration"]
        lines += [f"fitted CPU seconds: {c['fit']}", "",
                  "| nodes | mode | program s, measured / model | cache complete s, measured / model "
                  "| origin MiB, measured / model |", "| --- | --- | --- | --- | --- |"]
        for r in c["rows"]:
            a, b = r["measured"], r["model"]
            lines.append(f"| {r['nodes']} | {r['mode']} | {fmt(a['program_s'])} / {fmt(b['program_s'])} | "
                         f"{fmt(a['cache_complete_s'])} / {fmt(b['cache_complete_s'])} | "
                         f"{fmt(a['origin_mib'], 1)} / {fmt(b['origin_mib'], 1)} |")
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if "calibration" in out:
        rows = out["calibration"]["rows"]
        for mode, color in (("peers", "tab:blue"), ("no_peers", "tab:orange")):
            sel = [r for r in rows if r["mode"] == mode]
            xs = [r["nodes"] for r in sel]
            for key, style in (("program_s", "o"), ("cache_complete_s", "s")):
                ax.plot(xs, [r["measured"][key] for r in sel], style + "-", color=color,
                        label=f"{mode} {key} measured")
                ax.plot(xs, [r["model"][key] for r in sel], style + ":", color=color,
                        label=f"{mode} {key} model")
        ax.set(xlabel="nodes", ylabel="seconds", title="cluster model against peers_bench")
    else:
        for name, r in out["scenarios"].items():
            ax.plot(r["ready_cdf"], [i / (len(r["ready_cdf"]) - 1) for i in range(len(r["ready_cdf"]))],
                    label=name)
        ax.set(xscale="log", xlabel="seconds to ready (log)", ylabel="fraction of containers",
               title=f"model: {out['params']['containers']:,} containers on {out['params']['nodes']:,} nodes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: dict[str, Any], outdir: Path, stem: str) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{stem}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (outdir / f"{stem}.md").write_text(markdown(out))
    plot(out, outdir / f"{stem}.png")
    print(markdown(out))
    print(f"wrote {outdir / stem}.json, .md and .png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=Params.nodes)
    ap.add_argument("--containers", type=int, default=Params.containers)
    ap.add_argument("--fill", action="store_true", help="also model every node's full fill")
    ap.add_argument("--compare", action="store_true", help="also run DADI's and FaaSNet's scales")
    ap.add_argument("--calibrate", type=Path, metavar="FILE", help="a peers_bench peers.json")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.nodes < 1 or a.containers < 0:
        print("cluster_report: --nodes must be at least 1 and --containers not negative", file=sys.stderr)
        return 2
    utc = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    outdir = a.out or ROOT / "bench" / "results" / utc / "cluster_model"
    if a.calibrate:
        try:
            m = load_measurement(a.calibrate)
        except CalibrationError as exc:
            print(f"cluster_report: {exc}", file=sys.stderr)
            return 2
        write({"when": utc, "calibration": calibrate(m)}, outdir, "calibration")
        return 0
    base = Params(nodes=a.nodes, containers=a.containers)
    out: dict[str, Any] = {"when": utc, "params": dataclasses.asdict(base), "scenarios": run_scenarios(base)}
    if a.fill:
        out["fill"] = run_scenarios(dataclasses.replace(base, fill=True))
    if a.compare:
        out["others"] = compare(base)
    write(out, outdir, "cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
