"""Hosts, ports and URLs a user gives: one parser for every option that takes one.

    split_host_port("host:5000")                    ("host", 5000)
    split_host_port("[::1]:0", port_required=True, listen=True)   ("::1", 0)
    parse_url("http://user:pw@proxy:3128", schemes=("http", "https"), userinfo=True)

A host is a DNS name (letters, digits and ``-`` in dot-separated labels), an IPv4
address, or an IPv6 address in brackets. A port is decimal ASCII digits with no sign
and no leading zero, 1 to 65535; a listening address may also ask for port 0 (any free
port). Anything else is a ``ValueError`` saying what is wrong, never a port that
silently wraps (``getaddrinfo`` takes 80536 as 15000) or a string the HTTP client
rejects later with a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_PORT_RE = re.compile(r"^(?:0|[1-9][0-9]{0,4})$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


def check_host(host: str) -> str:
    """``host`` if it is a DNS name, an IPv4 address or a bracketed IPv6 address."""
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
        try:
            ipaddress.IPv6Address(inner or "")
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r} (write it as [ADDRESS])") from None
        return host
    if not host:
        raise ValueError("no host")
    if ":" in host:
        raise ValueError(f"bad host {host!r} (an IPv6 address goes in brackets: [ADDRESS])")
    if not _HOSTNAME_RE.match(host) or len(host) > 253:
        raise ValueError(f"bad host {host!r}")
    if host.rstrip(".").replace(".", "").isdigit():  # all digits: it can only be an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"bad IPv4 address {host!r}") from None
    return host


def parse_port(text: str, *, listen: bool = False) -> int:
    """The port ``text`` names: 1 to 65535, or 0 too when ``listen`` (any free port)."""
    if not _PORT_RE.match(text) or not (0 if listen else 1) <= int(text) <= 65535:
        low = 0 if listen else 1
        raise ValueError(f"bad port {text!r} (a whole number from {low} to 65535)")
    return int(text)


def split_host_port(text: str, *, port_required: bool = False,
                    listen: bool = False) -> tuple[str, int | None]:
    """``(host, port)`` of ``host[:port]``, the host without IPv6 brackets; ``port`` is
    None when absent (and ``port_required`` is false)."""
    _check_chars(text)
    if text.startswith("["):
        close = text.find("]")
        host, rest = (text[: close + 1], text[close + 1:]) if close > 0 else (text, "")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad host {text!r} (expected [ADDRESS] or [ADDRESS]:PORT)")
    else:
        host, rest = (text, "") if text.count(":") != 1 else (text[: text.index(":")], text[text.index(":"):])
    if not host:
        raise ValueError("no host (expected HOST:PORT)" if port_required else "no host")
    check_host(host)
    if not rest:
        if port_required:
            raise ValueError(f"{text!r} has no port (expected HOST:PORT)")
        return host.strip("[]"), None
    return host.strip("[]"), parse_port(rest[1:], listen=listen)


@dataclasses.dataclass(frozen=True, slots=True)
class URL:
    """A checked ``scheme://[userinfo@]host[:port][/]``."""

    scheme: str
    host: str
    """Without IPv6 brackets."""
    port: int | None
    userinfo: str | None = None

    @property
    def netloc(self) -> str:
        """``host[:port]``, an IPv6 host in brackets (no userinfo)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_url(text: str, *, schemes: tuple[str, ...], userinfo: bool = False,
              port_required: bool = False, default_scheme: str | None = None) -> URL:
    """A URL naming a server: one of ``schemes``, a host, maybe a port, no path but ``/``
    (and ``user[:password]@`` only when ``userinfo``). ``default_scheme`` is assumed
    when ``text`` has none."""
    _check_chars(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if default_scheme is None:
            raise ValueError(f"{text!r} is not a URL (expected {schemes[0]}://HOST[:PORT])")
        scheme, rest = default_scheme, text
    if not _SCHEME_RE.match(scheme) or scheme.lower() not in schemes:
        raise ValueError(f"{text!r}: the scheme must be {' or '.join(s + '://' for s in schemes)}")
    netloc, _, path = rest.partition("/")
    if path or "?" in netloc or "#" in netloc:
        raise ValueError(f"{text!r}: expected {scheme}://HOST[:PORT] with no path or query")
    user = None
    if "@" in netloc:
        if not userinfo:
            raise ValueError(f"{text!r}: no user@ here (give credentials some other way)")
        user, _, netloc = netloc.rpartition("@")
    try:
        host, port = split_host_port(netloc, port_required=port_required)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return URL(scheme.lower(), host, port, user)


def _check_chars(text: str) -> None:
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError(f"{text!r} has spaces or characters that are not printable ASCII")
