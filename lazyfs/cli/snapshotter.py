"""``lazyfs snapshotter``: serve containerd's Snapshots API as a proxy plugin, with the
image mounts it starts, optionally the CRI image service (``--cri-keychain``) and metrics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cache.private import claim

from ..errors import ExitCode, UserError
from .common import DEFAULT_TIMEOUT, add_cache_size, add_metrics, log, seconds
from .peer import checked_peers

if TYPE_CHECKING:
    from ..snapshotter.keychain import ImageServiceProxy, Keychain
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("snapshotter", help="serve containerd's Snapshots API (a proxy plugin)")
    p.add_argument("--address", default="/run/lazyfs/snapshotter.sock", help="unix socket to serve on")
    p.add_argument("--root", default="/var/lib/lazyfs",
                   help="snapshots, metadata, mounts and the node cache (default /var/lib/lazyfs)")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT,
                   help="network deadline of the image mounts (default 30)")
    p.add_argument("--no-prefetch", action="store_true", help="image mounts fetch only what is read")
    p.add_argument("--verify-layers", action="store_true",
                   help="image mounts of ordinary images (side indexes) serve no file bytes until "
                        "every layer is checked against the image manifest (lazyfs mount --verify-layers)")
    p.add_argument("--no-mount-parent", "--no-spare", action="store_true",
                   help="start each image's mount process as a Python of its own, rather than forking "
                        "it from one process that has lazyfs loaded (which saves ~1 s and ~25 MB a mount)")
    p.add_argument("--peers-file", help="image mounts ask these peers for chunks and traces "
                                        "(one http://HOST:PORT a line; re-read on change)")
    p.add_argument("--token-file", help="the cluster token the image mounts present to peers")
    p.add_argument("--advertise", metavar="URL",
                   help="this node's URL in the peers file: where its `lazyfs peer` serves ROOT/cache")
    p.add_argument("--cri-keychain", metavar="SOCKET",
                   help="serve the CRI image service on SOCKET (kubelet's --image-service-endpoint), "
                        "forwarding to containerd's and keeping each pull's credentials for the "
                        "image's lazy mount (pods' imagePullSecrets)")
    p.add_argument("--containerd", metavar="SOCKET", default="/run/containerd/containerd.sock",
                   help="containerd's socket, where --cri-keychain forwards (default %(default)s)")
    add_cache_size(p)
    add_metrics(p)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_snapshotter)


def cmd_snapshotter(args: argparse.Namespace) -> int:
    # grpc and the generated containerd stubs: for the snapshotter only
    from ..snapshotter.filesystem import LazyFileSystem, PeerOptions
    from ..snapshotter.pullsocket import PullServer, pull_socket
    from ..snapshotter.server import serve
    from ..snapshotter.service import SnapshotService

    checked = checked_peers(args, listen=None, can_listen=False)
    peers = None
    if checked is not None:
        assert checked.peers_file is not None  # a snapshotter's mounts never listen
        peers = PeerOptions(peers_file=checked.peers_file, token_file=checked.token_file,
                            advertise=checked.advertise)
    if peers is not None and peers.advertise is None:
        log.warning("--peers-file without --advertise: the image mounts cannot tell which peer is "
                    "this node, so they ask this node's `lazyfs peer` for the chunks it owns")
    root = Path(args.root).absolute()
    # 0700 as containerd's own snapshotters; what is inside (snapshots' contents) keeps its modes
    claim(root, holds="snapshots", known=frozenset(), what="snapshotter root", inner=False)
    for option, value in (("--address", args.address), ("--cri-keychain", args.cri_keychain)):
        if value is not None:  # before anything starts: a bad path is a usage error
            try:
                Path(value).absolute().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{option} {value}: cannot make its directory ({exc.strerror})",
                                ExitCode.USAGE) from None
    proxy: ImageServiceProxy | None = None
    keychain: Keychain | None = None
    if args.cri_keychain is not None:
        from ..snapshotter.keychain import ImageServiceProxy, Keychain

        keychain = Keychain()
        proxy = ImageServiceProxy(keychain, Path(args.cri_keychain).absolute(), args.containerd)
    fs = LazyFileSystem(root, timeout=args.timeout, prefetch=not args.no_prefetch,
                        cache_size=args.cache_size, peers=peers, mount_parent=not args.no_mount_parent,
                        keychain=keychain, verify_layers=args.verify_layers)
    service = SnapshotService(root, fs)
    service.restore()
    if proxy is not None:
        try:
            proxy.start()
        except (RuntimeError, OSError) as exc:  # grpcio: the socket cannot be bound
            raise UserError(f"cannot serve the CRI image service on {args.cri_keychain}: {exc}",
                            ExitCode.USAGE) from None
    fs.start_mount_parent()
    pulls = PullServer(pull_socket(Path(args.address).absolute()))
    try:
        pulls.start()
    except OSError as exc:
        raise UserError(f"cannot take pulls on {pulls.path}: {exc.strerror}", ExitCode.USAGE) from None
    if args.metrics is not None:
        from ..metrics import Metrics, snapshotter_samples  # prometheus_client: with --metrics only

        metrics = Metrics()
        metrics.add_source(snapshotter_samples(service))
        metrics.serve(*args.metrics)
    try:
        serve(service, Path(args.address).absolute())
    finally:
        pulls.stop()
        if proxy is not None:
            proxy.stop()
        fs.close()
    return 0
