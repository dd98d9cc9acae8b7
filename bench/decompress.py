"""Scenario 5: CPU seconds spent decompressing the same image, both ways.

A full pull gunzips every layer (zlib, what ``tar -xz`` and containerd use); lazyfs decodes
lz4 chunks (raw chunks, where lz4 did not pay, cost nothing). Both are timed here in this
process with ``time.process_time`` over bytes already in memory, so neither the disk nor the
network is in the figure; each is repeated ``runs`` times.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

from bench.context import Bench, stats
from bench.harness import log
from blockindex.codec import decode
from blockindex.format import CODEC_LZ4
from blockindex.oci import Layout
from blockindex.reader import IndexReader


def _gunzip(data: bytes) -> int:
    d = zlib.decompressobj(wbits=31)
    n = 0
    view = memoryview(data)
    for off in range(0, len(data), 1 << 20):
        n += len(d.decompress(view[off:off + (1 << 20)]))
    return n + len(d.flush())


def scenario(b: Bench) -> dict[str, Any]:
    img = b.image
    gz = [img.layer_path(layer).read_bytes() for layer in img.layers]
    layout = Layout(img.images / img.lazy)
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    index_digest = manifest["layers"][0]["digest"]
    reader = IndexReader(layout.blob_path(index_digest))
    try:
        by_blob: dict[str, list] = {}
        for chunk in reader.all_chunks():
            by_blob.setdefault(chunk.blob.digest, []).append(chunk)
    finally:
        reader.close()
    gz_cpu, lz_cpu = [], []
    out_gz = out_lz = 0
    lz4_chunks = raw_chunks = 0
    for i in range(b.params.runs):
        log(f"decompress run {i + 1}/{b.params.runs}")
        t = time.process_time()
        out_gz = sum(_gunzip(data) for data in gz)
        gz_cpu.append(time.process_time() - t)
        cpu = 0.0
        out_lz = lz4_chunks = raw_chunks = 0
        for digest, chunks in by_blob.items():
            blob = memoryview(layout.blob_path(digest).read_bytes())
            t = time.process_time()
            for c in chunks:
                out_lz += len(decode(c.codec, c.size, blob[c.offset:c.offset + c.stored_size]))
                if c.codec == CODEC_LZ4:
                    lz4_chunks += 1
                else:
                    raw_chunks += 1
            cpu += time.process_time() - t
        lz_cpu.append(cpu)
    out: dict[str, Any] = {
        "gzip_layers_bytes": sum(len(x) for x in gz), "gzip_output_bytes": out_gz,
        "chunk_output_bytes": out_lz, "lz4_chunks": lz4_chunks, "raw_chunks": raw_chunks,
        "gunzip_cpu_s": stats(gz_cpu), "lz4_cpu_s": stats(lz_cpu),
        "note": "gunzip output is the layer tars (headers and all files); chunk output is the "
                "deduplicated file contents",
    }
    out["ratios"] = {"gunzip_vs_lz4": out["gunzip_cpu_s"]["median"] / max(out["lz4_cpu_s"]["median"], 1e-9)}
    return out
