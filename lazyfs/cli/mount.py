"""``lazyfs mount REF DIR``: check the options, then mount in the foreground, or fork the
mount into the background and wait until it says the rootfs is there (or why not).

The launcher is on the path of every container start: it imports trio and
``lazyfs.mount`` once, just before it forks, so that the child has them and no second
interpreter starts; nothing else here imports them at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from cache.private import claim

from ..errors import ExitCode, MountError, UserError
from ..process import detach, read_ready, reap_child
from .common import DEFAULT_CACHE, add_cache_size, add_metrics, run, seconds, setup_logging, size, user_error
from .peer import checked_peers
from .registry import add_registry_arguments, registry_options

if TYPE_CHECKING:
    from ..mount import MountOptions
    from .common import SubParsers

MOUNT_READY_TIMEOUT = 300.0


def register(sub: SubParsers) -> None:
    p = sub.add_parser("mount", help="mount an image lazily")
    p.add_argument("ref", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("mountpoint")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help=f"node cache directory (default {DEFAULT_CACHE}, or $LAZYFS_CACHE)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    p.add_argument("--no-prefetch", action="store_true", help="fetch only what is read")
    p.add_argument("--verify-layers", action="store_true",
                   help="an ordinary image read by its side index serves no file bytes until each "
                        "layer has been read whole and the side index checked against the image's "
                        "layer digests (reads wait for it; EIO if it fails)")
    p.add_argument("--offline", action="store_true", help="use the cache alone, no network")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a non-loopback registry")
    p.add_argument("--timeout", type=seconds,
                   help="seconds a read may wait on the network before it fails with EIO "
                        "(default: the config file's, else 30)")
    p.add_argument("--log-file", help="where a background mount logs (default in the cache dir)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peers-file", help="ask these peers (one http://HOST:PORT a line; re-read on change)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also serve this node's cache to peers here")
    p.add_argument("--token-file", help="the cluster token peers present (needed with either option)")
    add_cache_size(p)
    add_metrics(p)
    p.add_argument("--hedge-delay", type=float, default=0.08,
                   help="seconds to wait for a peer before asking the origin too (default 0.08; "
                        "raised to 3x the peers' observed latency)")
    p.add_argument("--advertise", metavar="URL",
                   help="this node's URL in the peers file (default http://LISTEN; needed with "
                        "--listen 0.0.0.0, or when a `lazyfs peer` serves this node's cache)")
    p.add_argument("--record", action="store_true",
                   help="record the order of first reads until unmounted (default: --record-window)")
    p.add_argument("--record-window", type=float, default=30.0, metavar="SECONDS",
                   help="record first reads this long after mounting, into the image's trace (0: never)")
    p.add_argument("--refresh-trace-after", type=float, default=10.0, metavar="SECONDS",
                   help="with a trace of its own, ask the registry and peers for newer runs this long "
                        "after mounting, for the next mount (default 10; 0: never)")
    p.add_argument("--prefetch", choices=("all", "trace"), default="all",
                   help="all: the learned order first, then the whole image (default); "
                        "trace: the learned order only")
    p.add_argument("--amplify", type=size, metavar="BYTES",
                   help="a read that misses fetches the chunks after it in its blob, up to this "
                        "size in one request (default 1M; 0: off)")
    add_registry_arguments(p)
    p.set_defaults(func=cmd_mount)


def cmd_mount(args: argparse.Namespace) -> int:
    if args.foreground:
        return _mount_foreground(args)
    return _mount_background(args)


def mount_options(args: argparse.Namespace) -> MountOptions:
    """The mount's options, checked here so that a mistake is one line at once."""
    from ..mount import MountOptions  # with trio and pyfuse3: the mount process only

    if not 0 <= args.record_window < math.inf:  # NaN fails this too
        raise UserError("--record-window must be 0 (off) or more seconds", ExitCode.USAGE)
    if not 0 <= args.refresh_trace_after < math.inf:
        raise UserError("--refresh-trace-after must be 0 (never) or more seconds", ExitCode.USAGE)
    registry = registry_options(args)
    peers = checked_peers(args, listen=args.listen)
    opts = MountOptions(
        ref=args.ref,
        mountpoint=Path(args.mountpoint).absolute(),
        cache_dir=Path(args.cache).absolute(),
        prefetch=not args.no_prefetch,
        offline=args.offline,
        allow_other=args.allow_other,
        insecure=True if args.insecure else None,
        timeout=registry.timeout,
        registry=registry,
        cache_size=args.cache_size,
        metrics=args.metrics,
        record_window=None if args.record else args.record_window,
        lead_only=args.prefetch == "trace",
        refresh_trace_after=args.refresh_trace_after,
        amplify=args.amplify,
        verify_layers=args.verify_layers,
    )
    if peers is None:
        return opts
    return dataclasses.replace(opts, peers_file=peers.peers_file, token_file=peers.token_file,
                               advertise=peers.advertise, listen=args.listen, hedge_delay=args.hedge_delay)


