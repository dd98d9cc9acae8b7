"""``lazyfs serve DIR``: OCI layouts under DIR over the OCI distribution API (read side)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExitCode, UserError
from .common import add_metrics

if TYPE_CHECKING:
    from .common import SubParsers


def register(sub: SubParsers) -> None:
    p = sub.add_parser("serve", help="serve OCI layouts under DIR over the OCI distribution API")
    p.add_argument("root", metavar="DIR")
    p.add_argument("--listen", default="127.0.0.1:5000", metavar="HOST:PORT")
    add_metrics(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import serve_forever  # the HTTP server and the layout reader: this command only

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory", ExitCode.USAGE)
    host, port = args.listen
    serve_forever(root, host, port, metrics=args.metrics)
    return 0
