"""The peer protocol on the wire: what ``fetcher.peers.PeerClient`` sends and
``lazyfs.peer.ChunkServer`` answers, in one place (the server's docstring tells the
statuses).

    GET /v1/chunks/<blake3 hex>[?blob=&offset=&stored=&size=&codec=&repo=&index=]
    POST /v1/chunks                                 many chunks (a batch), see below
    GET /v1/traces/sha256:<manifest hex>
    GET /v1/blobs/sha256:<hex>?size=&repo=         a whole blob (an image's index)
        Authorization: Bearer <cluster token>
        X-Lazyfs-Node: <the asking process's random id>
    an answer with a chunk carries X-Lazyfs-Codec and X-Lazyfs-Size

A peer is named by its URL, ``http://HOST:PORT``.

A batch asks for up to ``MAX_BATCH_CHUNKS`` chunks of at most ``MAX_BATCH_BYTES`` stored
bytes in all in one request. Its body is JSON, ``{"repo": "registry/repo" or null,
"index": "sha256:<hex>" (optional), "prefetch": bool, "chunks": [[blake3 hex, blob,
offset, stored, size, codec], ...]}`` (without ``repo`` the peer answers from its cache
alone; ``prefetch``: nobody reads these chunks yet, so the owner fetches them at a lower
rate than a read's). The answer, 200,
is a stream of frames ended by the close of the connection, in whatever order the
chunks are had: each frame a ``FRAME`` head (digest, status, codec, uncompressed size,
length) and ``length`` bytes, then one ``END`` frame. Status ``OK`` carries the chunk's
stored payload; ``MISSING`` (not here) and ``FAILED`` (the owner could not fetch it)
carry nothing. A stream that ends before its ``END`` frame was cut short: the chunks it
did not carry go to the next source.

A chunk of an image nobody converted (a side index's gzip span, an eStargz image's gzip
member) has no stored form of its own that a node keeps: its stored bytes are a piece of
the image's layer that only the index can inflate. A peer sends its plain bytes instead
(codec ``CODEC_RAW``, ``size`` bytes: ``sends_plain``), which the asker checks against the
chunk's digest by the chunk's own function (``blockindex.codec.check_plain``). A request
for a gzip span names the side index it comes from (``index``): an owner that lacks the
span finds its checkpoint there (in its node cache) to fetch it from the origin; a gzip
member needs nothing more than its place.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from urllib.parse import parse_qs, urlencode

from blockindex.format import CODEC_GZIP_SPAN, CODEC_NAMES, CODECS, Blob, Chunk, ChunkDigest

from .address import parse_url
from .imageref import is_digest

CHUNK_PATH = "/v1/chunks/"
BATCH_PATH = "/v1/chunks"
"""``POST`` a batch here (see above)."""
TRACE_PATH = "/v1/traces/"
"""``GET /v1/traces/sha256:<hex>``: the learned prefetch trace a peer keeps for an image."""
BLOB_PATH = "/v1/blobs/"
"""``GET /v1/blobs/sha256:<hex>?size=N&repo=R``: a whole blob the node keeps (an image's
index), fetched from repository ``R`` of the origin first if it lacks it."""
NODE_HEADER = "X-Lazyfs-Node"
"""Sent with every peer request: the asking process's random id (see ``PeerClient``)."""
CODEC_HEADER = "X-Lazyfs-Codec"
"""Of an answer with a chunk: the codec of its payload (``blockindex.format``)."""
SIZE_HEADER = "X-Lazyfs-Size"
"""Of an answer with a chunk: its uncompressed size."""
MAX_CHUNK_FIELD = 1 << 27
"""The largest stored or uncompressed size a query may give."""
BATCH_CONTENT_TYPE = "application/vnd.lazyfs.chunk-frames"
MAX_BATCH_CHUNKS = 64
"""Chunks one batch may ask for."""
MAX_BATCH_BYTES = 4 << 20
"""Stored bytes one batch may ask for in all (a larger chunk is asked for alone)."""
MAX_BATCH_BODY = 64 << 10
"""The largest batch request body a server reads (64 chunks take about 12 KiB)."""
FRAME = struct.Struct("!32sBBII")
"""A frame's head: digest, status, codec, uncompressed size, length of what follows."""
OK, MISSING, FAILED, END = 0, 1, 2, 255
"""Frame statuses: the chunk; not here; the owner could not get it; the end of the answer."""


def authorization(token: str) -> str:
    """The ``Authorization`` value that carries the cluster token."""
    return f"Bearer {token}"


def sends_plain(chunk: Chunk) -> bool:
    """Whether a peer sends ``chunk``'s plain bytes rather than its stored payload (a gzip
    span or member: see the module docstring)."""
    return chunk.codec not in CODECS


def sent_size(chunk: Chunk) -> int:
    """The bytes a peer's answer for ``chunk`` holds."""
    return chunk.size if sends_plain(chunk) else chunk.stored_size


def chunk_target(chunk: Chunk, repository: str | None, index: str | None = None) -> str:
    """The request target for ``chunk``; with ``repository`` (``registry/repo``), its
    query says where the chunk lies, so that an owner that lacks it can fetch it from
    the origin (a gzip span's, with ``index``: the side index that has its checkpoint).
    A chunk a peer sends plain is always named with its place: its codec says so."""
    path = f"{CHUNK_PATH}{chunk.hexdigest}"
    if repository or sends_plain(chunk):
        query = {"blob": chunk.blob.digest, "offset": chunk.offset, "stored": chunk.stored_size,
                 "size": chunk.size, "codec": chunk.codec}
        if repository:
            query["repo"] = repository
        if index and chunk.codec == CODEC_GZIP_SPAN:
            query["index"] = index
        path += "?" + urlencode(query)
    return path


