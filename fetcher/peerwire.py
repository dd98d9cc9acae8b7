"""The peer protocol on the wire: what ``fetcher.peers.PeerClient`` sends and
``lazyfs.peer.ChunkServer`` answers, in one place (the server's docstring tells the
statuses).

    GET /v1/chunks/<blake3 hex>[?blob=&offset=&stored=&size=&codec=&repo=]
    GET /v1/traces/sha256:<manifest hex>
    GET /v1/blobs/sha256:<hex>?size=&repo=         a whole blob (an image's index)
        Authorization: Bearer <cluster token>
        X-Lazyfs-Node: <the asking process's random id>
    an answer with a chunk carries X-Lazyfs-Codec and X-Lazyfs-Size

A peer is named by its URL, ``http://HOST:PORT``.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode

from blockindex.format import CODECS, Blob, Chunk, ChunkDigest

from .address import parse_url
from .imageref import is_digest

CHUNK_PATH = "/v1/chunks/"
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


def authorization(token: str) -> str:
    """The ``Authorization`` value that carries the cluster token."""
    return f"Bearer {token}"


def chunk_target(chunk: Chunk, repository: str | None) -> str:
    """The request target for ``chunk``; with ``repository`` (``registry/repo``), its
    query says where the chunk lies, so that an owner that lacks it can fetch it from
    the origin."""
    path = f"{CHUNK_PATH}{chunk.hexdigest}"
    if repository:
        path += "?" + urlencode({"blob": chunk.blob.digest, "offset": chunk.offset,
                                 "stored": chunk.stored_size, "size": chunk.size,
                                 "codec": chunk.codec, "repo": repository})
    return path


def parse_chunk_query(digest: ChunkDigest, query: str) -> tuple[Chunk | None, str | None]:
    """The chunk and ``registry/repo`` a ``chunk_target`` query names; (None, None) for a
    query without a location. ValueError for one that names a location badly."""
    q = {k: v[0] for k, v in parse_qs(query).items()}
    if "blob" not in q:
        return None, None
    try:
        blob = q["blob"]
        offset, stored, size, codec = (int(q[k]) for k in ("offset", "stored", "size", "codec"))
    except KeyError as exc:
        raise ValueError(f"no {exc.args[0]} in the query") from None
    if not blob.startswith("sha256:") or not is_digest(blob) or offset < 0 \
            or not 0 < stored <= MAX_CHUNK_FIELD or not 0 < size <= MAX_CHUNK_FIELD \
            or codec not in CODECS:
        raise ValueError("a field out of range")
    return Chunk(digest, Blob(0, blob, 0), offset, stored, size, codec), q.get("repo")


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
