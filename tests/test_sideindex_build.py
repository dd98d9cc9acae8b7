"""The side-index build's read-ahead: a layer inflates in a thread while its tar is parsed.
It hands over the stream exactly, raises what the thread's read raised at the read that
would have returned those bytes, stops its thread when closed early, and a layer read
through it indexes as one read directly does."""

from __future__ import annotations

import gzip
import io
import random
import threading

import pytest

from blockindex.sideindex import _ReadAhead


def test_the_stream_comes_through_exactly_whatever_the_read_sizes():
    data = random.Random(5).randbytes(3_000_000)
    rng = random.Random(6)
    with _ReadAhead(io.BytesIO(data), block=64 << 10, depth=2) as ahead:
        got = bytearray()
        while piece := ahead.read(rng.randint(1, 200_000)):
            got += piece
        assert ahead.total == len(data)
    assert bytes(got) == data


class Failing(io.RawIOBase):
    def __init__(self, good: int) -> None:
        self.good = good

    def read(self, n: int = -1) -> bytes:
        if self.good <= 0:
            raise OSError("the disk went away")
        n = min(n, self.good)
        self.good -= n
        return b"x" * n


def test_a_failed_read_is_raised_where_its_bytes_would_have_been():
    with _ReadAhead(Failing(100_000), block=30_000) as ahead:
        assert len(ahead.read(100_000)) == 30_000
        with pytest.raises(OSError, match="went away"):
            while ahead.read(50_000):
                pass
        assert ahead.total == 100_000


def test_closing_early_stops_the_thread_though_the_queue_is_full():
    before = threading.active_count()
    ahead = _ReadAhead(io.BytesIO(bytes(50_000_000)), block=1 << 20, depth=2)
    assert len(ahead.read(10)) == 10
    ahead.close()
    assert threading.active_count() == before


def test_read_to_end_reads_past_what_the_parser_wanted():
    data = gzip.decompress(gzip.compress(bytes(range(256)) * 5000))
    with _ReadAhead(io.BytesIO(data), block=4096) as ahead:
        ahead.read(1000)
        ahead.read_to_end()
        assert ahead.total == len(data)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_layer_read_through_the_read_ahead_gets_every_checkpoint(tmp_path, seed):
    import tarfile

    import indexed_gzip

    from blockindex.sideindex import SideSpool, _index_layer, parse_gzidx
    from blockindex.tree import Tree

    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        # 11 MB of text, then noise: a read through misses the last points of such a layer
        for n, body in enumerate([b" ".join(rng.choices(words, k=1_700_000)), rng.randbytes(60_000)]):
            info = tarfile.TarInfo(f"d/f{n}")
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    path = tmp_path / "layer.gz"
    path.write_bytes(gzip.compress(raw.getvalue() + bytes(rng.randint(0, 30_000)), 6))  # and padding
    spacing = 64 << 10
    layer = _index_layer(path, "sha256:" + "0" * 64, Tree(100_000), SideSpool(1 << 20), 0, spacing)
    with indexed_gzip.IndexedGzipFile(str(path), spacing=spacing) as gz:
        gz.build_full_index()
        out = io.BytesIO()
        gz.export_index(fileobj=out)
    size = path.stat().st_size
    whole = {p.uoffset: p for p in parse_gzidx(out.getvalue()) if p.coffset < size}
    assert [(p.coffset, p.uoffset, p.bits) for p in layer.checkpoints] == \
        [(p.coffset, p.uoffset, p.bits) for p in sorted(whole.values(), key=lambda p: p.uoffset)]
