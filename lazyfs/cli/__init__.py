"""The ``lazyfs`` command line.

One module per command family, each adding its subcommands with ``register(sub)``;
``main`` builds the parser from them and runs the command chosen. Each command is a
small function from parsed arguments to an exit code. Errors a user can fix print one
line (``lazyfs: error: ...``) and exit with a code from ``lazyfs.errors``; a bug prints
its traceback to the log and exits 1 (``common.run``). What the commands share lives in
``common`` (argument types, logging, running) and ``registry`` (registry options and the
config file); neither imports this module or a command module.

For start-up time, ``main`` imports every command module to build its parser, so they
import at the top only what is small and loaded anyway (the error classes, the format's
limits, image references and addresses): each command imports what it runs on (trio,
httpx, pyfuse3, grpc, sqlite3, most of the packages below lazyfs) inside the function
that runs it, each such import with its reason beside it. ``lazyfs --help``, ``lazyfs
pull`` and the mount launcher load none of it before they need it.
"""

from __future__ import annotations

import argparse
import os

from cache.private import PRIVATE_UMASK

from ..process import hide_in_cmdline
from . import cache, convert, images, index, mount, peer, pull, serve, snapshotter, status, trace
from .common import log, run, setup_logging
from .registry import CREDS_ENV

# the order of `lazyfs --help`
_COMMANDS = (convert, index, serve, mount, images, peer, status, trace, snapshotter, pull, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Mount container images lazily: fetch on read, verify, cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "convert":  # its output layout is the user's, made as the user's umask says
        os.umask(PRIVATE_UMASK)  # caches and state: 0700 and 0600 (see cache/private.py)
    setup_logging(args)
    if getattr(args, "creds", None) and not hide_in_cmdline(args.creds):
        log.warning("--creds stays visible in this process's command line; $%s or --creds-file "
                    "keep credentials out of it", CREDS_ENV)
    return run(args)
