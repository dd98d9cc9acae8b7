"""The ``lazyfs`` command line.

One module per command family, each adding its subcommands with ``register(sub)``;
``main`` builds the parser from them and runs the command chosen. Each command is a
small function from parsed arguments to an exit code. Errors a user can fix print one
line (``lazyfs: error: ...``) and exit with a code from ``lazyfs.errors``; a bug prints
its traceback to the log and exits 1 (``common.run``). What the commands share lives in
``common`` (argument types, logging, running) and ``registry`` (registry options and the
config file); neither imports this module or a command module.

For start-up time, ``main`` imports only the module of the command named (all of them for
``lazyfs --help`` or a name it does not know), and the modules import at the top only
what is small and loaded anyway (the error classes, the format's limits, image
references and addresses): each command imports what it runs on (trio,
httpx, pyfuse3, grpc, sqlite3, most of the packages below lazyfs) inside the function
that runs it, each such import with its reason beside it. ``lazyfs --help``, ``lazyfs
pull`` and the mount launcher load none of it before they need it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from cache.private import PRIVATE_UMASK

from .common import log, run, setup_logging

# the command modules in the order of `lazyfs --help`, with the commands each adds
_COMMANDS = {"convert": ("convert",), "index": ("index",), "serve": ("serve",), "mount": ("mount",),
             "images": ("images",), "peer": ("peer",), "status": ("umount", "status"),
             "trace": ("trace",), "snapshotter": ("snapshotter",), "pull": ("pull",), "cache": ("cache",)}
_MODULE_OF = {command: module for module, commands in _COMMANDS.items() for command in commands}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, when ``argv`` names one, of that one alone: a
    command then loads its own module and none of the others (from a cold page cache,
    importing them all was 70 ms of ``lazyfs pull``'s 100)."""
    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Mount container images lazily: fetch on read, verify, cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = next((a for a in argv or () if not a.startswith("-")), None)
    modules = [_MODULE_OF[named]] if named in _MODULE_OF else list(_COMMANDS)
    for module in modules:
        importlib.import_module(f"{__name__}.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command != "convert":  # its output layout is the user's, made as the user's umask says
        os.umask(PRIVATE_UMASK)  # caches and state: 0700 and 0600 (see cache/private.py)
    setup_logging(args)
    if getattr(args, "creds", None):
        from ..process import hide_in_cmdline
        from .registry import CREDS_ENV

        if not hide_in_cmdline(args.creds):
            log.warning("--creds stays visible in this process's command line; $%s or --creds-file "
                        "keep credentials out of it", CREDS_ENV)
    return run(args)
