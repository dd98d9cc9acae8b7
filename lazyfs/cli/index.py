"""``lazyfs index docker://HOST/REPO:TAG``: build the side index of an ordinary image and
attach it to the image in its registry, so that ``lazyfs mount`` starts it lazily as it is
(``lazyfs.sideindex``)."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from blockindex.format import DEFAULT_CHUNK_SIZE

from .common import chunk_size_arg, human, seconds, size
from .registry import add_registry_arguments, image_ref, registry_options

if TYPE_CHECKING:
    from .common import SubParsers

DEFAULT_SPACING = 512 << 10  # as blockindex.sideindex (not imported: it loads indexed_gzip)
MIN_SPACING, MAX_SPACING = 64 << 10, 1 << 30


def register(sub: SubParsers) -> None:
    p = sub.add_parser("index", help="attach a side index to an ordinary image, to mount it lazily")
    p.add_argument("image", help="docker://HOST/REPO[:TAG|@DIGEST]")
    p.add_argument("--chunk-size", type=chunk_size_arg, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size (default 1M; 4K..64M)")
    p.add_argument("--spacing", type=_spacing, default=DEFAULT_SPACING,
                   help="uncompressed bytes between checkpoints in a gzip layer (default 512K; "
                        "64K..1G): smaller reads fewer bytes per chunk, for a larger index")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform one (default: this machine's)")
    p.add_argument("--timeout", type=seconds,
                   help="seconds one registry request may take (default: the config file's, else 30)")
    add_registry_arguments(p)
    p.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from ..errors import ExitCode, UserError
    from ..sideindex import index_image  # the builder, indexed_gzip and the registry client: here only

    if not args.image.startswith("docker://"):
        raise UserError(f"{args.image}: expected docker://HOST/REPO[:TAG|@DIGEST]", ExitCode.USAGE)
    ref = image_ref(args.image.removeprefix("docker://"))
    started = time.monotonic()
    done = index_image(ref, registry_options(args), chunk_size=args.chunk_size, spacing=args.spacing,
                       platform=args.platform)
    took = time.monotonic() - started
    print(f"indexed {ref} ({done.manifest_digest}) in {took:.1f}s: {done.files} files, "
          f"{human(done.image_bytes)} in {done.chunks} chunks, {done.checkpoints} checkpoints in "
          f"{done.layers} layers of {human(done.layer_bytes)}")
    print(f"side index {done.index_digest} ({human(done.index_bytes)}, "
          f"{100 * done.index_bytes / max(done.layer_bytes, 1):.2f}% of the layers) "
          f"attached as {done.artifact_digest}")
    return 0


def _spacing(text: str) -> int:
    n = size(text)
    if not MIN_SPACING <= n <= MAX_SPACING:
        raise argparse.ArgumentTypeError(f"spacing must be from 64K to 1G, not {text}")
    return n
