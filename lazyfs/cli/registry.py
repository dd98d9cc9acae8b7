"""How a command reaches a registry: image references, the registry options (``--creds``,
``--mirror``, ``--proxy``...) and the ``[registry]`` section of the config file, checked
into one ``RegistryOptions`` so that a mistake is one line before anything connects.
Shared by ``convert``, ``mount``, ``images`` and ``trace push``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetcher.address import parse_url, split_host_port
from fetcher.credentials import parse_creds
from fetcher.imageref import ImageRef

from ..errors import ExitCode, UserError
from .common import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from fetcher.options import RegistryOptions

CONFIG_FILE = Path("/etc/lazyfs/config.toml")
CREDS_ENV = "LAZYFS_CREDS"


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry access")
    g.add_argument("--creds", metavar="USER:PASS",
                   help=f"credentials for the registry (or ${CREDS_ENV}); default: docker's config.json")
    g.add_argument("--creds-file", metavar="FILE",
                   help="a docker config.json to take credentials from (for daemons)")
    g.add_argument("--ca-file", metavar="PEM", help="trust these CAs too (TLS)")
    g.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]",
                   help="reach this registry over plain HTTP (repeatable; loopback always is)")
    g.add_argument("--mirror", action="append", metavar="URL",
                   help="read blobs from this mirror first, the registry after it (repeatable)")
    g.add_argument("--proxy", metavar="URL", help="send registry requests through this HTTP proxy")
    g.add_argument("--config", metavar="FILE", help=f"config file (default {CONFIG_FILE} if present)")


def image_ref(text: str) -> ImageRef:
    try:
        return ImageRef.parse(text)
    except ValueError as exc:
        raise UserError(str(exc), ExitCode.USAGE) from None


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    """The registry options of ``args``, the config file's where ``args`` has none."""
    from fetcher.options import RegistryOptions  # the registry client, httpx and trio: when used

    conf = load_config(Path(args.config) if args.config else None)
    creds_text = args.creds or os.environ.get(CREDS_ENV)
    creds = None
    if creds_text:
        try:
            creds = parse_creds(creds_text)
        except ValueError as exc:
            raise UserError(str(exc), ExitCode.USAGE) from None
    mirrors = tuple(_server_url("mirror", m) for m in (args.mirror or _strings(conf, "mirrors")))
    proxy = args.proxy or _string(conf, "proxy")
    if proxy is not None:
        _server_url("proxy", proxy, userinfo=True)  # httpx gets it as written: user:password@ too
    insecure = [*(args.insecure_registry or []), *_strings(conf, "insecure_registries")]
    for host in insecure:
        try:
            split_host_port(host)
        except ValueError as exc:
            raise UserError(f"insecure registry {host!r}: {exc} (expected HOST[:PORT])",
                            ExitCode.USAGE) from None
    timeout = getattr(args, "timeout", None)
    if timeout is None:
        timeout = conf.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise UserError(f"config file: timeout must be a positive number of seconds, not {timeout!r}",
                            ExitCode.USAGE)
    return RegistryOptions(
        timeout=float(timeout),
        insecure_hosts=frozenset(insecure),
        ca_file=args.ca_file or _string(conf, "ca_file"),
        credentials=creds,
        creds_file=args.creds_file or _string(conf, "creds_file"),
        mirrors=mirrors,
        proxy=proxy,
    )


def load_config(path: Path | None) -> dict[str, Any]:
    """The ``[registry]`` settings of the config file (``--config``, else
    /etc/lazyfs/config.toml if it exists): parsed TOML, its values checked where used."""
    import tomllib  # only the commands that reach a registry read the config file

    explicit = path is not None
    path = path or CONFIG_FILE
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UserError(f"config file {path} does not exist", ExitCode.USAGE) from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config file {path}: {exc}", ExitCode.USAGE) from None
    section = doc.get("registry", {})
    known = {"mirrors", "proxy", "insecure_registries", "ca_file", "creds_file", "timeout"}
    if not isinstance(section, dict) or set(section) - known:
        raise UserError(f"config file {path}: [registry] takes only {', '.join(sorted(known))}",
                        ExitCode.USAGE)
    return section


def _server_url(what: str, text: str, *, userinfo: bool = False) -> str:
    """``text`` as ``scheme://host[:port]`` (a mirror serves the registry's paths at its root)."""
    try:
        return str(parse_url(text, schemes=("http", "https"), userinfo=userinfo))
    except ValueError as exc:
        raise UserError(f"{what}: {exc}", ExitCode.USAGE) from None


def _string(conf: dict[str, Any], key: str) -> str | None:
    value = conf.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"config file: {key} must be a string, not {value!r}", ExitCode.USAGE)
    return value


def _strings(conf: dict[str, Any], key: str) -> list[str]:
    value = conf.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"config file: {key} must be a list of strings, not {value!r}", ExitCode.USAGE)
    return value
