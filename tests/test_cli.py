"""The command line as a user meets it: one-line errors with documented exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .conftest import lazyfs


def _tar(path, entries):
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def one_line_error(done, code):
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith("lazyfs: error:"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "make_source, words",
    [
        (lambda t: f"docker-archive:{t / 'missing.tar'}", "missing.tar"),
        (lambda t: f"oci:{t}", "index.json"),
        (lambda t: f"dir:{t / 'nodir'}", "nodir"),
        (lambda t: "tar:" + str(_write(t / "not.tar", b"this is not a tar" * 100)), "not.tar"),
        (lambda t: "tar:" + str(_tar(t / "evil.tar", [("../escape", b"x")])), "escape"),
        (lambda t: "tar:" + str(_tar(t / "abs.tar", [("a/../../up", b"x")])), "up"),
        (lambda t: "tar:" + str(_write(t / "trunc.tar", _gz_truncated())), "trunc.tar"),
        (lambda t: "zip:/x", "unknown"),
    ],
)
def test_convert_refuses_bad_sources(tmp_path, make_source, words):
    done = lazyfs("convert", make_source(tmp_path), f"oci:{tmp_path / 'out'}", check=False)
    one_line_error(done, 3)
    assert words in done.stderr
    # nothing written outside the output, and no half image tagged inside it
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "up").exists()
    out = tmp_path / "out" / "index.json"
    assert not out.exists() or json.loads(out.read_text())["manifests"] == []


def _write(path, data):
    path.write_bytes(data)
    return path


def _gz_truncated():
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("f")
        data = bytes(range(256)) * 400
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())[:-200]


def test_convert_then_tag_listing(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("lazy\n")
    done = lazyfs("convert", f"dir:{rootfs}", f"oci:{tmp_path / 'img'}:v1")
    assert "1 files" in done.stdout and "manifest sha256:" in done.stdout
    index = json.loads((tmp_path / "img" / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["v1"]


def test_usage_errors_exit_2(tmp_path):
    assert lazyfs("convert", check=False).returncode == 2
    assert lazyfs("convert", "dir:/", "oci:/x", "--chunk-size", "lots", check=False).returncode == 2
    assert lazyfs("convert", "dir:/", "oci:/x", "--chunk-size", "1000", check=False).returncode == 2
    assert lazyfs("serve", str(tmp_path), "--listen", "nowhere", check=False).returncode == 2
    one_line_error(lazyfs("serve", str(tmp_path / "none"), check=False), 2)
    assert lazyfs("frobnicate", check=False).returncode == 2


def test_status_and_umount_of_something_else(tmp_path):
    one_line_error(lazyfs("status", str(tmp_path), check=False), 5)
    one_line_error(lazyfs("umount", str(tmp_path), check=False), 5)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_timeout_must_be_positive_seconds(tmp_path, value):
    for command in (["mount", "127.0.0.1:1/app:1", str(tmp_path)], ["images", "127.0.0.1:1/app:1"],
                    ["peer", "--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "t")]):
        done = lazyfs(*command, "--timeout", value, check=False)
        assert done.returncode == 2, done.stderr
        assert "positive number of seconds" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["-1", "-2M", "nan", "inf", "1e400", "big"])
def test_a_size_must_be_a_number_of_bytes(tmp_path, value):
    for option in ("--amplify", "--cache-size"):
        done = lazyfs("mount", "127.0.0.1:1/app:1", str(tmp_path), f"{option}={value}", check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (option, done.stderr)
        assert option in done.stderr.splitlines()[-1] and "not a size" in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_the_trace_windows_must_be_seconds(tmp_path, value):
    for option in ("--record-window", "--refresh-trace-after"):
        done = lazyfs("mount", "127.0.0.1:1/app:1", str(tmp_path), option, value, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (option, done.stderr)
        assert option in done.stderr.splitlines()[-1], done.stderr


def test_the_config_files_timeout_is_used_and_checked(tmp_path):
    import socket

    config = tmp_path / "config.toml"
    config.write_text("[registry]\ntimeout = -3\n")
    one_line_error(lazyfs("images", "127.0.0.1:1/app:1", "--config", str(config), check=False), 2)
    # a registry that accepts connections and never answers: the config's 1 s applies
    # (the default 30 s would outlast the bound here, which only catches that)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config.write_text("[registry]\ntimeout = 1\n")
        ref = f"127.0.0.1:{silent.getsockname()[1]}/app:1"
        done = lazyfs("images", ref, "--config", str(config), check=False, timeout=25)
    one_line_error(done, 4)


def test_credentials_are_overwritten_in_the_command_line():
    """`--creds` on the command line is in ps's view only until lazyfs starts: it overwrites
    the argument memory, which a background mount then inherits (see test_registry_access)."""
    import subprocess
    import sys

    from .conftest import ROOT

    code = ("import sys; from lazyfs.process import hide_in_cmdline; "
            "ok = hide_in_cmdline('Pa55' + 'word'); "
            "print(ok, open('/proc/self/cmdline', 'rb').read().split(b'\\0')[-4:-1], sys.argv[-1])")
    done = subprocess.run([sys.executable, "-c", code, "--creds", "bob:Pa55word", "bob:Pa55word"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True [b'--creds', b'bob:********', b'bob:********'] bob:Pa55word"


def test_snapshotter_sockets_in_a_place_it_cannot_use_are_one_line_errors(tmp_path):
    root = str(tmp_path / "root")
    for extra in (["--address", "/proc/nope/s.sock"],
                  ["--address", str(tmp_path / "s.sock"), "--cri-keychain", "/proc/nope/k.sock"],
                  ["--address", str(tmp_path / "s2.sock"), "--cri-keychain", "/proc/k.sock"]):
        done = lazyfs("snapshotter", *extra, "--root", root, "--no-spare", check=False, timeout=30)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.splitlines()[-1].startswith("lazyfs: error:")


def test_a_handed_off_pull_loads_no_other_command_and_nothing_it_does_not_run(tmp_path):
    """``lazyfs pull`` with a snapshotter to hand the pull to starts from a cold page cache
    on a node: every module it imports is a file read from disk. It loads its own command
    alone, and none of grpc, trio, httpx, sqlite3 or the format's dataclasses."""
    probe = (
        "import sys, runpy\n"
        "from lazyfs.cli import build_parser\n"
        "build_parser(['-v', 'pull', 'r/x:1'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'trio', 'httpx', 'sqlite3', 'dataclasses', 'pyfuse3')\n"
        "        or m.startswith('lazyfs.cli.') and m not in ('lazyfs.cli.pull', 'lazyfs.cli.common'))\n"
        "print(' '.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent, check=True)
    assert done.stdout.strip() == "", done.stdout
    # and every command is still there for --help and for a name it does not know
    help_text = lazyfs("--help").stdout
    for command in ("convert", "index", "serve", "mount", "images", "peer", "umount", "status", "trace",
                    "snapshotter", "pull", "cache"):
        assert command in help_text
    wrong = lazyfs("pul", check=False)
    assert wrong.returncode == 2 and "'pull'" in wrong.stderr


def test_lazyfs_index_defaults_to_the_builds_own_spacing():
    """The command keeps its own copy (importing the build loads indexed_gzip)."""
    from blockindex.sideindex import DEFAULT_SPACING
    from lazyfs.cli import index

    assert index.DEFAULT_SPACING == DEFAULT_SPACING
