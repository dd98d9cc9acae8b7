"""The suite's results for people: ``summary.md`` (one table, with the issue's goals marked
met or missed) and PNG plots (``readiness.png``, ``throughput.png``, ``prefetch.png``,
``concurrency.png`` when the peers benchmark reported one), written next to ``suite.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_LABELS = {
    "full_pull": "full pull", "lazy_cold": "lazyfs cold", "lazy_cold_prefetch": "lazyfs cold+prefetch",
    "lazy_recorded": "lazyfs recorded order", "lazy_warm": "lazyfs warm",
    "lazy_warm_mounted": "lazyfs warm, mounted already", "local_disk": "local disk",
    "rclone": "rclone (vfs full)", "httpdirfs": "httpdirfs",
}


def _ok(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and not str(d.get("status", "ok")).startswith(
        ("failed", "not ", "cannot"))


def _sec(st: dict[str, Any]) -> tuple[str, str]:
    return f"{st['median']:.2f} s", f"{st['min']:.2f}-{st['max']:.2f}"


def _rate(st: dict[str, Any]) -> tuple[str, str]:
    return f"{st['median'] / 1e6:.0f} MB/s", f"{st['min'] / 1e6:.0f}-{st['max'] / 1e6:.0f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def goals(s: dict[str, Any]) -> list[tuple[str, float | None, str, bool | None]]:
    """(goal, measured ratio, target, met) for each goal of the issue."""

    def get(*path: str) -> float | None:
        d: Any = s
        for k in path:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d if isinstance(d, (int, float)) else None

    rows = [
        ("cold readiness / full pull", get("readiness", "ratios", "cold_vs_full_pull"), "<= 0.1",
         lambda v: v <= 0.1),
        ("bytes before readiness / image", get("bytes", "ratios", "cold_origin_vs_stored"), "<= 5%",
         lambda v: v <= 0.05),
        ("warm readiness / local disk", get("readiness", "ratios", "warm_vs_local_disk"), "<= 1.2x",
         lambda v: v <= 1.2),
        ("prefetch rate / link", get("prefetch", "ratios", "fill_vs_link"), ">= 0.8",
         lambda v: v >= 0.8),
        ("warm sequential / in-memory ceiling", get("throughput", "ratios", "seq_warm_vs_memfs"),
         ">= 0.5", lambda v: v >= 0.5),
    ]
    return [(name, v, target, None if v is None else ok(v)) for name, v, target, ok in rows]


def table(r: dict[str, Any]) -> str:
    s = r["scenarios"]
    rows: list[tuple[str, ...]] = []
    rd = s.get("readiness", {})
    if _ok(rd):
        for mode, d in rd["modes"].items():
            if not _ok(d):
                rows.append((f"readiness: {MODE_LABELS[mode]}", str(d.get("status")), "", ""))
                continue
            rows.append((f"readiness: {MODE_LABELS[mode]}, python3 done", *_sec(d["python_s"]),
                         f"sh done {d['sh_s']['median']:.2f} s"))
        rt = rd["ratios"]
        rows.append(("readiness ratio: lazyfs cold / full pull", f"{rt['cold_vs_full_pull']:.2f}", "",
                     f"with prefetch {rt['cold_prefetch_vs_full_pull']:.2f}"))
        rows.append(("readiness ratio: lazyfs warm / local disk", f"{rt['warm_vs_local_disk']:.2f}x", "",
                     f"+{rt['warm_minus_local_disk_s']:.2f} s, `lazyfs mount` {rt['mount_s']:.2f} s"))
        rows.append(("readiness ratio: lazyfs warm, mounted already / local disk",
                     f"{rt['warm_mounted_vs_local_disk']:.2f}x", "", "the FUSE read path alone"))
    by = s.get("bytes", {})
    if _ok(by):
        o = by["lazy_cold_origin_bytes"]
        rows.append(("bytes fetched before readiness (lazyfs cold)", _mib(o["median"]),
                     f"{_mib(o['min'])}-{_mib(o['max'])}",
                     f"{by['ratios']['cold_origin_vs_stored']:.1%} of {_mib(by['image_stored_bytes'])} "
                     f"stored; {by['ratios']['cold_origin_vs_file_bytes']:.1%} of "
                     f"{_mib(by['image_file_bytes'])} of files"))
        for mode, st in by["link_bytes"].items():
            rows.append((f"bytes over the link: {MODE_LABELS[mode]}", _mib(st["median"]), "", ""))
    pf = s.get("prefetch", {})
    if _ok(pf):
        rows.append(("prefetch to complete (from mount)", *_rate(pf["fill_bytes_per_s"]),
                     f"{pf['ratios']['fill_vs_link']:.2f} of the link, "
                     f"{pf['ratios']['fill_vs_curl']:.2f} of curl"))
        rows.append(("curl, the same blobs in sequence", *_rate(pf["curl_bytes_per_s"]),
                     f"{pf['ratios']['curl_vs_link']:.2f} of the link"))
        for k, d in pf["read_latency_s"].items():
            if "p50" in d:
                rows.append((f"4 KiB read latency, {k.replace('_', ' ')}",
                             f"p50 {d['p50'] * 1e3:.1f} ms", f"p99 {d['p99'] * 1e3:.1f} ms",
                             f"n={d['n']}"))
    tp = s.get("throughput", {})
    if _ok(tp):
        for mode, st in tp["seq_bytes_per_s"].items():
            rows.append((f"sequential: {mode.replace('_', ' ')}", *_rate(st), ""))
        for mode, st in tp["random_4k_bytes_per_s"].items():
            rows.append((f"random 4 KiB: {mode.replace('_', ' ')}", f"{st['median'] / 4096:.0f} reads/s",
                         f"{st['min'] / 4096:.0f}-{st['max'] / 4096:.0f}", ""))
        rt = tp["ratios"]
        rows.append(("sequential warm / memfs ceiling", f"{rt['seq_warm_vs_memfs']:.2f}", "",
                     f"{rt['seq_warm_vs_local_disk']:.2f} of local disk"))
        for mode, st in tp["walk_s"].items():
            rows.append((f"walk: {mode.replace('_', ' ')}", *_sec(st), ""))
        rows.append(("walk ratios", f"{rt['walk_debian_vs_local_disk']:.1f}x local disk", "",
                     f"{rt['walk_many_vs_memfs']:.2f}x memfs (many files)"))
    dc = s.get("decompress", {})
    if _ok(dc):
        rows.append(("CPU decompressing: gunzip of the layers", *_sec(dc["gunzip_cpu_s"]), ""))
        rows.append(("CPU decompressing: lz4 of the chunks", *_sec(dc["lz4_cpu_s"]),
                     f"gunzip costs {dc['ratios']['gunzip_vs_lz4']:.1f}x"))
        rows.append(("CPU decompressing: zstd of the chunks", *_sec(dc["zstd_cpu_s"]),
                     f"{dc['ratios']['zstd_vs_lz4_per_gib']:.1f}x lz4 per GiB"))
        pg, sb = dc["cpu_s_per_gib"], dc["stored_bytes"]
        rows.append(("CPU s per GiB: gunzip / lz4 / zstd", f"{pg['gunzip']:.2f} / {pg['lz4']:.2f} / "
                     f"{pg['zstd']:.2f}", "", ""))
        rows.append(("stored: gzip layers / lz4 / zstd chunks", f"{_mib(sb['gzip'])} / {_mib(sb['lz4'])} / "
                     f"{_mib(sb['zstd'])}", "", f"zstd {dc['ratios']['zstd_stored_vs_gzip']:.2f}x gzip"))
    ot = s.get("others", {})
    for tool, d in ot.items() if isinstance(ot, dict) else []:
        if not _ok(d):
            rows.append((tool, str(d.get("status")), "", ""))
            continue
        if _ok(d["readiness"]):
            rows.append((f"readiness: {MODE_LABELS[tool]}, python3 done", *_sec(d["readiness"]["python_s"]),
                         f"{_mib(d['readiness']['link_bytes']['median'])} over the link"))
        else:
            rows.append((f"readiness: {MODE_LABELS[tool]}", str(d["readiness"]["status"])[:160], "", ""))
        rows.append((f"sequential: {MODE_LABELS[tool]} cold", *_rate(d["seq_bytes_per_s"]["cold"]), ""))
        rows.append((f"sequential: {MODE_LABELS[tool]} warm", *_rate(d["seq_bytes_per_s"]["warm"]), ""))
    nd = s.get("nodes", {})
    for name, d in nd.items() if isinstance(nd, dict) else []:
        rows.append((f"nodes: {name}", str(d.get("status"))[:120], "", ""))
        if name == "soak" and d.get("status") == "ok":
            sk, lat = d["result"], d["result"]["latency"]["all"]
            rows.append(("soak under faults: reads, EIO, wrong bytes, overdue reads",
                         f"{sk['reads']}, {sk['eio']}, {sk['wrong_bytes']}, {sk['overdue_reads']}", "",
                         f"p50/p99 {lat['p50_s'] * 1000:.0f}/{lat['p99_s'] * 1000:.0f} ms, "
                         f"{sum(sk['faults_injected'].values())} faults"))
    head = ("scenario", "median", "spread", "notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write(r: dict[str, Any], out: Path) -> str:
    m = r["meta"]
    link = m.get("link") or {}
    lines = [f"# lazyfs benchmark suite, {m['utc']} (UTC)", "",
             f"Machine: {m['cpus']} CPUs {m['machine']}, {m['mem_gib']} GiB, kernel {m['kernel']}, "
             f"Python {m['python']}, commit {m['commit']}. {m.get('note') or ''}".rstrip(), "",
             f"Link: {link.get('mbit')} Mbit/s, {link.get('rtt_ms')} ms round trip ({link.get('how')}).",
             "", f"Image: {m.get('image')}. Runs per scenario: {m['params']['runs']} (median, min-max).",
             "", "## Goals", "", "| goal | measured | target | |", "|---|---|---|---|"]
    for name, v, target, met in goals(r["scenarios"]):
        shown = "n/a" if v is None else (f"{v:.1%}" if "%" in target else f"{v:.2f}")
        verdict = "" if met is None else ("met" if met else "missed")
        lines.append(f"| {name} | {shown} | {target} | {verdict} |")
    lines += ["", "## Figures", "", table(r), ""]
    plots = plot_all(r, out)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    peers = (r["scenarios"].get("nodes") or {}).get("peers_bench") or {}
    if _ok(peers) and not any(p.stem == "concurrency" for p in plots):
        lines.append("(bench/peers_bench.py reported no concurrency rows to plot)")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


# -- plots ----------------------------------------------------------------------------------

def plot_all(r: dict[str, Any], out: Path) -> list[Path]:
    s = r["scenarios"]
    made = []
    for name, fn in (("readiness", _plot_readiness), ("throughput", _plot_throughput),
                     ("prefetch", _plot_prefetch), ("concurrency", _plot_concurrency)):
        fig = fn(s)
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def _plot_readiness(s: dict[str, Any]):
    rd = s.get("readiness", {})
    if not _ok(rd):
        return None
    modes = {k: v for k, v in rd["modes"].items() if _ok(v)}
    for tool, d in (s.get("others") or {}).items():
        if _ok(d) and _ok(d.get("readiness")):
            modes[tool] = d["readiness"]
    names = list(modes)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(names))
    for off, key, label in ((-0.2, "sh_s", "sh -c 'echo hi'"),
                            (0.2, "python_s", "python3 -c 'import json, sqlite3, ssl'")):
        med = [modes[n][key]["median"] for n in names]
        err = [[med[i] - modes[n][key]["min"] for i, n in enumerate(names)],
               [modes[n][key]["max"] - med[i] for i, n in enumerate(names)]]
        ax.bar([i + off for i in x], med, 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(list(x), [MODE_LABELS.get(n, n) for n in names], rotation=20, ha="right")
    ax.set_ylabel("seconds from start to done (median, min-max)")
    ax.set_title("Readiness")
    ax.legend()
    return fig


def _plot_throughput(s: dict[str, Any]):
    tp = s.get("throughput", {})
    if not _ok(tp):
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    seq = {k: v["median"] / 1e6 for k, v in tp["seq_bytes_per_s"].items()}
    for tool, d in (s.get("others") or {}).items():
        if _ok(d):
            for k in ("cold", "warm"):
                seq[f"{tool}_{k}"] = d["seq_bytes_per_s"][k]["median"] / 1e6
    a1.bar(range(len(seq)), list(seq.values()), color="tab:blue")
    a1.set_xticks(range(len(seq)), [k.replace("_", " ") for k in seq], rotation=30, ha="right")
    a1.set_ylabel("MB/s")
    a1.set_title(f"Sequential read, {tp['seq_bytes'] >> 20} MiB")
    rnd = {k: v["median"] / 4096 for k, v in tp["random_4k_bytes_per_s"].items()}
    a2.bar(range(len(rnd)), list(rnd.values()), color="tab:orange")
    a2.set_xticks(range(len(rnd)), [k.replace("_", " ") for k in rnd], rotation=30, ha="right")
    a2.set_yscale("log")
    a2.set_ylabel("reads/s (log)")
    a2.set_title("Random 4 KiB reads")
    return fig


def _plot_prefetch(s: dict[str, Any]):
    pf = s.get("prefetch", {})
    if not _ok(pf):
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    rates = {"link (nominal)": pf["link_nominal_bytes_per_s"], "curl": pf["curl_bytes_per_s"]["median"],
             "lazyfs prefetch": pf["fill_bytes_per_s"]["median"]}
    a1.bar(list(rates), [v / 1e6 for v in rates.values()], color=["grey", "tab:green", "tab:blue"])
    a1.set_ylabel("MB/s")
    a1.set_title("Filling the cache")
    lat = {k: v for k, v in pf["read_latency_s"].items() if "p50" in v}
    names = list(lat)
    for off, pct in ((-0.2, "p50"), (0.2, "p99")):
        a2.bar([i + off for i in range(len(names))], [lat[n][pct] * 1e3 for n in names], 0.4, label=pct)
    a2.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=15, ha="right")
    a2.set_yscale("log")
    a2.set_ylabel("ms (log)")
    a2.set_title("4 KiB read latency")
    a2.legend()
    return fig


def _series(d: Any) -> list[dict[str, float]] | None:
    """The first list of rows with two or more numeric fields anywhere in ``d``."""
    if isinstance(d, list) and len(d) >= 2 and all(isinstance(x, dict) for x in d):
        keys = [k for k, v in d[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(keys) >= 2:
            return d
    if isinstance(d, dict):
        for v in d.values():
            if (found := _series(v)) is not None:
                return found
    return None


def _plot_concurrency(s: dict[str, Any]):
    """From the peers benchmark's result: its ``concurrency`` rows if it has them, else the
    first table of numeric rows it reported (x: the first numeric column)."""
    peers = (s.get("nodes") or {}).get("peers_bench") or {}
    if not _ok(peers):
        return None
    result = peers.get("result") or {}
    rows = _series(result.get("concurrency", result))
    if rows is None:
        return None
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    xk, yks = keys[0], keys[1:]
    fig, ax = plt.subplots(figsize=(7, 4))
    for yk in yks:
        ax.plot([row[xk] for row in rows], [row.get(yk) for row in rows], marker="o", label=yk)
    ax.set_xlabel(xk)
    ax.set_title("Many nodes (bench/peers_bench.py)")
    ax.legend()
    return fig
