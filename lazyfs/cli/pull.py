"""``lazyfs pull REF``: a lazyfs image into containerd lazily, its layers as remote
snapshots of the snapshotter (nothing but the manifest and config is downloaded)."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("pull", help="pull a lazyfs image into containerd lazily (no layer download)")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--address", "-a", help="containerd's socket ($CONTAINERD_ADDRESS)",
                   default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"))
    p.add_argument("--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
                   help="containerd namespace ($CONTAINERD_NAMESPACE, default 'default')")
    p.add_argument("--snapshotter", default="lazyfs", help="the proxy plugin's name in containerd's config")
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    # grpc, trio and the generated containerd stubs: only when pulling; and looked up when
    # the command runs (bench/pull_phases.py wraps client.pull to time it)
    from ..snapshotter.client import pull

    started = time.monotonic()
    result = pull(args.ref, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter)
    print(f"pulled {result.name} ({result.digest}) lazily into containerd: {result.layers} layers as "
          f"remote snapshots of {args.snapshotter} in {time.monotonic() - started:.1f}s")
    return 0