def batch_body(chunks: Sequence[Chunk], repository: str | None, prefetch: bool = False,
               index: str | None = None) -> bytes:
    """The body of a batch request for ``chunks`` (see the module docstring)."""
    return json.dumps({"repo": repository, "prefetch": prefetch, **({"index": index} if index else {}),
                       "chunks": [[c.hexdigest, c.blob.digest, c.offset, c.stored_size, c.size, c.codec]
                                  for c in chunks]},
                      separators=(",", ":")).encode()


def parse_batch_body(body: bytes) -> tuple[list[Chunk], str | None, bool, str | None]:
    """The chunks, ``registry/repo``, prefetch flag and side index of a ``batch_body``;
    ValueError for anything else, a chunk out of range, or a batch over the caps."""
    try:
        doc = json.loads(body)
        repo, rows = doc["repo"], doc["chunks"]
    except (ValueError, TypeError, KeyError):
        raise ValueError("expected a JSON object with repo and chunks") from None
    if repo is not None and not isinstance(repo, str) or not isinstance(rows, list):
        raise ValueError("expected a JSON object with repo and chunks")
    index = _index(doc.get("index"))
    if not 0 < len(rows) <= MAX_BATCH_CHUNKS:
        raise ValueError(f"a batch asks for 1-{MAX_BATCH_CHUNKS} chunks")
    chunks = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 6 and all(isinstance(v, str) for v in row[:2])
                and all(type(v) is int for v in row[2:])):
            raise ValueError("a chunk is [digest, blob, offset, stored, size, codec]")
        digest, blob, offset, stored, size, codec = row
        if len(digest) != 64 or not all(ch in "0123456789abcdef" for ch in digest):
            raise ValueError("a chunk digest is 64 hex digits")
        chunks.append(_located(ChunkDigest(bytes.fromhex(digest)), blob, offset, stored, size, codec))
    if sum(sent_size(c) for c in chunks) > MAX_BATCH_BYTES and len(chunks) > 1:
        raise ValueError(f"a batch asks for at most {MAX_BATCH_BYTES} bytes")
    return chunks, repo, doc.get("prefetch") is True, index


def _index(value: object) -> str | None:
    """A side index's digest as a request names it (None when it names none); ValueError
    for anything but ``sha256:<64 hex digits>``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("sha256:") or not is_digest(value):
        raise ValueError("an index is sha256:<64 hex digits>")
    return value


def _located(digest: ChunkDigest, blob: str, offset: int, stored: int, size: int, codec: int) -> Chunk:
    """The chunk at that place; ValueError for a field out of range."""
    if not blob.startswith("sha256:") or not is_digest(blob) or offset < 0 \
            or not 0 < stored <= MAX_CHUNK_FIELD or not 0 < size <= MAX_CHUNK_FIELD \
            or codec not in CODEC_NAMES:
        raise ValueError("a field out of range")
    return Chunk(digest, Blob(0, blob, 0), offset, stored, size, codec)


def frame(digest: bytes, status: int, codec: int = 0, size: int = 0,
          payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """One frame of a batch answer: its head and its bytes."""
    return [FRAME.pack(digest, status, codec, size, len(payload)), payload]


def parse_chunk_query(digest: ChunkDigest, query: str) -> tuple[Chunk | None, str | None, str | None]:
    """The chunk, ``registry/repo`` and side index a ``chunk_target`` query names; all
    None for a query without a location. ValueError for one that names a location badly."""
    q = {k: v[0] for k, v in parse_qs(query).items()}
    if "blob" not in q:
        return None, None, None
    try:
        blob = q["blob"]
        offset, stored, size, codec = (int(q[k]) for k in ("offset", "stored", "size", "codec"))
    except KeyError as exc:
        raise ValueError(f"no {exc.args[0]} in the query") from None
    return _located(digest, blob, offset, stored, size, codec), q.get("repo"), _index(q.get("index"))


def blob_target(digest: str, size: int, repository: str | None) -> str:
    """The request target for the ``size``-byte blob ``digest``; with ``repository``, an
    owner that lacks it fetches it from the origin."""
    query = {"size": size, **({"repo": repository} if repository else {})}
    return f"{BLOB_PATH}{digest}?{urlencode(query)}"


def parse_blob_target(path: str, query: str, max_size: int) -> tuple[str, int | None, str | None]:
    """The digest, size and ``registry/repo`` a ``blob_target`` names (size and repository
    None when absent). ValueError for a malformed one, or a size over ``max_size``."""
    digest = path[len(BLOB_PATH):]
    if not digest.startswith("sha256:") or not is_digest(digest):
        raise ValueError("expected /v1/blobs/sha256:<64 hex digits>")
    q = {k: v[0] for k, v in parse_qs(query).items()}
    size = q.get("size")
    if size is not None and not (size.isdigit() and 0 < int(size) <= max_size):
        raise ValueError(f"size out of range (1-{max_size})")
    return digest, None if size is None else int(size), q.get("repo")


def normalize_url(url: str) -> str:
    """``http://host:port`` with no trailing slash: the form peers are compared in."""
    try:
        return str(parse_url(url.strip(), schemes=("http",), default_scheme="http", port_required=True))
    except ValueError as exc:
        raise ValueError(f"not a peer URL (expected http://HOST:PORT): {exc}") from None


def peer_url(host: str, port: int) -> str:
    """The URL of a peer listening on ``host:port``."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


WILDCARD_HOSTS = ("0.0.0.0", "::", "")
"""Listen addresses that name no one host: a URL built from one reaches no peer."""
