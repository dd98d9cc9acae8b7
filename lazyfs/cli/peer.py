"""``lazyfs peer``: serve a node cache's chunks to the other nodes; and the peer options of
``mount`` and ``snapshotter`` (``--peers-file``, ``--token-file``, ``--advertise``),
checked here the same way for all three so that a mistake is one line at once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExitCode, UserError
from .common import DEFAULT_CACHE, DEFAULT_TIMEOUT, add_cache_size, add_metrics, seconds

if TYPE_CHECKING:
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("peer", help="serve a node cache's chunks to the other nodes")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help=f"node cache directory (default {DEFAULT_CACHE})")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--advertise", metavar="URL",
                   help="this node's URL in the peers file (default http://LISTEN); logged, and "
                        "what this node's mounts pass as their --advertise")
    p.add_argument("--token-file", required=True, help="file holding the cluster token")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to non-loopback registries")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT,
                   help="seconds fetching a missing chunk from its registry may take (default 30)")
    add_cache_size(p)
    add_metrics(p)
    p.set_defaults(func=cmd_peer)


def cmd_peer(args: argparse.Namespace) -> int:
    import trio  # with the peer server and the cache: for this command only

    from ..peer import read_token, run_peer

    token = read_token(Path(args.token_file))
    host, port = args.listen
    advertise = advertised(args.advertise)
    trio.run(lambda: run_peer(Path(args.cache).absolute(), host, port, token, fetch_timeout=args.timeout,
                              insecure=True if args.insecure else None, cache_size=args.cache_size,
                              metrics=args.metrics, advertise=advertise))
    return 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerFiles:
    """The peer options of a mount or of the snapshotter, checked."""

    peers_file: Path | None
    """The peers file, absolute; None for a mount that only listens."""
    token_file: Path
    """The cluster token's file, absolute."""
    advertise: str | None
    """This node's URL in the peers file, normalized; None: not given."""


def checked_peers(args: argparse.Namespace, *, listen: tuple[str, int] | None,
                  can_listen: bool = True) -> PeerFiles | None:
    """``--peers-file``, ``--token-file`` and ``--advertise`` of a mount (``listen`` its
    ``--listen``) or of the snapshotter (``can_listen=False``: its mounts never listen),
    checked: None without peers."""
    from ..peer import read_token  # with trio and the cache: only when peers are asked for

    if args.peers_file is None and listen is None:
        if args.advertise is not None:
            raise UserError("--advertise needs --peers-file (it names this node there)", ExitCode.USAGE)
        if args.token_file is not None:
            raise UserError("--token-file needs --peers-file" + (" or --listen" if can_listen else ""),
                            ExitCode.USAGE)
        return None
    if args.token_file is None:
        raise UserError(("--peers-file and --listen need" if can_listen else "--peers-file needs")
                        + " --token-file (the cluster token)", ExitCode.USAGE)
    if args.advertise is not None and args.peers_file is None:
        raise UserError("--advertise needs --peers-file (it names this node there)", ExitCode.USAGE)
    read_token(Path(args.token_file))
    advertise = advertised(args.advertise)
    if args.peers_file is not None:
        _check_peers_file(Path(args.peers_file))
    return PeerFiles(
        peers_file=Path(args.peers_file).absolute() if args.peers_file else None,
        token_file=Path(args.token_file).absolute(),
        advertise=advertise,
    )


def advertised(url: str | None) -> str | None:
    """``--advertise``, normalized as the peers file's lines are."""
    from fetcher.peerwire import normalize_url

    if url is None:
        return None
    try:
        return normalize_url(url)
    except ValueError as exc:
        raise UserError(f"--advertise: {exc}", ExitCode.USAGE) from None


def _check_peers_file(path: Path) -> None:
    """A peers file to start with is there and every line of it is a peer URL (later
    changes are checked as they are read: a bad one keeps the last good list)."""
    from fetcher.peers import read_peers_file  # with trio: when used

    if not path.is_file():
        raise UserError(f"peers file {path} does not exist", ExitCode.USAGE)
    try:
        read_peers_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read peers file {path}: {exc}", ExitCode.USAGE) from None
    except ValueError as exc:
        raise UserError(f"peers file {exc}", ExitCode.USAGE) from None
