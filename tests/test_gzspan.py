"""Inflating a gzip layer from a checkpoint (``blockindex.gzspan``), against zlib's own
reading of the whole stream: every bit offset a block can start at, stored blocks (which
a mere bit shift misreads), spans that cross into the next gzip member, and bad bytes."""

from __future__ import annotations

import gzip
import io
import random
import zlib

import indexed_gzip
import pytest

from blockindex.gzspan import PRIMERS, GzipSpan, SpanError, inflate_span, sparse_window
from blockindex.sideindex import parse_gzidx


def _data(seed: int) -> bytes:
    """Text (Huffman blocks), then random bytes (stored blocks), then text again."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    text = b" ".join(rng.choice(words) for _ in range(120_000))
    return text + rng.randbytes(300_000) + text[:100_000]


def _points(path, spacing=64 << 10):
    with indexed_gzip.IndexedGzipFile(str(path), spacing=spacing) as gz:
        gz.build_full_index()
        out = io.BytesIO()
        gz.export_index(fileobj=out)
    return parse_gzidx(out.getvalue())


def _span(comp: bytes, points, i: int, j: int | None, skip: int = 0):
    """The payload and span of the range from point ``i`` to point ``j`` (None: the end),
    as the index reader makes them."""
    p = points[i]
    first = p.coffset - 1 if p.bits else p.coffset
    end = len(comp) if j is None else points[j].coffset
    window = zlib.compress(p.window) if p.window else b""
    return comp[first:end], GzipSpan(bits=(8 - p.bits) % 8, skip=skip, window=window)


def test_primers_are_empty_blocks_of_every_residue():
    for residue, (primer, r) in PRIMERS.items():
        assert r == residue
        nbits = 8 * len(primer) - (8 - residue) % 8
        assert nbits % 8 == residue
        # the primer, then a final empty fixed block (BFINAL 1, BTYPE 01, end code) right after it
        stream = (int.from_bytes(primer, "little") | 0b011 << nbits).to_bytes(len(primer) + 2, "little")
        d = zlib.decompressobj(wbits=-15)
        assert d.decompress(stream) == b"" and d.eof


@pytest.mark.parametrize("seed", [1, 2])
def test_every_checkpoint_to_every_later_one_reads_exactly(tmp_path, seed):
    data = _data(seed)
    path = tmp_path / "layer.gz"
    path.write_bytes(gzip.compress(data, 6))
    comp = path.read_bytes()
    points = [p for p in _points(path) if p.coffset < len(comp)]
    assert len(points) > 8
    for i, p in enumerate(points):
        for j in [*range(i + 1, min(i + 4, len(points))), None]:
            end_u = len(data) if j is None else points[j].uoffset
            payload, span = _span(comp, points, i, j)
            assert inflate_span(payload, span, end_u - p.uoffset) == data[p.uoffset:end_u], (i, j)
            payload, span = _span(comp, points, i, j, skip=end_u - p.uoffset - 100)
            assert inflate_span(payload, span, 100) == data[end_u - 100:end_u]


def test_the_bit_offsets_seen_cover_every_residue(tmp_path):
    """The test above means something only if blocks start at every bit of a byte."""
    seen = set()
    for seed in range(1, 5):
        path = tmp_path / f"l{seed}.gz"
        path.write_bytes(gzip.compress(_data(seed), 6))
        seen |= {p.bits for p in _points(path)}
    assert seen == set(range(8))


def test_a_span_runs_on_into_the_next_gzip_member(tmp_path):
    data = _data(3)
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(data[:400_000]) + gzip.compress(data[400_000:]))
    comp = path.read_bytes()
    points = [p for p in _points(path) if p.coffset < len(comp)]
    crossing = [i for i in range(len(points) - 2) if points[i].uoffset < 400_000 < points[i + 2].uoffset]
    assert crossing
    i = crossing[0]
    payload, span = _span(comp, points, i, i + 2)
    want = data[points[i].uoffset:points[i + 2].uoffset]
    assert inflate_span(payload, span, len(want)) == want


def test_bytes_that_end_short_or_do_not_inflate_are_an_error(tmp_path):
    data = _data(4)
    path = tmp_path / "layer.gz"
    path.write_bytes(gzip.compress(data, 6))
    comp = path.read_bytes()
    points = _points(path)
    payload, span = _span(comp, points, 1, 2)
    size = points[2].uoffset - points[1].uoffset
    with pytest.raises(SpanError):
        inflate_span(payload[: len(payload) // 2], span, size)
    with pytest.raises(SpanError):
        inflate_span(payload, GzipSpan(bits=span.bits, skip=0, window=b"not zlib"), size)
    bad = bytearray(payload)
    for k in range(4, 40):
        bad[k] ^= 0xFF
    try:
        assert inflate_span(bytes(bad), span, size) != data[points[1].uoffset:points[2].uoffset]
    except SpanError:
        pass


def _payload(comp: bytes, p, cap: int | None = None) -> tuple[bytes, int]:
    first = p.coffset - 1 if p.bits else p.coffset
    return comp[first : None if cap is None else first + cap], (8 - p.bits) % 8


@pytest.mark.parametrize("seed", [1, 2])
def test_a_sparse_window_reads_every_span_exactly_and_compresses_to_little(tmp_path, seed):
    data = _data(seed) + gzip.decompress(gzip.compress(_data(seed + 10)))[:200_000]
    path = tmp_path / "layer.gz"
    comp = gzip.compress(data, 6)
    path.write_bytes(comp)
    points = _points(path)
    whole = thin = 0
    for i, p in enumerate(points):
        if not p.window or p.coffset >= len(comp):
            continue
        payload, bits = _payload(comp, p)
        sparse = sparse_window(payload, bits, p.window, to_end=True)
        assert len(sparse) == len(p.window)
        assert all(s in (0, w) for s, w in zip(sparse, p.window, strict=True))  # the window's bytes, or zero
        whole += len(zlib.compress(p.window, 9))
        thin += len(zlib.compress(sparse, 9))
        # from this checkpoint to the next, and on to the end: what the whole window reads
        end = points[i + 1].uoffset if i + 1 < len(points) else len(data)
        for stop in {end, len(data)}:
            span = GzipSpan(bits=bits, skip=0, window=zlib.compress(sparse))
            assert inflate_span(payload, span, stop - p.uoffset) == data[p.uoffset : stop]
    assert thin < whole / 2, (thin, whole)


def test_a_window_that_cannot_be_shown_unused_is_kept_whole(tmp_path):
    data = _data(3)
    comp = gzip.compress(data, 6)
    path = tmp_path / "layer.gz"
    path.write_bytes(comp)
    p = next(p for p in _points(path) if p.window and p.uoffset > 100_000)
    payload, bits = _payload(comp, p)
    assert sparse_window(payload, bits, p.window, to_end=True) != p.window  # the control
    short, _ = _payload(comp, p, cap=2000)  # too few bytes for 32 KiB of output, not the end
    assert sparse_window(short, bits, p.window, to_end=False) == p.window
    bad = b"\xff" * len(payload)  # a block of the reserved type 11: bytes that do not inflate
    assert sparse_window(bad, bits, p.window, to_end=True) == p.window
