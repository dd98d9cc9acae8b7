"""``lazyfs pull REF``: a lazyfs image (or an ordinary one with a side index) into containerd
lazily, its layers as remote snapshots of the snapshotter (nothing but the manifest and
config is downloaded)."""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("pull", help="pull a lazyfs image, or one with a side index, into containerd "
                                    "lazily (no layer download)")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--address", "-a", help="containerd's socket ($CONTAINERD_ADDRESS)",
                   default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"))
    p.add_argument("--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
                   help="containerd namespace ($CONTAINERD_NAMESPACE, default 'default')")
    p.add_argument("--snapshotter", default="lazyfs", help="the proxy plugin's name in containerd's config")
    p.add_argument("--snapshotter-address", metavar="SOCKET",
                   default=os.environ.get("LAZYFS_SNAPSHOTTER_ADDRESS", "/run/lazyfs/snapshotter.sock"),
                   help="the lazyfs snapshotter's socket ($LAZYFS_SNAPSHOTTER_ADDRESS, default %(default)s): "
                        "the snapshotter pulls, its imports done; with none there, this process does")
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    from ..snapshotter.pullsocket import pull_socket, request_pull  # the standard library's only

    started = time.monotonic()
    request = {"ref": args.ref, "address": os.path.abspath(args.address), "namespace": args.namespace,
               "snapshotter": args.snapshotter}
    answer = request_pull(pull_socket(Path(args.snapshotter_address).absolute()), request)
    if answer is not None:
        name, digest, layers = answer["name"], answer["digest"], answer["layers"]
    else:
        # grpc, trio and the generated containerd stubs: only when no snapshotter pulls; and
        # looked up when the command runs (bench/pull_phases.py wraps client.pull to time it)
        from ..snapshotter.client import pull

        result = pull(args.ref, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter)
        name, digest, layers = result.name, result.digest, result.layers
    print(f"pulled {name} ({digest}) lazily into containerd: {layers} layers as "
          f"remote snapshots of {args.snapshotter} in {time.monotonic() - started:.1f}s")
    gc.freeze()  # what is loaded stays for the exit, which then need not collect it (0.2 s)
    return 0
