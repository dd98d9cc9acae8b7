"""The peers benchmark: 1, 2, 4 and 8 nodes start the same image at once, in four
arrangements (``MODES``): with peers, alone, through a site mirror, through Dragonfly-style
node proxies.

Each node is a ``lazyfs mount`` (background, prefetch on) with its own cache directory on
loopback. With ``peers``, each node's cache is served by its own ``lazyfs peer`` (started
before the clock, as on a containerd node), the mount names it with ``--advertise``, and
all share one peers file and token. ``no_peers``: each node reads the origin alone.
``mirror``: one nginx caching whole blobs in front of the origin (the README's mirror,
``testkit/nginxd.py``), every node mounting with ``--mirror`` at it. ``proxy``: each node's
mount goes through its own nginx forward proxy (``--proxy``), which caches blobs in 4 MiB
slices taken from one shared seed nginx (slices too) in front of the origin; manifests go
from the node proxy straight to the origin. That is Dragonfly's dfdaemon and seed peer as
nginx can play them; what differs: no piece exchange between the nodes' proxies (each node
takes every piece from the seed, a tree of depth two, not a swarm) and no scheduler; plain
HTTP only (nginx does not answer ``CONNECT``). The caches start empty, before the clock.
All nodes are started at the same moment; as soon as a node's mount is
there, it runs the program (``chroot MNT python3 -c 'import json, sqlite3, ssl'`` on the
python image; in quick mode, reading every file of a tiny image). Measured per run:

    program_s         start to the moment every node's program has finished (ready, max)
    ready_p50_s       the median node's program finished
    cache_complete_s  start to the moment every node's cache holds the whole image
    origin_bytes      chunk bytes the origin sent (the sum of the ranges it answered)
    origin_sent_bytes everything the proxy passed on (manifests, indexes, heads too)
    origin_vs_one_node  origin_sent_bytes against what one node needs (its manifest, index
                      and every chunk): with peers the goal is at most 1.05x
    origin_index_gets whole-blob GETs at the origin (the index: one per cluster with peers;
                      the mirror takes every blob whole, the seed takes slices)
    origin_requests   every request the origin answered
    origin_after_peers  chunks the nodes' mounts asked of the origin after their peers failed
                      or were slow, of all nodes together; of them ``hedged`` (a peer silent
                      for the hedge delay: ``hedge_wins`` answered first by the origin),
                      ``stalled`` (a batch that stopped), and ``peer_failures``
    node_cpu_s        CPU seconds per node: its mount, and its peer or node proxy
    node_proxy_cache_bytes  the node proxy's own copy on each node's disk (proxy)
    site_cache_bytes, site_cpu_s  the shared mirror's or seed's cache and CPU

The origin (``lazyfs serve``'s server) sits behind a counting proxy that caps what it
sends at ``--origin-mibps`` (25 MiB/s, about 200 Mbit/s, by default) for all nodes
together: a registry's uplink is what a cluster starting one image runs out of, and what
peers exist to spare. Every run gets a fresh origin process (so its counters start at
zero), fresh caches and fresh ports; the modes run one after another, in reverse order
every other run, so all see the same machine. Results are medians over ``runs``, written
to ``peers.json`` with a plot, ``peers.png`` (nodes on x, seconds on y, one line per mode
and measure; origin bytes beside it).

    python3 bench/peers_bench.py                 # 1, 2, 4, 8 nodes, 3 runs, python image
    python3 bench/peers_bench.py --quick         # 1 and 2 nodes, 1 run, tiny image (CI)
    python3 bench/peers_bench.py --out DIR --runs 5 --origin-delay 0.005
    python3 bench/peers_bench.py --nodes 2,4 --runs 1
    python3 bench/peers_bench.py --nodes 2,4 --modes peers,mirror,proxy

``run(quick, outdir)`` is the entry point for the benchmark suite. Needs root (FUSE,
chroot). Everything is on loopback; ``--origin-delay`` adds a per-response delay to stand
in for a far registry, ``--origin-mibps 0`` lifts the cap.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    CACHE,
    PROGRAM,
    PYTHON,
    _cached_convert,
    free_port,
    lazyfs,
    log,
    read_all,
    source_key,
    stats,
)
from bench.memfs import pseudo_random  # noqa: E402
from bench.prefetch_cpu import cpu_seconds  # noqa: E402
from lazyfs.mountinfo import STATUS_XATTR  # noqa: E402
from lazyfs.process import wait_gone  # noqa: E402
from testkit import imagegen  # noqa: E402
from testkit.nginxd import Nginx, mirror_locations, node_proxy_locations, seed_locations  # noqa: E402

MODES = ("peers", "no_peers", "mirror", "proxy")
"""How the nodes reach the image: ``peers`` (each node's cache served by its ``lazyfs
peer``), ``no_peers`` (each node alone, straight from the origin), ``mirror`` (one nginx
caching whole blobs in front of the origin, shared by every node: ``--mirror``) and
``proxy`` (Dragonfly-style: each node's own caching forward proxy, ``--proxy``, taking
4 MiB pieces from one shared seed cache in front of the origin)."""
ORIGIN_MIBPS = 25.0
"""The origin's uplink, MiB/s, shared by every node (about 200 Mbit/s)."""
TOKEN = "bench-cluster-token-" + "0" * 16


