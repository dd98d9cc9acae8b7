"""``lazyfs trace show|push``: look at an image's learned prefetch trace, attach it to the
image in its registry; and the ``--slow`` part of ``lazyfs status``.

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
from typing import Any

from .errors import ExitCode, UserError


def register(sub: Any, default_cache: Path, add_registry_arguments: Any) -> None:
    """Add ``trace`` and its subcommands to the command line."""
    p = sub.add_parser("trace", help="show or push an image's learned prefetch trace")
    tsub = p.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")

    s = tsub.add_parser("show", help="files and chunks in first-read order, bytes, timing")
    s.add_argument("ref", nargs="?", help="HOST[:PORT]/REPO[:TAG|@DIGEST] as it was mounted")
    s.add_argument("--digest", help="the image's manifest digest (sha256:...) instead of REF")
    s.add_argument("--cache", default=str(default_cache), help=f"node cache (default {default_cache})")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_trace_show)

    s = tsub.add_parser("push", help="attach the trace to the image in its registry (an OCI referrer)")
    s.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    s.add_argument("--cache", default=str(default_cache), help=f"node cache (default {default_cache})")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds one registry request may take")
    add_registry_arguments(s)
    s.set_defaults(func=cmd_trace_push)


def _load(cache: Path, digest: str, what: str) -> Any:
    from cache.trace import TraceStore

    if not cache.is_dir():
        raise UserError(f"cache directory {cache} does not exist", ExitCode.CACHE)
    try:
        trace = TraceStore(cache).load(digest)
    except ValueError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from None
    if trace is None or not trace.runs:
        raise UserError(f"no trace of {what} in {cache} (mount it once; reads are recorded)", ExitCode.IMAGE)
    return trace


def summary(trace: Any) -> dict[str, Any]:
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
    from cache.images import ImageStore

    from .cli import _human, _image_ref

    cache = Path(args.cache)
    if bool(args.ref) == bool(args.digest):
        raise UserError("give REF or --digest D (one of them)", ExitCode.USAGE)
    if args.digest:
        digest, what = args.digest, args.digest
    else:
        ref = _image_ref(args.ref)
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
          + ", ".join(f"{r['recorded']} ({r['chunks']} chunks, {_run_source(r['source'])})"
                      for r in info["runs"]))
    print(f"  first     {len(info['files'])} files, {info['chunks']} chunks, {_human(info['bytes'])}, "
          f"read within {info['last_read_s']:.2f}s of the mount")
    by_file: dict[str, list[dict[str, Any]]] = {}
    for e in info["entries"]:
        by_file.setdefault(e["file"], []).append(e)
    for f in info["files"]:
        print(f"  {f['first_read_s']:8.3f}s  {f['chunks']:4d} chunks  {_human(f['bytes']):>10}  /{f['file']}")
        for e in by_file[f["file"]]:
            print(f"             chunk {e['chunk'][:16]} at {e['offset']:<10d} {_human(e['bytes']):>10}"
                  f"  {e['t']:.3f}s")
    return 0


def cmd_trace_push(args: argparse.Namespace) -> int:
    import trio

    from .cli import _image_ref, _registry_options

    ref = _image_ref(args.ref)
    options = _registry_options(args)
    cache = Path(args.cache)
    digest, artifact = trio.run(_push, ref, options, cache)
    print(f"attached the trace of {ref} ({digest}) to it in the registry as {artifact}")
    return 0


async def _push(ref: Any, options: Any, cache: Path) -> tuple[str, str]:
    from cache.trace import TRACE_MEDIA_TYPE
    from fetcher.manifests import resolve_image_manifest
    from fetcher.referrers import push_referrer

    async with options.client(ref, push=True) as client:
        manifest = await resolve_image_manifest(client, ref)
        trace = _load(cache, manifest.digest, f"{ref} ({manifest.digest})")
        artifact = await push_referrer(client, manifest, TRACE_MEDIA_TYPE, trace.to_json(sources=False))
    return manifest.digest, artifact


def _run_source(source: str | None) -> str:
    """Where a run came from, as ``show`` and ``status`` say it."""
    if source is None:
        return "source unknown"
    return "recorded here" if source == "recorded" else f"from {source}"


def print_trace(status: dict[str, Any]) -> None:
    """The learned-prefetch lines of ``lazyfs status``."""
    from .cli import _human

    t = status.get("trace")
    if not t:
        return
    rec = ("recording" if t["recording"] else "recorded") + f" {t['recorded_chunks']} first reads"
    if t["saved"]:
        rec += f" (saved to {t['saved']})"
    print(f"  trace     {rec}")
    if t["lead_state"] != "none" and not t["lead_chunks"]:
        print("  learned   no trace for this image (prefetch in blob order)")
    elif t["lead_state"] != "none":
        print(f"  learned   {t['lead_state']}: {t['lead_chunks']} chunks ({_human(t['lead_bytes'])}) "
              f"from {t['lead_source'] or 'nowhere'}, {t['lead_missing']} were missing, "
              f"{t['lead_misses']} waited for by reads")
        runs = t.get("lead_runs") or []
        if runs:
            print("  runs      " + ", ".join(
                f"{r['recorded']} ({r['chunks']} chunks, {_run_source(r['source'])})" for r in runs))


def print_slow(status: dict[str, Any]) -> None:
    """``lazyfs status --slow``: the reads that waited longest on the network."""
    slow = status.get("slow") or []
    t = status.get("trace") or {}
    print(f"  demand    {status['reads']['chunk_misses']} chunks waited on the network"
          + (f" ({t['lead_misses']} of them in the learned order)" if t.get("lead_chunks") else ""))
    if not slow:
        print("  slowest   no read has waited on the network")
        return
    print(f"  slowest   {len(slow)} reads that waited longest on the network:")
    for r in slow:
        more = f" +{r['chunk_count'] - len(r['chunks'])}" if r["chunk_count"] > len(r["chunks"]) else ""
        print(f"    {r['wait'] * 1000:9.1f} ms  /{r['file']} at {r['offset']}+{r['size']} "
              f"({r['at']:.2f}s after mount), chunks {' '.join(c[:16] for c in r['chunks'])}{more}")
