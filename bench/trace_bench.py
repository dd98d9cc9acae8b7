"""Readiness with and without a learned trace, side by side in one run.

    python3 bench/trace_bench.py [--quick] [--runs N] [--delay S] [--out DIR]
    run(quick, outdir) -> dict            (what bench/run's suite calls)

An image of many small and middle-sized files (a program's libraries and data) is served
by ``lazyfs serve`` over a WAN-like link made here, on loopback: the server waits
``--delay`` seconds before each response (30 ms: the round trip) and every byte back to
the node passes a proxy capped at ``--mbit`` Mbit/s (100; one token bucket shared by all
connections: ``CappedLink``). The workload reads a fixed set of those files, one after another, in an order
unrelated to the image's layout, as a program start does. One recording run (``--record``)
learns the trace; then, alternating, each repetition times on a fresh cache:

- ``cold``: mount and run the workload, no trace (the blob-order prefetch runs as usual);
- ``traced``: the same, the cache holding only the learned trace.

Readiness is the time from starting ``lazyfs mount`` to the workload's last byte (and
``workload_s``, the part after the mount returned: starting the mount process is noisy on
a busy machine and the same for both). Also reported: the requests the server answered
while the workload ran, their mean size, and the chunks the workload waited on the network
for. Medians over the repetitions, and their ratio.
Writes ``trace.json`` to the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port, lazyfs, log, read_all, stats  # noqa: E402
from blockindex.convert import convert  # noqa: E402
from lazyfs.mountinfo import STATUS_XATTR  # noqa: E402
from lazyfs.process import wait_gone  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402

CHUNK = 256 << 10


def make_rootfs(root: Path, files: int, seed: int = 8) -> list[str]:
    """``files`` files of 8 KiB-1 MiB (incompressible) in 20 directories; the workload is
    one file in four, shuffled."""
    rng = random.Random(seed)
    names = []
    for i in range(files):
        d = root / f"lib{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{d.name}/mod{i:04d}.so"
        (root / name).write_bytes(rng.randbytes(rng.randrange(8 << 10, 1 << 20)))
        names.append(name)
    work = names[::4]
    rng.shuffle(work)
    return work


class CappedLink:
    """A TCP proxy in front of the origin that passes at most ``bytes_per_s`` back to the
    node, over all its connections together (requests go through unpaced)."""

    def __init__(self, upstream_port: int, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.upstream = upstream_port
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _pace(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(now, self._next) + n / self.rate
            wait = self._next - now
        time.sleep(wait)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                return
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conns.append(s)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pace: bool) -> None:
        try:
            while data := src.recv(32 << 10):
                if pace:
                    self._pace(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for s in self._conns:
            try:
                s.close()
            except OSError:
                pass


class Bench:
    def __init__(self, work: Path, delay: float) -> None:
        self.work = work
        self.mounts: dict[Path, int | None] = {}
        self.server: Any = None
        self.link: CappedLink | None = None
        self.delay = delay
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        path = self.work / f"{name}-{self._n}"
        path.mkdir()
        return path

    def mount(self, ref: str, cache: Path, *extra: str) -> Path:
        mnt = self.fresh("mnt")
        out = lazyfs("mount", ref, str(mnt), "--cache", str(cache), "--log-file", f"{mnt}.log", *extra)
        m = re.search(r"\(pid (\d+)", out.stdout)
        self.mounts[mnt] = int(m[1]) if m else None
        return mnt

    def umount(self, mnt: Path) -> None:
        lazyfs("umount", str(mnt))
        self.mounts.pop(mnt, None)

    def close(self) -> None:
        import subprocess

        for mnt, pid in list(self.mounts.items()):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            if pid:
                wait_gone(pid, 10, kill=True)
        self.mounts.clear()
        if self.link is not None:
            self.link.close()
        if self.server is not None:
            self.server.close()


def _ranges(requests: list[tuple], since: int) -> list[int]:
    sizes = []
    for method, path, rng, _status in requests[since:]:
        if method == "GET" and "/blobs/" in path and rng:
            lo, hi = map(int, re.match(r"bytes=(\d+)-(\d+)", rng).groups())
            sizes.append(hi - lo + 1)
    return sizes


def one_start(b: Bench, ref: str, cache: Path, work: list[str]) -> dict[str, Any]:
    """Mount on ``cache`` and run the workload; time it, count what the server saw."""
    before = len(b.server.requests)
    started = time.perf_counter()
    mnt = b.mount(ref, cache)
    mounted = time.perf_counter() - started
    for name in work:
        read_all(mnt / name)
    ready = time.perf_counter() - started
    workload = ready - mounted
    sizes = _ranges(b.server.requests, before)
    st = json.loads(os.getxattr(mnt, STATUS_XATTR))
    b.umount(mnt)
    return {"ready_s": ready, "mount_s": mounted, "workload_s": workload, "requests": len(sizes),
            "mean_request_bytes": statistics.mean(sizes) if sizes else 0,
            "demand_misses": st["reads"]["chunk_misses"],
            "lead_misses": (st.get("trace") or {}).get("lead_misses", 0),
            "lead_chunks": (st.get("trace") or {}).get("lead_chunks", 0)}


def run(quick: bool, outdir: Path, *, runs: int | None = None, delay: float = 0.03,
        mbit: float = 100.0) -> dict[str, Any]:
    """Measure, write ``outdir/trace.json`` and return its contents."""
    runs = runs or (1 if quick else 5)
    files = 60 if quick else 300
    outdir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="lazyfs-trace-bench-"))
    b = Bench(work_dir, delay)
    try:
        rootfs = work_dir / "rootfs"
        work = make_rootfs(rootfs, files)
        images = work_dir / "images"
        result = convert(f"dir:{rootfs}", f"oci:{images / 'app'}:1", chunk_size=CHUNK)
        b.server = make_server(images, "127.0.0.1", free_port(), delay=delay)
        b.server.start()
        b.link = CappedLink(b.server.port, mbit * 1e6 / 8)
        ref = f"127.0.0.1:{b.link.port}/app:1"
        log(f"trace bench: {files} files, workload {len(work)} files "
            f"({sum((rootfs / n).stat().st_size for n in work) >> 20} MiB), link {mbit:g} Mbit/s, "
            f"{delay * 1000:.0f} ms per response")

        learn = b.fresh("cache-learn")
        mnt = b.mount(ref, learn, "--no-prefetch", "--record")
        for name in work:
            read_all(mnt / name)
        b.umount(mnt)
        trace_file = learn / "traces" / (result.manifest_digest.removeprefix("sha256:") + ".json")
        if not trace_file.exists():
            raise RuntimeError("the recording run left no trace")

        cold: list[dict[str, Any]] = []
        traced: list[dict[str, Any]] = []
        for i in range(runs):
            for name, out in (("cold", cold), ("traced", traced))[:: 1 if i % 2 == 0 else -1]:
                cache = b.fresh(f"cache-{name}")
                if name == "traced":
                    (cache / "traces").mkdir()
                    shutil.copy(trace_file, cache / "traces")
                out.append(one_start(b, ref, cache, work))
                log(f"  {name:6s} run {i + 1}: ready {out[-1]['ready_s']:.3f}s, "
                    f"{out[-1]['requests']} requests, {out[-1]['demand_misses']} demand misses")

        def med(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
            return stats([float(r[key]) for r in rows])

        keys = ("ready_s", "mount_s", "workload_s", "requests", "mean_request_bytes", "demand_misses")
        report = {
            "benchmark": "trace",
            "params": {"quick": quick, "runs": runs, "files": files, "workload_files": len(work),
                       "workload_bytes": sum((rootfs / n).stat().st_size for n in work),
                       "chunk_size": CHUNK, "image_bytes": result.image_bytes,
                       "link": {"mbit": mbit, "response_delay_s": delay,
                                "how": "token-bucket proxy (bench) + per-response delay (lazyfs serve)"}},
            "cold": {k: med(cold, k) for k in keys},
            "traced": {k: med(traced, k) for k in (*keys, "lead_misses", "lead_chunks")},
        }
        c, t = report["cold"], report["traced"]
        report["ratios"] = {
            "ready_traced_vs_cold": t["ready_s"]["median"] / c["ready_s"]["median"],
            "workload_traced_vs_cold": t["workload_s"]["median"] / c["workload_s"]["median"],
            "requests_traced_vs_cold": (t["requests"]["median"] / c["requests"]["median"]
                                        if c["requests"]["median"] else None),
        }
        (outdir / "trace.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        b.close()
        shutil.rmtree(work_dir, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    c, t = r["cold"], r["traced"]
    rows = [("readiness (s)", "ready_s", "{:.3f}"), ("mount (s)", "mount_s", "{:.3f}"),
            ("workload after mount (s)", "workload_s", "{:.3f}"),
            ("requests", "requests", "{:.0f}"), ("mean request (KiB)", "mean_request_bytes", "{:.0f}"),
            ("demand misses", "demand_misses", "{:.0f}")]
    out = [f"{'trace scenario (medians)':28s} {'cold':>10s} {'traced':>10s}"]
    for label, key, fmt in rows:
        div = 1024 if key == "mean_request_bytes" else 1
        cv, tv = fmt.format(c[key]["median"] / div), fmt.format(t[key]["median"] / div)
        out.append(f"{label:28s} {cv:>10s} {tv:>10s}")
    out.append(f"readiness traced / cold: {r['ratios']['ready_traced_vs_cold']:.2f}, "
               f"workload after mount: {r['ratios']['workload_traced_vs_cold']:.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small image, one repetition (CI)")
    ap.add_argument("--runs", type=int, help="repetitions of each scenario (default 5; quick 1)")
    ap.add_argument("--delay", type=float, default=0.03, help="seconds the server waits before each response")
    ap.add_argument("--mbit", type=float, default=100.0, help="link bandwidth cap, Mbit/s")
    ap.add_argument("--out", type=Path, help="output directory (default bench/results/<UTC time>)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime())
    report = run(args.quick, out, runs=args.runs, delay=args.delay, mbit=args.mbit)
    print(table(report))
    print(f"written to {out / 'trace.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
