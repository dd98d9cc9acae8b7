"""Sequential read_range throughput from a local `lazyfs serve`, beside http.client.

    python3 bench/read_range.py [--mib 64] [--url http://127.0.0.1:PORT/REPO] [--digest D]

With no --url it builds a throwaway layout with one random blob and serves it itself.
With --url and --digest it reads from any server that answers /v2/<repo>/blobs/<digest>
with ranges (an nginx alias works). Prints one JSON line per range size: GiB/s medians of
three passes for RegistryClient.read_range (httpx under trio) and for http.client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from blockindex.oci import Layout  # noqa: E402
from fetcher.imageref import ImageRef  # noqa: E402
from fetcher.registry import RegistryClient  # noqa: E402
from lazyfs.serve import make_server  # noqa: E402

SIZES = (1 << 20, 4 << 20, 16 << 20)


def with_client(url: str, digest: str, total: int, size: int) -> float:
    parts = urlsplit(url)
    ref = ImageRef.parse(f"{parts.netloc}{parts.path}:bench")

    async def main() -> float:
        async with RegistryClient(ref, insecure=parts.scheme == "http") as client:
            await client.read_range(digest, 0, 1)  # connect outside the timing
            t = time.perf_counter()
            for off in range(0, total - size + 1, size):
                await client.read_range(digest, off, size)
            return total / (time.perf_counter() - t) / 2**30

    return trio.run(main)


def with_http_client(url: str, digest: str, total: int, size: int) -> float:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    path = f"/v2{parts.path}/blobs/{digest}"
    t = time.perf_counter()
    for off in range(0, total - size + 1, size):
        conn.request("GET", path, headers={"Range": f"bytes={off}-{off + size - 1}"})
        body = conn.getresponse().read()
        assert len(body) == size
    conn.close()
    return total / (time.perf_counter() - t) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--url")
    ap.add_argument("--digest")
    args = ap.parse_args()
    total = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        handle = None
        url, digest = args.url, args.digest
        if url is None:
            layout = Layout(Path(tmp) / "bench")
            layout.init()
            digest = layout.write_blob(os.urandom(total), "application/octet-stream")["digest"]
            handle = make_server(Path(tmp), "127.0.0.1", 0).start()
            url = f"{handle.url}/bench"
        try:
            for size in SIZES:
                row = {"server": url, "range_mib": size >> 20}
                for name, fn in (("httpx_trio", with_client), ("http_client", with_http_client)):
                    runs = [fn(url, digest, total, size) for _ in range(3)]
                    row[f"{name}_gib_s"] = round(statistics.median(runs), 3)
                print(json.dumps(row), flush=True)
        finally:
            if handle is not None:
                handle.close()


if __name__ == "__main__":
    main()