def _mount_foreground(args: argparse.Namespace) -> int:
    from ..malloc import tune_for_mount

    tune_for_mount()  # before the first thread
    import trio  # the mount process's own imports, with pyfuse3 below

    from ..mount import serve
    from ..mountinfo import check_mountpoint

    ready_fd = args.ready_fd

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        opts = mount_options(args)
        check_mountpoint(opts.mountpoint)
        trio.run(serve, opts, ready)
    except BaseException as exc:
        shown, code = user_error(exc)
        if ready_fd is not None:
            message = str(shown) if code is not None else f"internal error: {shown!r}"
            try:
                os.write(ready_fd, f"error {int(code or 1)} {message}\n".encode())
            except OSError:
                pass
        raise
    return 0


def _mount_background(args: argparse.Namespace) -> int:
    """Fork the mount into a session of its own and wait until it says the rootfs is
    there (or why not). The child is this process, its imports done: no second
    interpreter starts, which saves a fifth to a third of a second on every mount. The
    child does all the work, option checks included, and reports errors through a pipe."""
    from ..mountinfo import check_mountpoint  # mount, umount and status only

    mountpoint = Path(args.mountpoint).absolute()
    cache_dir = Path(args.cache).absolute()
    check_mountpoint(mountpoint)
    log_file = Path(args.log_file) if args.log_file else (
        cache_dir / "logs" / (str(mountpoint).strip("/").replace("/", "_") + ".log"))
    claim(cache_dir)  # before CACHE/logs: an open cache is tightened or refused first
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logf = open(log_file, "ab")
    except OSError as exc:
        raise UserError(f"cannot write log file {log_file}: {exc.strerror}", ExitCode.CACHE) from exc
    import trio  # noqa: F401 - imported once, here, for the child

    from .. import mount  # noqa: F401
    args.mountpoint, args.cache, args.log_file = str(mountpoint), str(cache_dir), str(log_file)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its work is tested through the parent
        _mount_child(args, logf, r, w)
    os.close(w)
    logf.close()
    text = read_ready(r, MOUNT_READY_TIMEOUT)
    if text == "ok":
        print(f"mounted {args.ref} at {mountpoint} (pid {pid}, log {log_file})", flush=True)
        # Done: tearing down an interpreter with trio and httpx loaded would add about a
        # tenth of a second to every mount, and nothing here needs cleaning up.
        logging.shutdown()
        os._exit(0)
    if text.startswith("error "):
        _, code, msg = text.split(" ", 2)
        reap_child(pid, 30)
        raise UserError(msg, ExitCode(int(code)))
    status = reap_child(pid, 0)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        reap_child(pid, 10)
        raise MountError(f"mount did not become ready in {MOUNT_READY_TIMEOUT:g}s; see {log_file}")
    raise UserError(f"mount process exited with status {status}; see {log_file}")


def _mount_child(args: argparse.Namespace, logf: BinaryIO, r: int, w: int) -> NoReturn:
    """The forked mount: a session of its own, stdin from /dev/null, output to the log,
    no descriptor of the caller's but the ready pipe; then ``mount --foreground``."""
    code = 1
    try:
        os.close(r)
        log_fd = os.dup(logf.fileno())
        logf.close()
        detach(log_fd, keep=w)
        args.foreground, args.ready_fd = True, w
        setup_logging(args, force=True)
        code = run(args)
    finally:
        logging.shutdown()
        os._exit(code)