# -- the origin: a registry behind a counting proxy that caps its bandwidth -----------------

class CappedProxy:
    """A TCP proxy in front of the origin: every byte the origin sends passes through one
    token bucket of ``rate`` bytes per second shared by all connections (the registry's
    uplink, which peers exist to spare), and is counted. ``rate`` 0: no cap."""

    def __init__(self, upstream: int, rate: float) -> None:
        self.upstream = upstream
        self.rate = rate
        self.sent = 0
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the bucket may send again
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _take(self, n: int) -> None:
        with self._lock:
            self.sent += n
            if not self.rate:
                return
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(64 << 10):
                if downstream:
                    self._take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def serve_origin(root: Path, delay: float, rate: float) -> None:
    """Serve ``root`` behind a ``CappedProxy`` on an ephemeral loopback port; print the
    proxy's port, then on SIGTERM what was counted as JSON, and exit."""
    from lazyfs.serve import make_server

    server = make_server(root, "127.0.0.1", 0, delay=delay)
    server.start()
    proxy = CappedProxy(server.port, rate)
    print(proxy.port, flush=True)
    signal.sigwait({signal.SIGTERM})
    ranges = whole = indexes = 0
    for method, path, rng, status in list(server.requests):
        if "/blobs/sha256:" not in path or method != "GET":
            continue
        size = next(root.glob(f"*/blobs/sha256/{path.rsplit(':', 1)[1]}")).stat().st_size
        if rng and status == 206:  # a cache's slice may reach past the blob's end
            first, last = rng.removeprefix("bytes=").split("-")
            ranges += min(int(last), size - 1) - int(first) + 1
        elif status == 200:
            whole += size
            indexes += 1
    print(json.dumps({"range_bytes": ranges, "whole_blob_bytes": whole, "whole_blobs": indexes,
                      "sent_bytes": proxy.sent, "requests": len(server.requests)}), flush=True)
    os._exit(0)  # proxy threads may sit in recv on idle keep-alive connections


