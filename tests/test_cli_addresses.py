"""Every option that takes a host, a port or a URL refuses a bad one the same way: exit 2,
one line on stderr, no traceback; never a port that wraps (80536 reaching port 15000)."""

from __future__ import annotations

import pytest

from .conftest import lazyfs
from .test_cli import one_line_error

BAD_PORTS = ["0", "65536", "80536", "99999", "-1", "abc"]
TOKEN = "0123456789abcdef0123456789abcdef\n"


def _files(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "peers").write_text("http://127.0.0.1:7070\n")
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return tmp_path / "token", tmp_path / "peers", tmp_path / "mnt"


def _connect_commands(tmp_path, port):
    """{what: argv} of every place an address to connect to comes in, with ``port``."""
    token, peers, mnt = _files(tmp_path)
    good = "127.0.0.1:1/app:1"
    mount = ["mount", good, str(mnt), "--cache", str(tmp_path / "cache"), "--timeout", "5",
             "--log-file", str(tmp_path / "mount.log")]
    (tmp_path / "bad-peers").write_text(f"# the cluster\nhttp://127.0.0.1:7070\nhttp://127.0.0.1:{port}\n")
    conf = {}
    for key, value in (("mirrors", f'["http://127.0.0.1:{port}"]'), ("proxy", f'"http://127.0.0.1:{port}"'),
                       ("insecure_registries", f'["registry.lan:{port}"]')):
        conf[key] = tmp_path / f"{key}.toml"
        conf[key].write_text(f"[registry]\n{key} = {value}\n")
    return {
        "images REF": ["images", f"127.0.0.1:{port}/app:1"],
        "mount REF": ["mount", f"127.0.0.1:{port}/app:1", *mount[2:]],
        "convert docker://REF": ["convert", f"dir:{tmp_path}", f"docker://127.0.0.1:{port}/app:1"],
        "--mirror": ["images", good, "--mirror", f"http://127.0.0.1:{port}"],
        "--proxy": ["images", good, "--proxy", f"http://127.0.0.1:{port}"],
        "--insecure-registry": ["images", good, "--insecure-registry", f"registry.lan:{port}"],
        **{f"config {key}": ["images", good, "--config", str(path)] for key, path in conf.items()},
        "mount --peers-file": [*mount, "--peers-file", str(tmp_path / "bad-peers"),
                               "--token-file", str(token)],
        "mount --advertise": [*mount, "--peers-file", str(peers), "--token-file", str(token),
                              "--advertise", f"http://127.0.0.1:{port}"],
        "snapshotter --peers-file": ["snapshotter", "--root", str(tmp_path / "root"),
                                     "--address", str(tmp_path / "snap.sock"),
                                     "--peers-file", str(tmp_path / "bad-peers"), "--token-file", str(token)],
        "peer --advertise": ["peer", "--cache", str(tmp_path / "cache"), "--listen", "127.0.0.1:0",
                             "--token-file", str(token), "--advertise", f"http://127.0.0.1:{port}"],
    }


CONNECT = ["images REF", "mount REF", "convert docker://REF", "--mirror", "--proxy", "--insecure-registry",
           "config mirrors", "config proxy", "config insecure_registries", "mount --peers-file",
           "mount --advertise", "snapshotter --peers-file", "peer --advertise"]


@pytest.mark.parametrize("what", CONNECT)
@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_bad_port_to_connect_to_is_a_usage_error(tmp_path, what, port):
    done = lazyfs(*_connect_commands(tmp_path, port)[what], check=False, timeout=60)
    one_line_error(done, 2)
    if "--peers-file" in what:  # the line, not what it says: a file named by mistake may hold a secret
        assert "bad-peers:3: not a peer URL" in done.stderr, done.stderr
        assert f"127.0.0.1:{port}" not in done.stderr, done.stderr
    else:
        assert f"bad port '{port}'" in done.stderr, done.stderr


def _listen_commands(tmp_path, address):
    """{what: argv} of every place an address to listen on comes in."""
    token, _, mnt = _files(tmp_path)
    mount = ["mount", "127.0.0.1:1/app:1", str(mnt), "--cache", str(tmp_path / "cache"),
             "--log-file", str(tmp_path / "mount.log"), "--token-file", str(token)]
    peer = ["peer", "--cache", str(tmp_path / "cache"), "--token-file", str(token)]
    snapshotter = ["snapshotter", "--root", str(tmp_path / "root"), "--address", str(tmp_path / "snap.sock")]
    return {
        "serve --listen": ["serve", str(tmp_path), "--listen", address],
        "mount --listen": [*mount, "--listen", address],
        "peer --listen": [*peer, "--listen", address],
        "serve --metrics": ["serve", str(tmp_path), "--listen", "127.0.0.1:0", "--metrics", address],
        "mount --metrics": [*mount, "--metrics", address],
        "peer --metrics": [*peer, "--listen", "127.0.0.1:0", "--metrics", address],
        "snapshotter --metrics": [*snapshotter, "--metrics", address],
    }


LISTEN = ["serve --listen", "mount --listen", "peer --listen", "serve --metrics", "mount --metrics",
          "peer --metrics", "snapshotter --metrics"]


@pytest.mark.parametrize("what", LISTEN)
@pytest.mark.parametrize("port", BAD_PORTS[1:])  # port 0 is documented: any free port
def test_a_bad_port_to_listen_on_is_a_usage_error(tmp_path, what, port):
    done = lazyfs(*_listen_commands(tmp_path, f"127.0.0.1:{port}")[what], check=False, timeout=60)
    one_line_error(done, 2)
    assert f"bad port '{port}'" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("address", "words"),
    [(":7070", "no host"), ("127.0.0.1", "no port"), ("[::1:7070", "IPv6"), ("::1:7070", "brackets"),
     ("local host:7070", "spaces"), ("host\x1b:7070", "printable")],
)
def test_a_bad_host_to_listen_on_is_a_usage_error(tmp_path, address, words):
    done = lazyfs(*_listen_commands(tmp_path, address)["serve --listen"], check=False, timeout=60)
    one_line_error(done, 2)
    assert words in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [("--mirror", "http://:5000", "no host"), ("--mirror", "http://cache.lan:5000/prefix", "no path"),
     ("--mirror", "http://user:pw@cache.lan:5000", "no user@"), ("--mirror", "cache.lan:5000", "not a URL"),
     ("--proxy", "socks9://proxy.lan:1080", "scheme"), ("--proxy", "http://[::1:3128", "IPv6"),
     ("--insecure-registry", "registry lan", "spaces")],
)
def test_a_bad_registry_address_is_a_usage_error(option, value, words):
    done = lazyfs("images", "127.0.0.1:1/app:1", option, value, check=False, timeout=60)
    one_line_error(done, 2)
    assert words in done.stderr, done.stderr


def test_a_token_file_given_as_the_peers_file_is_refused_without_showing_the_token(tmp_path):
    token, _, mnt = _files(tmp_path)
    done = lazyfs("mount", "127.0.0.1:1/app:1", str(mnt), "--cache", str(tmp_path / "cache"),
                  "--log-file", str(tmp_path / "mount.log"), "--timeout", "5",
                  "--peers-file", str(token), "--token-file", str(token), check=False, timeout=60)
    one_line_error(done, 2)
    assert "token:1: not a peer URL" in done.stderr, done.stderr
    assert TOKEN.strip() not in done.stderr + (tmp_path / "mount.log").read_text()
