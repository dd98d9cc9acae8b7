"""Scenario 5: what the same image costs to store and to decompress, three ways.

A full pull gunzips every layer (zlib, what ``tar -xz`` and containerd use); lazyfs decodes
its chunks, lz4 by default or zstd (the image converted again with ``--compression zstd``;
raw chunks, where compression did not pay, cost nothing). Stored bytes: the gzip layers,
and the chunk blobs of each lazy image. CPU: ``time.process_time`` in this process over
bytes already in memory, so neither the disk nor the network is in the figure, repeated
``runs`` times; per GiB of output (the layer tars for gunzip, the chunk bytes for the
chunks), so that the three compare although gunzip also produces tar headers and files the
chunks deduplicate.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

from bench.context import Bench, stats
from bench.harness import log
from bench.image import convert_cached
from blockindex.codec import decode
from blockindex.format import CODEC_NAMES, Chunk
from blockindex.oci import Layout
from blockindex.reader import IndexReader

GIB = 1 << 30


def _gunzip(data: bytes) -> int:
    d = zlib.decompressobj(wbits=31)
    n = 0
    view = memoryview(data)
    for off in range(0, len(data), 1 << 20):
        n += len(d.decompress(view[off:off + (1 << 20)]))
    return n + len(d.flush())


def _chunks_by_blob(layout: Layout) -> tuple[dict[str, list[Chunk]], int]:
    """The image's chunks grouped by blob, and the bytes of its chunk blobs."""
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    reader = IndexReader(layout.blob_path(manifest["layers"][0]["digest"]))
    try:
        by_blob: dict[str, list[Chunk]] = {}
        for chunk in reader.all_chunks():
            by_blob.setdefault(chunk.blob.digest, []).append(chunk)
    finally:
        reader.close()
    return by_blob, sum(layer["size"] for layer in manifest["layers"][1:])


def _decode_all(layout: Layout, by_blob: dict[str, list[Chunk]]) -> tuple[float, int, dict[str, int]]:
    """CPU seconds to decode every chunk, the bytes decoded, and chunks per codec."""
    cpu = 0.0
    out = 0
    codecs: dict[str, int] = {}
    for digest, chunks in by_blob.items():
        blob = memoryview(layout.blob_path(digest).read_bytes())
        t = time.process_time()
        for c in chunks:
            out += len(decode(c.codec, c.size, blob[c.offset:c.offset + c.stored_size]))
        cpu += time.process_time() - t
        for c in chunks:
            codecs[CODEC_NAMES[c.codec]] = codecs.get(CODEC_NAMES[c.codec], 0) + 1
    return cpu, out, codecs


def scenario(b: Bench) -> dict[str, Any]:
    img = b.image
    zstd_repo = f"{img.lazy}-zstd"
    convert_cached(img.images, zstd_repo, f"oci:{img.images / img.pull}:1", "--compression", "zstd")
    gz = [img.layer_path(layer).read_bytes() for layer in img.layers]
    lazy = {"lz4": Layout(img.images / img.lazy), "zstd": Layout(img.images / zstd_repo)}
    chunks = {name: _chunks_by_blob(layout) for name, layout in lazy.items()}
    gz_cpu: list[float] = []
    cpu: dict[str, list[float]] = {name: [] for name in lazy}
    out_gz = 0
    out: dict[str, int] = {}
    codecs: dict[str, dict[str, int]] = {}
    for i in range(b.params.runs):
        log(f"decompress run {i + 1}/{b.params.runs}")
        t = time.process_time()
        out_gz = sum(_gunzip(data) for data in gz)
        gz_cpu.append(time.process_time() - t)
        for name, layout in lazy.items():
            spent, out[name], codecs[name] = _decode_all(layout, chunks[name][0])
            cpu[name].append(spent)
    res: dict[str, Any] = {
        "gzip_layers_bytes": sum(len(x) for x in gz), "gzip_output_bytes": out_gz,
        "chunk_output_bytes": out["lz4"],
        "stored_bytes": {"gzip": sum(len(x) for x in gz), "lz4": chunks["lz4"][1],
                         "zstd": chunks["zstd"][1]},
        "chunks_by_codec": codecs,
        "lz4_chunks": codecs["lz4"].get("lz4", 0), "raw_chunks": codecs["lz4"].get("raw", 0),
        "gunzip_cpu_s": stats(gz_cpu), "lz4_cpu_s": stats(cpu["lz4"]), "zstd_cpu_s": stats(cpu["zstd"]),
        "note": "gunzip output is the layer tars (headers and all files); chunk output is the "
                "deduplicated file contents",
    }
    per_gib = {
        "gunzip": res["gunzip_cpu_s"]["median"] * GIB / max(out_gz, 1),
        "lz4": res["lz4_cpu_s"]["median"] * GIB / max(out["lz4"], 1),
        "zstd": res["zstd_cpu_s"]["median"] * GIB / max(out["zstd"], 1),
    }
    res["cpu_s_per_gib"] = per_gib
    res["ratios"] = {
        "gunzip_vs_lz4": res["gunzip_cpu_s"]["median"] / max(res["lz4_cpu_s"]["median"], 1e-9),
        "zstd_vs_lz4_per_gib": per_gib["zstd"] / max(per_gib["lz4"], 1e-9),
        "gunzip_vs_zstd_per_gib": per_gib["gunzip"] / max(per_gib["zstd"], 1e-9),
        "zstd_stored_vs_lz4": res["stored_bytes"]["zstd"] / max(res["stored_bytes"]["lz4"], 1),
        "zstd_stored_vs_gzip": res["stored_bytes"]["zstd"] / max(res["stored_bytes"]["gzip"], 1),
    }
    return res