class Origin:
    def __init__(self, root: Path, delay: float, rate: float) -> None:
        # SIGTERM is blocked before the child starts, so sigwait() sees it whatever the timing
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-origin", str(root), "--origin-delay", str(delay),
             "--origin-mibps", str(rate / 2**20)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> dict[str, int]:
        """Stop the origin; what it counted."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the image and the program ---------------------------------------------------------------

def prepare_image(quick: bool, work: Path) -> tuple[Path, str]:
    """(directory of OCI layouts to serve, repository). The python image is converted once
    and kept in the benchmark cache; the tiny one is made fresh."""
    if quick:
        images = work / "images"
        rootfs = work / "tiny-rootfs"
        (rootfs / "data").mkdir(parents=True)
        for i in range(8):
            (rootfs / "data" / f"f{i}").write_bytes(pseudo_random(256 << 10, seed=i))
        lazyfs("convert", f"dir:{rootfs}", f"oci:{images / 'tiny'}:1", "--chunk-size", "64K")
        return images, "tiny"
    images = CACHE / "images"
    images.mkdir(parents=True, exist_ok=True)
    tar = imagegen.build_python_image(work / "python.tar", cache_dir=CACHE / "inputs", with_pyc=True)
    import hashlib

    pykey = hashlib.sha256(tar.read_bytes()).hexdigest()[:12]
    repo = _cached_convert(images, f"python-{pykey}-{source_key()}", f"docker-archive:{tar}")
    tar.unlink()
    return images, repo


def program(quick: bool, mnt: Path) -> None:
    """What each node runs once its image is mounted."""
    if quick:
        for f in sorted((mnt / "data").iterdir()):
            read_all(f)
        return
    done = subprocess.run(["chroot", str(mnt), PYTHON, "-c", PROGRAM], capture_output=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"program failed on {mnt}: {done.stderr.decode(errors='replace')[-500:]}")


# -- one run: n nodes started at once ------------------------------------------------------------

def status_of(mnt: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mnt, STATUS_XATTR))


def start_caches(mode: str, run_dir: Path, origin: int, n: int, started: list[Nginx]) -> list[list[str]]:
    """Start the nginx caches ``mode`` puts between the nodes and the origin (appended to
    ``started``, the site's first, then one per node), and return each node's mount
    arguments that lead to them (none for peers and no_peers)."""
    upstream = f"127.0.0.1:{origin}"
    if mode == "mirror":
        started.append(Nginx(run_dir / "mirror", mirror_locations(upstream)))
        return [["--mirror", started[0].url] for _ in range(n)]
    if mode == "proxy":
        started.append(Nginx(run_dir / "seed", seed_locations(upstream)))
        seed = f"127.0.0.1:{started[0].port}"
        for i in range(n):
            started.append(Nginx(run_dir / f"proxy{i}", node_proxy_locations(seed)))
        return [["--proxy", c.url] for c in started[1:]]
    return [[] for _ in range(n)]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds so far of a process and its children (nginx: the master and its worker)."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return sum(sum(cpu_seconds(p)) for p in pids)


def bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_run(quick: bool, images: Path, repo: str, n: int, mode: str, work: Path,
            origin_delay: float, origin_rate: float, prefetch: bool = True) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"n{n}-{mode}-", dir=work))
    origin = Origin(images, origin_delay, origin_rate)
    ports = [free_port() for _ in range(n)]
    peers_file, token_file = run_dir / "peers", run_dir / "token"
    peers_file.write_text("".join(f"http://127.0.0.1:{p}\n" for p in ports))
    token_file.write_text(TOKEN + "\n")
    mnts = [run_dir / f"mnt{i}" for i in range(n)]
    pids: dict[Path, int] = {}
    daemons: list[subprocess.Popen[bytes]] = []
    caches: list[Nginx] = []
    node_cpu = [0.0] * n  # each node's mount, and its peer or proxy
    try:
        for m in mnts:
            m.mkdir()
        if mode == "peers":  # each node's `lazyfs peer` runs before the image is started, as a daemon does
            for i, port in enumerate(ports):
                daemons.append(subprocess.Popen(
                    [sys.executable, "-m", "lazyfs", "peer", "--cache", str(run_dir / f"cache{i}"),
                     "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file)],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in ports:
                wait_listening(port)
        via = start_caches(mode, run_dir, origin.port, n, caches)

        def node(i: int) -> tuple[float, float]:
            """(mounted, program done) in seconds from the start."""
            args = [sys.executable, "-m", "lazyfs", "mount", f"127.0.0.1:{origin.port}/{repo}:1",
                    str(mnts[i]), "--cache", str(run_dir / f"cache{i}"), "--timeout", "60",
                    "--log-file", str(run_dir / f"node{i}.log"), *via[i]]
            if not prefetch:
                args.append("--no-prefetch")
            if mode == "peers":
                args += ["--peers-file", str(peers_file), "--advertise", f"http://127.0.0.1:{ports[i]}",
                         "--token-file", str(token_file)]
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"mount of node {i} failed: {done.stderr.strip()}")
            pids[mnts[i]] = int(re.search(r"\(pid (\d+),", done.stdout)[1])  # type: ignore[index]
            mounted = time.monotonic() - t0
            program(quick, mnts[i])
            return mounted, time.monotonic() - t0

        complete: dict[Path, float] = {}

        def watch() -> None:
            """Note when each mounted node's cache is complete (while the programs run)."""
            deadline = time.monotonic() + 900
            while prefetch and len(complete) < n:
                if any(f.done() and f.exception() for f in nodes):
                    return
                for m in list(pids):
                    if m not in complete and status_of(m)["prefetch"]["complete"]:
                        complete[m] = time.monotonic() - t0
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n - len(complete)} node(s) did not complete in 900 s")
                time.sleep(0.02)

        t0 = time.monotonic()
        with ThreadPoolExecutor(n + 1) as pool:
            nodes = [pool.submit(node, i) for i in range(n)]
            watcher = pool.submit(watch)
            per_node = [f.result() for f in nodes]
            watcher.result()
        statuses = [status_of(m) for m in mnts]
        for i, m in enumerate(mnts):
            node_cpu[i] += sum(cpu_seconds(pids[m]))
        for i, d in enumerate(daemons):
            node_cpu[i] += tree_cpu_s(d.pid)
        node_proxies = caches[1:] if mode == "proxy" else []
        for i, c in enumerate(node_proxies):
            node_cpu[i] += tree_cpu_s(c.proc.pid)
        site_cpu = tree_cpu_s(caches[0].proc.pid) if caches else 0.0
        site_cache = bytes_under(caches[0].dir / "cache") if caches else 0
        node_proxy_cache = [bytes_under(c.dir / "cache") for c in node_proxies]
    finally:
        for m in mnts:
            subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
        for pid in pids.values():
            wait_gone(pid, 10, kill=True)
        for d in daemons:
            d.terminate()
            d.wait(timeout=30)
        for c in caches:
            c.stop()
        try:
            counted = origin.stop()
        finally:
            origin.kill()
    # a node served by its own `lazyfs peer` (--advertise) gets what it owns through it, from
    # the origin: those bytes are not from peers
    from_peers = sum(v for s in statuses for k, v in s["bytes_by_source"].items()
                     if k.startswith("peer ") and k != f"peer {(s.get('peers') or {}).get('self')}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "program_s": max(done for _, done in per_node),
        "ready_p50_s": statistics.median(done for _, done in per_node),
        "mounted_s": max(mounted for mounted, _ in per_node),
        "cache_complete_s": max(complete.values()) if prefetch else None,
        "origin_bytes": counted["range_bytes"],
        "origin_sent_bytes": counted["sent_bytes"],
        "origin_body_bytes": counted["range_bytes"] + counted["whole_blob_bytes"],
        "origin_index_gets": counted["whole_blobs"],
        "peer_bytes": from_peers,
        # how often a node's mounts went past its peers to the origin (all nodes together):
        # hedges (a peer silent for the hedge delay), stalls (a batch that stopped), and
        # every chunk asked of the origin after its peers failed or were slow
        **{key: sum(s["fetch"][key] for s in statuses)
           for key in ("origin_after_peers", "hedged", "hedge_wins", "stalled", "peer_failures")},
        "stored_bytes": statuses[0]["image"]["stored_bytes"],
        "chunks": statuses[0]["image"]["chunks"],
        "origin_requests": counted["requests"],
        "node_cpu_s": statistics.mean(node_cpu),
        "node_proxy_cache_bytes": statistics.mean(node_proxy_cache) if node_proxy_cache else 0,
        "site_cache_bytes": site_cache,
        "site_cpu_s": site_cpu,
    }


