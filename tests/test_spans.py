"""The chunks of a fetched range of a gzip layer (``fetcher.spans``), against the layer's
own bytes: every chunk of the range out of one inflate that goes only as far as the chunk
asked for; bad bytes fail only the chunks they reach; the checked chunks are cached and
the bad ones not; the chunks a range brings along."""

from __future__ import annotations

import gzip
import zlib

import pytest

from blockindex import gzspan
from blockindex.codec import ChunkDecodeError, chunk_digest
from blockindex.format import CODEC_GZIP_SPAN, Blob, Chunk
from blockindex.gzspan import GzipSpan
from cache.store import ChunkStore
from fetcher import spans
from fetcher.plan import Range, plan_ranges
from fetcher.spans import InflatedRange, with_mates
from fetcher.verify import verify_range

from .test_gzspan import _data, _points


class Layer:
    """A gzip layer, its checkpoints, and its chunks made as the index reader makes them."""

    def __init__(self, tmp_path, seed: int = 1) -> None:
        self.data = _data(seed)
        path = tmp_path / "layer.gz"
        path.write_bytes(gzip.compress(self.data, 6))
        self.comp = path.read_bytes()
        by_offset = {p.uoffset: p for p in _points(path) if p.coffset < len(self.comp)}
        self.points = sorted(by_offset.values(), key=lambda p: p.uoffset)
        self.blob = Blob(1, "sha256:" + "0" * 64, len(self.comp))

    def chunk(self, uoffset: int, size: int) -> Chunk:
        start = max((p for p in self.points if p.uoffset <= uoffset), key=lambda p: p.uoffset)
        after = [p for p in self.points if p.uoffset >= uoffset + size]
        first = start.coffset - 1 if start.bits else start.coffset
        end = after[0].coffset if after else len(self.comp)
        window = zlib.compress(start.window) if start.window else b""
        span = GzipSpan(bits=(8 - start.bits) % 8, skip=uoffset - start.uoffset, window=window,
                        point=start.uoffset)
        return Chunk(chunk_digest(self.data[uoffset:uoffset + size]), self.blob, first, end - first,
                     size, CODEC_GZIP_SPAN, span)

    def plain(self, c: Chunk) -> bytes:
        assert c.span is not None
        at = c.span.point + c.span.skip
        return self.data[at:at + c.size]


def _one_range(chunks: list[Chunk]) -> Range:
    [rng] = plan_ranges(chunks, max_request=1 << 30, max_gap=1 << 30)
    return rng


@pytest.fixture
def inflates(monkeypatch):
    """Every SpanInflater made, with the output lengths it was asked for; and no chunk
    inflated on its own from its checkpoint."""
    made: list[list[int]] = []

    class Counting(gzspan.SpanInflater):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.wants: list[int] = []
            made.append(self.wants)

        def upto(self, want: int) -> int:
            self.wants.append(want)
            return super().upto(want)

    monkeypatch.setattr(spans, "SpanInflater", Counting)
    return made


def test_every_chunk_of_a_range_comes_out_of_one_inflate(tmp_path, inflates, monkeypatch):
    layer = Layer(tmp_path)
    p = layer.points
    # small chunks over three spans (the last one crossing into the fourth), out of order
    chunks = [layer.chunk(u, 9000) for u in range(p[2].uoffset + 100, p[5].uoffset + 5000, 41_000)]
    assert len({c.offset for c in chunks}) >= 3
    rng = _one_range(chunks)
    monkeypatch.setattr(spans, "decode_verified", lambda *_: pytest.fail("inflated on its own"))
    inflated = InflatedRange(rng, layer.comp[rng.start:rng.end])
    for c in reversed(chunks):
        assert inflated.plain(c) == layer.plain(c)
    assert len(inflates) == 1


def test_the_first_chunk_is_inflated_only_as_far_as_it_ends(tmp_path, inflates):
    layer = Layer(tmp_path)
    p = layer.points
    first, later = layer.chunk(p[3].uoffset + 10, 4000), layer.chunk(p[4].uoffset - 6000, 4000)
    assert first.offset == later.offset  # one span
    rng = _one_range([first, later])
    inflated = InflatedRange(rng, layer.comp[rng.start:rng.end])
    assert inflated.plain(first) == layer.plain(first)
    assert inflates == [[10 + 4000]]
    assert inflated.plain(later) == layer.plain(later)
    assert inflates == [[10 + 4000, p[4].uoffset - p[3].uoffset - 2000]]


def test_bytes_that_do_not_inflate_fail_only_the_chunks_they_reach(tmp_path):
    layer = Layer(tmp_path)
    p = layer.points
    before, spoilt = layer.chunk(p[1].uoffset + 10, 3000), layer.chunk(p[2].uoffset - 20_000, 3000)
    past = layer.chunk(p[2].uoffset + 3000, 3000)  # the next span: a checkpoint of its own
    assert before.offset == spoilt.offset < past.offset
    rng = _one_range([before, spoilt, past])
    data = bytearray(layer.comp[rng.start:rng.end])
    # the middle of the first span (text: Huffman blocks), after the first chunk's end
    middle = (p[2].coffset - rng.start) // 2
    for k in range(middle, middle + 40):
        data[k] ^= 0xFF
    inflated = InflatedRange(rng, data)
    assert inflated.plain(before) == layer.plain(before)
    with pytest.raises(ChunkDecodeError):
        inflated.plain(spoilt)
    assert inflated.plain(past) == layer.plain(past)


def test_a_changed_stored_byte_fails_only_its_chunk_and_is_not_cached(tmp_path):
    layer = Layer(tmp_path)
    random_at = len(layer.data) - 300_000  # the middle of the random bytes: stored blocks
    chunks = [layer.chunk(u, 8000) for u in (random_at - 30_000, random_at, random_at + 30_000)]
    rng = _one_range(chunks)
    data = bytearray(layer.comp[rng.start:rng.end])
    at = bytes(data).index(layer.data[random_at + 100:random_at + 132])
    data[at] ^= 0x55
    store = ChunkStore(tmp_path / "cache")
    results = verify_range(rng, data, store, spans=InflatedRange(rng, data))
    assert [None if isinstance(r, ChunkDecodeError) else bytes(r) for r in results] == \
        [layer.plain(chunks[0]), None, layer.plain(chunks[2])]
    assert [store.contains(c.digest) for c in chunks] == [True, False, True]


def test_a_range_brings_along_the_free_chunks_within_its_bytes(tmp_path):
    layer = Layer(tmp_path)
    p = layer.points
    asked = layer.chunk(p[3].uoffset + 50_000, 2000)
    [rng] = plan_ranges([asked], max_request=1 << 30, max_gap=0)
    earlier, cached, after = (layer.chunk(p[3].uoffset + d, 2000) for d in (100, 20_000, 60_000))
    crossing = layer.chunk(p[4].uoffset - 1000, 2000)  # ends past the range: not brought
    grown = with_mates(rng, [earlier, cached, asked, after, crossing], lambda c: c is not cached)
    assert grown.chunks == (asked, earlier, after) and grown.neighbours == 2
    assert (grown.start, grown.end) == (rng.start, rng.end)
    assert with_mates(rng, [cached], lambda c: c is not cached) is rng
