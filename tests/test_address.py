"""The one parser of hosts, ports and server URLs that every option goes through."""

from __future__ import annotations

import pytest

from fetcher.address import URL, parse_url, split_host_port

BAD_PORTS = ["0", "65536", "80536", "99999", "-1", "abc", "", "+80", "05000", "1e3", " 80"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:5000", ("host", 5000)),
        ("host", ("host", None)),
        ("registry.example.", ("registry.example.", None)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("10.0.0.5:65535", ("10.0.0.5", 65535)),
        ("[::1]:5000", ("::1", 5000)),
        ("[fe80::1]", ("fe80::1", None)),
    ],
)
def test_host_and_port(text, expected):
    assert split_host_port(text) == expected


@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_port_outside_1_to_65535_is_refused(port):
    with pytest.raises(ValueError, match="bad port|spaces"):
        split_host_port(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="bad port|spaces"):
        parse_url(f"http://[::1]:{port}", schemes=("http",))


def test_a_listening_address_may_ask_for_any_free_port():
    assert split_host_port("127.0.0.1:0", port_required=True, listen=True) == ("127.0.0.1", 0)
    for port in BAD_PORTS[1:]:
        with pytest.raises(ValueError, match="bad port|spaces"):
            split_host_port(f"127.0.0.1:{port}", port_required=True, listen=True)
    with pytest.raises(ValueError, match="no port"):
        split_host_port("127.0.0.1", port_required=True, listen=True)


@pytest.mark.parametrize(
    "text",
    [":5000", "[::1::2]:5000", "[::1:5000", "::1]:5000", "[::1]x", "[::1]:", "::1", "1:2:3",
     "999.1.1.1:80", "a b:80", " host:80", "host\t:80", "host\x00:80", "h\u00e9.io:80", "-host:80",
     "host..io:80", "a_b:80", "user@host:80", "h:\u0668\u0660"],
)
def test_a_host_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        split_host_port(text)


def test_urls():
    assert parse_url("http://h:80/", schemes=("http",)) == URL("http", "h", 80)
    assert str(parse_url("HTTP://[::1]:7070", schemes=("http",))) == "http://[::1]:7070"
    assert str(parse_url("h:7070", schemes=("http",), default_scheme="http")) == "http://h:7070"
    proxy = parse_url("http://user:p@ss@proxy:3128", schemes=("http", "https"), userinfo=True)
    assert (proxy.userinfo, proxy.netloc) == ("user:p@ss", "proxy:3128")
    for text, kw, words in [
        ("ftp://h:21", {}, "scheme"),
        ("h:80", {}, "not a URL"),
        ("http://h:80/prefix", {}, "no path"),
        ("http://h:80?x=1", {}, "no path"),
        ("http://user@h:80", {}, "no user@"),
        ("http://", {}, "no host"),
        ("http://h", {"port_required": True}, "no port"),
        ("http://[::1:80", {}, "IPv6"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_url(text, schemes=("http", "https"), **kw)
