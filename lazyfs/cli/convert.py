"""``lazyfs convert SOURCE DEST``: an image into a lazyfs image (an OCI layout or a push)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from blockindex.format import DEFAULT_CHUNK_SIZE
from blockindex.tree import MAX_ENTRIES

from ..errors import ExitCode, UserError
from .common import chunk_size_arg, human, seconds
from .registry import add_registry_arguments, image_ref, registry_options

if TYPE_CHECKING:
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("convert", help="convert an image into a lazyfs image (OCI layout)")
    p.add_argument("source", help="docker-archive:TAR, oci:DIR[:TAG], dir:ROOTFS, tar:ROOTFS.tar "
                                  "or docker://HOST/REPO[:TAG]")
    p.add_argument("dest", help="oci:DIR[:TAG] or docker://HOST/REPO:TAG")
    p.add_argument("--chunk-size", type=chunk_size_arg, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size (default 1M; 4K..64M)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform source (default: this machine's)")
    p.add_argument("--timeout", type=seconds,
                   help="seconds one registry request may take (default: the config file's, else 30)")
    p.add_argument("--prefetch-files", metavar="FILE",
                   help="paths in the image (one a line) whose chunks mounts fetch first")
    p.add_argument("--max-entries", type=_positive_int, default=MAX_ENTRIES, metavar="N",
                   help="refuse an image with more files, directories and links than this "
                        "(default 1000000; convert holds them in memory, about 1.5 KiB each)")
    p.add_argument("--compression", choices=("lz4", "zstd"), default="lz4",
                   help="how chunks are compressed (default lz4: fastest to read; zstd: a smaller "
                        "image for about 3x lz4's decode CPU, read by lazyfs with index format 2)")
    add_registry_arguments(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    # the converter and what it pulls in (lz4, blake3, the registry client): convert only
    from blockindex.errors import PrefetchListError

    from ..convert import convert

    for ref in (args.source, args.dest):
        if ref.startswith("docker://"):
            image_ref(ref.removeprefix("docker://"))
    first = _path_list(args.prefetch_files) if args.prefetch_files else None
    started = time.monotonic()
    try:
        result = convert(args.source, args.dest, chunk_size=args.chunk_size,
                         registry=registry_options(args), platform=args.platform, prefetch_files=first,
                         max_entries=args.max_entries, compression=args.compression)
    except PrefetchListError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from None
    took = time.monotonic() - started
    print(f"converted {args.source} -> {args.dest} in {took:.1f}s: {result.files} files, "
          f"{human(result.image_bytes)} in {result.chunks} chunks, "
          f"{human(result.stored_bytes)} stored in {result.blobs} blobs")
    if result.pushed is not None:
        p = result.pushed
        print(f"pushed: {p.uploaded} blobs uploaded ({human(p.uploaded_bytes)}), "
              f"{p.mounted} mounted from the source repository, {p.present} already there")
    print(f"manifest {result.manifest_digest}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _path_list(path: str) -> list[bytes]:
    """The paths of a ``--prefetch-files`` file: one a line, ``#`` comments, blanks skipped."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read prefetch list {path}: {exc.strerror}", ExitCode.USAGE) from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(b"#")]
