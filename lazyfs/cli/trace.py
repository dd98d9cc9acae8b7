"""``lazyfs trace show|push``: look at an image's learned prefetch trace, attach it to the
image in its registry.

    lazyfs trace show REF | --digest D [--cache DIR] [--json]
    lazyfs trace push REF [--cache DIR] [registry options]

``show`` reads the node cache only (the trace is kept under the image's manifest digest;
REF is resolved the way this node last resolved it). ``push`` asks the registry for REF's
manifest, then attaches the trace kept for that digest as an OCI referrer (see
``fetcher.referrers``): the image itself is neither rebuilt nor pushed again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExitCode, UserError
from .common import DEFAULT_CACHE, human
from .registry import add_registry_arguments, image_ref, registry_options

if TYPE_CHECKING:
    from cache.trace import Trace
    from fetcher.imageref import ImageRef
    from fetcher.options import RegistryOptions

    from .common import SubParsers


def register(sub: SubParsers) -> None:
    """Add ``trace`` and its subcommands to the command line."""
    p = sub.add_parser("trace", help="show or push an image's learned prefetch trace")
    tsub = p.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")

    s = tsub.add_parser("show", help="files and chunks in first-read order, bytes, timing")
    s.add_argument("ref", nargs="?", help="HOST[:PORT]/REPO[:TAG|@DIGEST] as it was mounted")
    s.add_argument("--digest", help="the image's manifest digest (sha256:...) instead of REF")
    s.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"node cache (default {DEFAULT_CACHE})")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_trace_show)

    s = tsub.add_parser("push", help="attach the trace to the image in its registry (an OCI referrer)")
    s.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    s.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"node cache (default {DEFAULT_CACHE})")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds one registry request may take")
    add_registry_arguments(s)
    s.set_defaults(func=cmd_trace_push)


def _load(cache: Path, digest: str, what: str) -> Trace:
    from cache.trace import TraceStore  # the trace store, the cache's modules: when used

    if not cache.is_dir():
        raise UserError(f"cache directory {cache} does not exist", ExitCode.CACHE)
    try:
        trace = TraceStore(cache).load(digest)
    except ValueError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from None
    if trace is None or not trace.runs:
        raise UserError(f"no trace of {what} in {cache} (mount it once; reads are recorded)", ExitCode.IMAGE)
    return trace


def summary(trace: Trace) -> dict[str, Any]:
    """The merged trace as ``show`` prints it: files in first-read order, then chunks."""
    entries = trace.merged()
    files: dict[str, dict[str, Any]] = {}
    for e in entries:
        f = files.get(e.file)
        if f is None:
            f = files[e.file] = {"file": e.file, "first_read_s": e.t, "chunks": 0, "bytes": 0}
        f["chunks"] += 1
        f["bytes"] += e.bytes
    return {
        "manifest": trace.manifest,
        "runs": [{"recorded": r.recorded, "window": r.window, "chunks": len(r.entries), "source": r.source}
                 for r in trace.runs],
        "chunks": len(entries),
        "bytes": sum(e.bytes for e in entries),
        "last_read_s": max((e.t for e in entries), default=0.0),
        "files": list(files.values()),
        "entries": [{"chunk": e.chunk, "file": e.file, "offset": e.offset, "t": e.t, "bytes": e.bytes}
                    for e in entries],
    }


def cmd_trace_show(args: argparse.Namespace) -> int:
    from cache.images import ImageStore  # the cache's modules: when used

    cache = Path(args.cache)
    if bool(args.ref) == bool(args.digest):
        raise UserError("give REF or --digest D (one of them)", ExitCode.USAGE)
    if args.digest:
        digest, what = args.digest, args.digest
    else:
        ref = image_ref(args.ref)
        digest = ref.digest or (ImageStore(cache).resolve(str(ref)) if cache.is_dir() else None)
        if digest is None:
            raise UserError(f"{ref} was never mounted with cache {cache} (or pass --digest)", ExitCode.IMAGE)
        what = str(ref)
    info = summary(_load(cache, digest, what))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{what}  ({info['manifest']})")
    print(f"  runs      {len(info['runs'])} merged: "
          + ", ".join(f"{r['recorded']} ({r['chunks']} chunks, {run_source(r['source'])})"
                      for r in info["runs"]))
    print(f"  first     {len(info['files'])} files, {info['chunks']} chunks, {human(info['bytes'])}, "
          f"read within {info['last_read_s']:.2f}s of the mount")
    by_file: dict[str, list[dict[str, Any]]] = {}
    for e in info["entries"]:
        by_file.setdefault(e["file"], []).append(e)
    for f in info["files"]:
        print(f"  {f['first_read_s']:8.3f}s  {f['chunks']:4d} chunks  {human(f['bytes']):>10}  /{f['file']}")
        for e in by_file[f["file"]]:
            print(f"             chunk {e['chunk'][:16]} at {e['offset']:<10d} {human(e['bytes']):>10}"
                  f"  {e['t']:.3f}s")
    return 0


def cmd_trace_push(args: argparse.Namespace) -> int:
    import trio  # with httpx, the registry client: for this command only

    ref = image_ref(args.ref)
    options = registry_options(args)
    cache = Path(args.cache)
    digest, artifact = trio.run(_push, ref, options, cache)
    print(f"attached the trace of {ref} ({digest}) to it in the registry as {artifact}")
    return 0


async def _push(ref: ImageRef, options: RegistryOptions, cache: Path) -> tuple[str, str]:
    # the registry client, httpx: when used
    from cache.trace import TRACE_MEDIA_TYPE
    from fetcher.manifests import resolve_image_manifest
    from fetcher.referrers import push_referrer

    async with options.client(ref, push=True) as client:
        manifest = await resolve_image_manifest(client, ref)
        trace = _load(cache, manifest.digest, f"{ref} ({manifest.digest})")
        artifact = await push_referrer(client, manifest, TRACE_MEDIA_TYPE, trace.to_json(sources=False))
    return manifest.digest, artifact


def run_source(source: str | None) -> str:
    """Where a run came from, as ``show`` and ``status`` say it."""
    if source is None:
        return "source unknown"
    return "recorded here" if source == "recorded" else f"from {source}"
