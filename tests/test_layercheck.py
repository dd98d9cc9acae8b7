"""``LayerCheck``: a layer fed whole, in pieces of any size, hashed and inflated from its
start, every chunk the index places in it checked; a lying chunk is a LayerMismatchError,
a blob that is not the manifest's an ImageError (the source's fault, not the index's)."""

from __future__ import annotations

import gzip
import hashlib
import random

import pytest

from blockindex.codec import chunk_digest
from blockindex.errors import ImageError, LayerMismatchError
from blockindex.format import CODEC_GZIP_SPAN, CODEC_RAW, Blob, Chunk, ChunkDigest
from blockindex.gzspan import GzipSpan
from blockindex.layercheck import LayerCheck

TAR = random.Random(3).randbytes(300_000) + b"text " * 100_000


def _digest(blob: bytes) -> str:
    return f"sha256:{hashlib.sha256(blob).hexdigest()}"


def _chunks(blob: bytes, codec: int, places: list[tuple[int, int]], plain: bytes = TAR) -> list[Chunk]:
    b = Blob(1, _digest(blob), len(blob))
    out = []
    for at, size in places:
        digest = chunk_digest(plain[at : at + size])
        if codec == CODEC_GZIP_SPAN:  # the window and offsets do not matter: the check ignores them
            span = GzipSpan(bits=0, skip=at - 1000, window=b"", point=1000)
            out.append(Chunk(digest, b, 0, len(blob), size, codec, span))
        else:
            out.append(Chunk(digest, b, at, size, size, codec))
    return out


PLACES = [(0, 65536), (100_000, 65536), (299_000, 2000), (500_000, 65536), (TAR.__len__() - 10, 10)]


def _run(check: LayerCheck, blob: bytes, piece: int) -> list[Chunk]:
    good = []
    for i in range(0, len(blob), piece):
        good += [c for c, plain in check.feed(blob[i : i + piece]) if chunk_digest(plain) == c.digest]
    check.finish()
    return good


@pytest.mark.parametrize("piece", [1000, 65536, 1 << 22])
def test_an_honest_gzip_layer_passes_and_gives_every_chunk(piece):
    blob = gzip.compress(TAR[:400_000], mtime=0) + gzip.compress(TAR[400_000:], mtime=0)  # two members
    chunks = _chunks(blob, CODEC_GZIP_SPAN, PLACES)
    got = _run(LayerCheck(_digest(blob), len(blob), chunks), blob, piece)
    assert sorted(c.digest for c in got) == sorted(c.digest for c in chunks)


def test_an_honest_uncompressed_layer_passes():
    chunks = _chunks(TAR, CODEC_RAW, PLACES)
    assert len(_run(LayerCheck(_digest(TAR), len(TAR), chunks), TAR, 70_000)) == len(PLACES)


def test_a_chunk_that_is_not_the_layers_bytes_is_a_mismatch():
    blob = gzip.compress(TAR, mtime=0)
    lying = TAR[:100_000] + b"X" + TAR[100_001:]  # the index's idea of the tar
    chunks = _chunks(blob, CODEC_GZIP_SPAN, PLACES, plain=lying)
    check = LayerCheck(_digest(blob), len(blob), chunks)
    with pytest.raises(LayerMismatchError, match="at 100000 of layer .* not the bytes its digest names"):
        _run(check, blob, 65536)


def test_a_chunk_past_the_end_of_the_layer_is_a_mismatch():
    blob = gzip.compress(TAR, mtime=0)
    chunks = _chunks(blob, CODEC_GZIP_SPAN, [(0, 100)])
    chunks.append(Chunk(ChunkDigest(b"\1" * 32), chunks[0].blob, 0, len(blob), 100, CODEC_GZIP_SPAN,
                        GzipSpan(bits=0, skip=len(TAR), window=b"", point=0)))
    with pytest.raises(LayerMismatchError, match="past the end"):
        _run(LayerCheck(_digest(blob), len(blob), chunks), blob, 65536)


def test_a_blob_that_is_not_the_manifests_is_an_image_error_not_a_mismatch():
    blob = bytearray(gzip.compress(TAR, mtime=0))
    chunks = _chunks(bytes(blob), CODEC_GZIP_SPAN, PLACES)
    blob[len(blob) // 2] ^= 0x55  # the source's fault: the index may well be honest
    with pytest.raises(ImageError, match="does not match its digest"):
        _run(LayerCheck(chunks[0].blob.digest, len(blob), chunks), bytes(blob), 65536)
    with pytest.raises(ImageError, match="not the manifest's"):
        _run(LayerCheck(chunks[0].blob.digest, len(blob) + 1, chunks), bytes(blob), 65536)