# -- the whole benchmark ---------------------------------------------------------------------------

GOAL = 1.05
"""With peers, the origin should send a cluster at most this many times one node's need."""


def one_node_needs(images: Path, repo: str) -> int:
    """What one node takes from the origin: the manifest, the index and every chunk."""
    from blockindex.oci import Layout

    layout = Layout(images / repo)
    desc = layout.resolve("1")
    manifest = json.loads(layout.read_blob(desc["digest"]))
    index = manifest["layers"][0]
    from blockindex.reader import IndexReader

    reader = IndexReader(layout.blob_path(index["digest"]))
    try:
        chunks = reader.totals()["stored_bytes"]
    finally:
        reader.close()
    return int(desc["size"]) + int(index["size"]) + int(chunks)


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"lazyfs peer on port {port} did not listen within {timeout:g} s")

def run(quick: bool, outdir: Path, *, runs: int | None = None, origin_delay: float = 0.0,
        origin_mibps: float = ORIGIN_MIBPS, nodes: tuple[int, ...] | None = None,
        modes: tuple[str, ...] = MODES, prefetch: bool = True) -> dict[str, Any]:
    """Measure, write ``outdir/peers.json`` and ``outdir/peers.png``, print a table of the
    medians; return the results. Without ``prefetch`` the nodes mount with
    ``--no-prefetch``: a cold start alone (no cache to complete)."""
    outdir.mkdir(parents=True, exist_ok=True)
    counts = nodes or ((1, 2) if quick else (1, 2, 4, 8))
    runs = runs or (1 if quick else 3)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-peers-bench-"))
    try:
        images, repo = prepare_image(quick, work)
        need = one_node_needs(images, repo)
        raw: dict[str, dict[int, list[dict[str, Any]]]] = {m: {n: [] for n in counts} for m in modes}
        for r in range(runs):
            for n in counts:
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    res = one_run(quick, images, repo, n, mode, work, origin_delay, origin_mibps * 2**20,
                                  prefetch)
                    raw[mode][n].append(res)
                    complete = res["cache_complete_s"]
                    log(f"run {r + 1}/{runs}: {n} node(s), {mode}: program {res['program_s']:.2f}s, "
                        f"cache complete {'-' if complete is None else f'{complete:.2f}s'}, origin sent "
                        f"{res['origin_sent_bytes'] / 2**20:.1f} MiB, "
                        f"from peers {res['peer_bytes'] / 2**20:.1f} MiB, chunks asked of the origin "
                        f"past peers {res['origin_after_peers']} ({res['hedged']} hedged, "
                        f"{res['stalled']} stalled, {res['peer_failures']} failed)")
    except BaseException:
        log(f"failed: mount logs and caches kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    first = next(iter(raw[modes[0]][counts[0]]))
    stored = first["stored_bytes"]
    results: dict[str, Any] = {}
    for mode in modes:
        results[mode] = {}
        for n in counts:
            rs = raw[mode][n]
            origin = stats([float(x["origin_bytes"]) for x in rs])
            results[mode][str(n)] = {
                "program_s": stats([x["program_s"] for x in rs]),  # the last node ready
                "ready_p50_s": stats([x["ready_p50_s"] for x in rs]),  # the middle node ready
                "cache_complete_s": stats([x["cache_complete_s"] for x in rs]) if prefetch else None,
                "mounted_s": stats([x["mounted_s"] for x in rs]),
                "origin_bytes": origin,
                "origin_sent_bytes": stats([float(x["origin_sent_bytes"]) for x in rs]),
                "origin_requests": stats([float(x["origin_requests"]) for x in rs]),
                "peer_bytes": stats([float(x["peer_bytes"]) for x in rs]),
                **{key: stats([float(x[key]) for x in rs])
                   for key in ("origin_after_peers", "hedged", "hedge_wins", "stalled", "peer_failures")},
                "origin_vs_image": origin["median"] / stored,
                "origin_body_bytes": stats([float(x["origin_body_bytes"]) for x in rs]),
                "origin_index_gets": stats([float(x["origin_index_gets"]) for x in rs]),
                # everything the origin sent (heads included) against one node's need
                "origin_vs_one_node": stats([x["origin_sent_bytes"] / need for x in rs]),
                # what the arrangement costs: CPU on each node (its mount, and its peer or
                # proxy), and disk for a node proxy's copy; the site cache's (mirror, seed)
                "node_cpu_s": stats([x["node_cpu_s"] for x in rs]),
                "node_proxy_cache_bytes": stats([float(x["node_proxy_cache_bytes"]) for x in rs]),
                "site_cache_bytes": stats([float(x["site_cache_bytes"]) for x in rs]),
                "site_cpu_s": stats([x["site_cpu_s"] for x in rs]),
            }
    ratios = {}
    for n in counts if {"peers", "no_peers"} <= set(modes) else ():
        p, o = results["peers"][str(n)], results["no_peers"][str(n)]
        ratios[str(n)] = {
            "program_peers_vs_no_peers": p["program_s"]["median"] / o["program_s"]["median"],
            "cache_complete_peers_vs_no_peers":
                p["cache_complete_s"]["median"] / o["cache_complete_s"]["median"] if prefetch else None,
            "origin_bytes_peers_vs_no_peers":
                p["origin_bytes"]["median"] / max(1.0, o["origin_bytes"]["median"]),
            # against what one node alone took in the same run: the measure of a cold start
            # (prefetch off), where a node needs what its program reads, not the image
            "origin_peers_vs_one_node_alone":
                p["origin_sent_bytes"]["median"] / max(1.0, o["origin_sent_bytes"]["median"] / n),
        }
    out = {
        "scenario": "peers",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(),
                    "python": platform.python_version()},
        "params": {"quick": quick, "runs": runs, "nodes": list(counts), "modes": list(modes),
                   "origin_delay": origin_delay, "prefetch": prefetch,
                   "origin_mibps": origin_mibps,
                   "image": repo, "image_stored_bytes": stored, "one_node_needs_bytes": need,
                   "goal_origin_vs_one_node": GOAL,
                   "image_chunks": first["chunks"],  # for bench/cluster_model.py --calibrate
                   "program": "read every file" if quick else f"chroot MNT {PYTHON} -c {PROGRAM!r}"},
        "results": results,
        "ratios": ratios,
        "plot": "peers.png",
    }
    (outdir / "peers.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, outdir / "peers.png")
    _print_table(out, outdir)
    return out


def _print_table(out: dict[str, Any], outdir: Path) -> None:
    print(f"{'nodes':>5} {'mode':>9} {'ready p50 s':>11} {'ready max s':>11} {'complete s':>11} "
          f"{'origin MiB':>11} {'x one node':>11} {'origin reqs':>11} {'node CPU s':>10} "
          f"{'node proxy MiB':>14}")
    for n in out["params"]["nodes"]:
        for mode in out["params"]["modes"]:
            r = {k: v["median"] for k, v in out["results"][mode][str(n)].items() if isinstance(v, dict)}
            complete = f"{r['cache_complete_s']:>11.2f}" if "cache_complete_s" in r else f"{'-':>11}"
            print(f"{n:>5} {mode:>9} {r['ready_p50_s']:>11.2f} {r['program_s']:>11.2f} "
                  f"{complete} {r['origin_sent_bytes'] / 2**20:>11.2f} "
                  f"{r['origin_vs_one_node']:>11.3f} {r['origin_requests']:>11.0f} "
                  f"{r['node_cpu_s']:>10.2f} {r['node_proxy_cache_bytes'] / 2**20:>14.2f}")
    print(f"one node needs {out['params']['one_node_needs_bytes'] / 2**20:.2f} MiB; goal with peers: "
          f"at most {GOAL}x")
    print(f"wrote {outdir / 'peers.json'} and {outdir / 'peers.png'}")


def plot(out: dict[str, Any], path: Path) -> None:
    """Seconds against nodes, one line per mode and measure; origin MiB beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = out["params"]["nodes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"peers": "tab:blue", "no_peers": "tab:orange", "mirror": "tab:green", "proxy": "tab:purple"}
    for mode in out["params"]["modes"]:
        res = out["results"][mode]
        label = mode.replace("_", " ")
        for key, name, style in (("program_s", "every program done", "-o"),
                                 ("cache_complete_s", "every cache complete", "--s")):
            if res[str(counts[0])][key] is None:  # prefetch off: no cache to complete
                continue
            left.plot(counts, [res[str(n)][key]["median"] for n in counts], style, color=colors[mode],
                      label=f"{name}, {label}")
        right.plot(counts, [res[str(n)]["origin_sent_bytes"]["median"] / 2**20 for n in counts], "-o",
                   color=colors[mode], label=label)
    right.axhline(out["params"]["image_stored_bytes"] / 2**20, color="grey", linewidth=0.8,
                  label="image (stored)")
    left.set(xlabel="nodes starting the image at once", ylabel="seconds (median)", xticks=counts,
             title="time until every node is done")
    right.set(xlabel="nodes starting the image at once", ylabel="MiB from the origin (median)",
              xticks=counts, title="origin load")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    cap = out["params"]["origin_mibps"]
    fig.suptitle(f"lazyfs peers: {out['params']['image']}, origin "
                 f"{f'capped at {cap:g} MiB/s' if cap else 'uncapped'}, loopback, "
                 f"{out['params']['runs']} run(s), {out['when']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 nodes, 1 run, tiny image")
    parser.add_argument("--runs", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="directory for peers.json and peers.png "
                                                 "(default bench/results/<UTC date-time>)")
    parser.add_argument("--origin-delay", type=float, default=0.0,
                        help="seconds the origin waits before each answer (default 0)")
    parser.add_argument("--origin-mibps", type=float, default=ORIGIN_MIBPS,
                        help=f"the origin's bandwidth, shared by all nodes (default {ORIGIN_MIBPS:g} MiB/s; "
                             "0: uncapped)")
    parser.add_argument("--nodes", type=lambda v: tuple(int(x) for x in v.split(",")),
                        help="node counts, e.g. 2,4 (default 1,2,4,8; 1,2 with --quick)")
    parser.add_argument("--modes", type=lambda v: tuple(v.split(",")), default=MODES,
                        help=f"arrangements to run, e.g. peers,mirror (default {','.join(MODES)})")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="mount with --no-prefetch: a cold start alone, no cache to complete")
    parser.add_argument("--serve-origin", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}: choose from {', '.join(MODES)}")
    if args.serve_origin:
        serve_origin(args.serve_origin, args.origin_delay, args.origin_mibps * 2**20)
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on ^C: unmount everything
    outdir = args.out or ROOT / "bench" / "results" / dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    run(args.quick, outdir, runs=args.runs, origin_delay=args.origin_delay,
        origin_mibps=args.origin_mibps, nodes=args.nodes, modes=args.modes, prefetch=not args.no_prefetch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
