"""What every command of the command line shares: argument types, defaults, the logging
set-up, and ``run``, the one place an error becomes one line and its exit code.

Command modules import this one; it imports none of them (nor ``lazyfs.cli``), so the
package has no cycle.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from ..errors import ExitCode, UserError, exit_code_for

if TYPE_CHECKING:
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    """What ``register(sub)`` of each command module adds its subcommands to."""

log = logging.getLogger("lazyfs")

DEFAULT_CACHE = Path(os.environ.get("LAZYFS_CACHE", "/var/cache/lazyfs"))
DEFAULT_TIMEOUT = 30.0
"""Seconds a read (or one registry request) may wait on the network: ``--timeout``."""


# -- argument types ------------------------------------------------------------------------

def size(text: str) -> int:
    """``1M``, ``512K``, ``10G``, ``4096``: bytes."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "kmg" else (t, "")
    try:
        value = int(float(num) * units[unit])
    except (ValueError, OverflowError):  # not a number, NaN, infinity
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1M, 512K)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a size is 0 or more)")
    return value


def chunk_size_arg(text: str) -> int:
    """A ``--chunk-size``: a power of two from 4K to 64M."""
    from blockindex.format import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE  # dataclasses: 10 ms of a cold start

    n = size(text)
    if not MIN_CHUNK_SIZE <= n <= MAX_CHUNK_SIZE or n & (n - 1):
        raise argparse.ArgumentTypeError(f"chunk size must be a power of two from 4K to 64M, not {text}")
    return n


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)")


def add_cache_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-size", type=size, metavar="SIZE",
                   help="limit the node cache to SIZE (e.g. 10G, 500M): least recently used chunks "
                        "of images no mount needs are evicted past it (default: no limit)")


def human(n: float) -> str:
    """Bytes as people read them: ``512 B``, ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# -- running a command ---------------------------------------------------------------------

def setup_logging(args: argparse.Namespace, force: bool = False) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    log_file = getattr(args, "log_file", None)
    if getattr(args, "foreground", False) and log_file:
        logging.basicConfig(level=level, format=fmt, filename=log_file, force=force)
    else:
        logging.basicConfig(level=level if args.verbose else logging.WARNING, format=fmt, force=force)
        if getattr(args, "foreground", False) or args.command in ("serve", "snapshotter", "peer"):
            logging.getLogger().setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Run the command; every error becomes one line and its exit code."""
    try:
        _listen_addresses(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lazyfs status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        exc, code = user_error(exc)
        if code is None:
            if isinstance(exc, SystemExit):
                raise
            log.exception("internal error")
            print(f"lazyfs: internal error: {exc!r} (a bug; please report it)", file=sys.stderr)
            return ExitCode.FAILURE
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return int(code)


def user_error(exc: BaseException) -> tuple[BaseException, ExitCode | None]:
    """The error to show the user and its exit code: ``exc`` itself, or the first error
    inside an exception group that has one; the code None for a bug."""
    code = exit_code_for(exc)
    if code is None and isinstance(exc, BaseExceptionGroup):
        inner = [e for e in _leaves(exc) if exit_code_for(e) is not None]
        if inner:
            return inner[0], exit_code_for(inner[0])
    return exc, code


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _listen_addresses(args: argparse.Namespace) -> None:
    """``--listen`` and ``--metrics`` as ``(host, port)``, checked here rather than by
    argparse so that a mistake is one line (port 0: any free port)."""
    from fetcher.address import split_host_port  # dataclasses: 10 ms of a cold start

    for name in ("listen", "metrics"):
        text = getattr(args, name, None)
        if isinstance(text, str):
            try:
                host, port = split_host_port(text, port_required=True, listen=True)
            except ValueError as exc:
                raise UserError(f"--{name} {text!r}: {exc}", ExitCode.USAGE) from None
            assert port is not None
            setattr(args, name, (host, port))
