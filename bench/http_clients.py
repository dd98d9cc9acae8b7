#!/usr/bin/env python3
"""Byte ranges over loopback HTTP/1.1: the lean client (``fetcher.http1.RangeClient``)
beside httpx (under trio, as ``RegistryClient`` uses it) and curl, side by side in one run.

The server is nginx (``tcp_nopush off``, sendfile on, keep-alive) serving one random
64 MiB file, or ``lazyfs serve`` (``--server serve``) serving it as a blob. Each client
fetches ranges at successive offsets on one keep-alive connection: ``--requests`` ranges
of 4 KiB, and as many 1 MiB ranges as make ``--mib`` MiB, in ``--passes`` passes each
(first one not counted: connection set-up, warm-up). A request's time is from sending it
to holding its whole body; curl's is its own ``time_total`` per transfer (one curl
process for all the ranges of a pass, so its start-up is not counted).

Reported, per client and range size: the median request time and the median throughput
of the passes (bytes over the summed request times), with the ratios of the lean client
to the others taken between those medians.

    bench/http_clients.py                      # JSON to bench/results/<UTC time>/http_clients.json
    bench/http_clients.py --server serve --out DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from blockindex.oci import Layout  # noqa: E402
from fetcher.http1 import RangeClient  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402
from testkit.registryd import free_port  # noqa: E402
from testkit.waiting import listening, wait_until  # noqa: E402

BLOB_SIZE = 64 << 20
SIZES = (4 << 10, 1 << 20)

NGINX_CONF = """
worker_processes 1;
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
    }}
}}
"""

Timings = list[float]
"""Seconds of each request of one pass."""


def _offsets(size: int, count: int) -> list[int]:
    return [(i * size) % (BLOB_SIZE - size + 1) for i in range(count)]


def lean(host: str, port: int, path: str, size: int, count: int) -> Timings:
    async def main() -> Timings:
        client = RangeClient(host, port)
        times = []
        try:
            for off in _offsets(size, count):
                t = time.perf_counter()
                body = await client.get_range(path, off, size, whole_ok=False)
                times.append(time.perf_counter() - t)
                assert len(body) == size
        finally:
            await client.aclose()
        return times

    return trio.run(main)


def with_httpx(host: str, port: int, path: str, size: int, count: int) -> Timings:
    url = f"http://{host}:{port}{path}"

    async def main() -> Timings:
        times = []
        async with httpx.AsyncClient(timeout=30) as client:
            for off in _offsets(size, count):
                t = time.perf_counter()
                r = await client.get(url, headers={"Range": f"bytes={off}-{off + size - 1}"})
                body = r.content
                times.append(time.perf_counter() - t)
                assert r.status_code == 206 and len(body) == size
        return times

    return trio.run(main)


def with_curl(host: str, port: int, path: str, size: int, count: int) -> Timings:
    url = f"http://{host}:{port}{path}"
    config = "next\n".join(f'url = "{url}"\nrange = "{off}-{off + size - 1}"\noutput = "/dev/null"\n'
                            'write-out = "%{http_code} %{size_download} %{time_total}\\n"\n'
                            for off in _offsets(size, count))
    done = subprocess.run(["curl", "--silent", "--show-error", "-K", "-"], input=config, text=True,
                          capture_output=True, check=True, timeout=600)
    times = []
    for line in done.stdout.splitlines():
        code, got, total = line.split()
        assert code == "206" and int(got) == size, line
        times.append(float(total))
    assert len(times) == count
    return times


CLIENTS: dict[str, Callable[[str, int, str, int, int], Timings]] = {
    "lean": lean, "httpx": with_httpx, "curl": with_curl}


class _Nginx:
    def __init__(self, work: Path, blob: bytes) -> None:
        d = work / "nginx"
        (d / "www").mkdir(parents=True)
        (d / "www" / "blob").write_bytes(blob)
        self.port = free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=self.port))
        self.proc = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: listening(self.port), 10, "nginx listening", alive=self.proc,
                   detail=lambda: (d / "error.log").read_text())
        self.path = "/blob"
        self.describe = f"nginx {_first_line(['nginx', '-v']).split('/')[-1]} (sendfile on, tcp_nopush off)"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class _Serve:
    def __init__(self, work: Path, blob: bytes) -> None:
        layout = Layout(work / "layouts" / "bench")
        layout.init()
        digest = layout.write_blob(blob, "application/octet-stream")["digest"]
        self.handle = make_server(work / "layouts", "127.0.0.1", 0).start()
        self.port = self.handle.port
        self.path = f"/v2/bench/blobs/{digest}"
        self.describe = "lazyfs serve (sendfile, a thread per connection)"

    def close(self) -> None:
        self.handle.close()


def _first_line(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip().splitlines()[0]


def run(server: str, outdir: Path, *, requests: int, mib: int, passes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        origin = (_Nginx if server == "nginx" else _Serve)(Path(tmp), os.urandom(BLOB_SIZE))
        try:
            rows = []
            for size in SIZES:
                count = requests if size < 1 << 20 else (mib << 20) // size
                row: dict[str, Any] = {"range_bytes": size, "requests_per_pass": count}
                for name, fn in CLIENTS.items():
                    runs = [fn("127.0.0.1", origin.port, origin.path, size, count) for _ in range(passes + 1)]
                    runs = runs[1:]  # the first pass warms up
                    per_pass = [size * len(r) / sum(r) / 2**20 for r in runs]
                    row[name] = {
                        "median_request_ms": round(statistics.median(t for r in runs for t in r) * 1e3, 4),
                        "median_mib_s": round(statistics.median(per_pass), 1),
                    }
                    print(f"{size:>8} B  {name:5}  {row[name]}", file=sys.stderr, flush=True)
                for other in ("httpx", "curl"):
                    row[f"lean_over_{other}_throughput"] = round(
                        row["lean"]["median_mib_s"] / row[other]["median_mib_s"], 2)
                rows.append(row)
        finally:
            origin.close()
    result = {
        "benchmark": "http_clients",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release()},
        "server": origin.describe,
        "clients": {"lean": "fetcher.http1.RangeClient (trio)",
                    "httpx": f"httpx {httpx.__version__} AsyncClient (trio)",
                    "curl": f"curl {_first_line(['curl', '--version']).split()[1]} (one process per pass)"},
        "passes": passes,
        "rows": rows,
    }
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "http_clients.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}", file=sys.stderr)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("nginx", "serve"), default="nginx")
    ap.add_argument("--requests", type=int, default=2000, help="4 KiB ranges per pass (default 2000)")
    ap.add_argument("--mib", type=int, default=256, help="MiB of 1 MiB ranges per pass (default 256)")
    ap.add_argument("--passes", type=int, default=5, help="passes counted per client and size (default 5)")
    ap.add_argument("--out", type=Path, help="directory for http_clients.json "
                    "(default bench/results/<UTC date-time>/)")
    args = ap.parse_args()
    if args.server == "nginx" and not shutil.which("nginx"):
        print("error: nginx is not installed (or use --server serve)", file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    out = args.out or ROOT / "bench" / "results" / stamp
    run(args.server, out, requests=args.requests, mib=args.mib, passes=args.passes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
