"""Credentials and TLS against a real registry: htpasswd basic auth, docker config.json,
--creds / --creds-file, wrong credentials; a registry with a certificate the test makes."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest

from testkit import imagegen, treecompare
from testkit.registryd import Registry, make_htpasswd, make_tls, needs_registry

from .conftest import lazyfs

pytestmark = [needs_registry]
USER, PASSWORD = "alice", "s3cret-Pa55"


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accessrich")
    return imagegen.build_rich_image(tmp / "rich.tar")


@pytest.mark.mount
def test_basic_auth_registry(tmp_path, rich, mounts):
    registry = Registry(tmp_path, htpasswd=make_htpasswd(tmp_path / "htpasswd", USER, PASSWORD))
    try:
        creds = f"{USER}:{PASSWORD}"
        registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1", creds=creds)
        src, dst = f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy"
        lazyfs("convert", src, dst, "--chunk-size", "64K", "--creds", creds)
        # credentials from docker's config.json, named by DOCKER_CONFIG
        conf = tmp_path / "docker"
        conf.mkdir()
        auth = base64.b64encode(creds.encode()).decode()
        (conf / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
        env = {**os.environ, "DOCKER_CONFIG": str(conf)}
        info = json.loads(lazyfs("images", f"{registry.host}/app:1-lazy", "--json", env=env).stdout)
        assert info["lazy"] is True
        # a daemon's credentials file; the mount reads everything through it
        mnt, _ = mounts.mount(f"{registry.host}/app:1-lazy", "--creds-file", str(conf / "config.json"))
        assert treecompare.compare_tree(mnt, rich.expected) == []
        status = lazyfs("status", str(mnt), "--json").stdout
        # the password is in no log, no status, no command line
        mounts.wait_complete(mnt)
        assert PASSWORD not in status and PASSWORD not in mounts.log()
        mnt2, _ = mounts.mount(f"{registry.host}/app:1-lazy", "--creds", creds, "--no-prefetch",
                               name="m2", cache=tmp_path / "cache2")
        pid = json.loads(lazyfs("status", str(mnt2), "--json").stdout)["pid"]
        assert PASSWORD not in open(f"/proc/{pid}/cmdline").read()
        assert (mnt2 / "data").exists()
        # wrong, missing: one line, exit 4, quickly
        for extra in (["--creds", f"{USER}:wrong"], []):
            t = time.monotonic()
            done = lazyfs("images", f"{registry.host}/app:1-lazy", *extra, check=False,
                          env={**os.environ, "DOCKER_CONFIG": str(tmp_path / "none")})
            assert done.returncode == 4, done.stderr
            assert done.stderr.count("\n") == 1 and done.stderr.startswith("lazyfs: error:")
            assert "wrong" not in done.stderr and time.monotonic() - t < 10
        _m, done = mounts.mount(f"{registry.host}/app:1-lazy", "--creds", f"{USER}:wrong", name="m3",
                                cache=tmp_path / "cache3", check=False)
        assert done.returncode == 4 and done.stderr.count("\n") == 1, done.stderr
        assert PASSWORD not in registry.log()
    finally:
        registry.stop()


@pytest.mark.mount
def test_tls_registry_with_ca_file(tmp_path, rich, mounts):
    cert, key = make_tls(tmp_path / "tls")
    ca = tmp_path / "tls" / "ca.pem"
    registry = Registry(tmp_path, tls=(cert, key))
    try:
        registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
        lazyfs("convert", f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy",
               "--chunk-size", "64K", "--ca-file", str(ca))
        done = lazyfs("images", f"{registry.host}/app:1-lazy", check=False)
        assert done.returncode == 4 and "not trusted" in done.stderr, done.stderr
        mnt, _ = mounts.mount(f"{registry.host}/app:1-lazy", "--ca-file", str(ca), "--no-prefetch")
        assert treecompare.compare_tree(mnt, rich.expected) == []
    finally:
        registry.stop()


HELPER = """#!/bin/sh
# docker-credential-{name}: the credential-helper protocol, as docker's helpers speak it
[ "$1" = get ] || exit 3
read -r server
echo "$server" >> {log}
{body}
"""


def _helper(bindir, name: str, log, body: str) -> None:
    path = bindir / f"docker-credential-{name}"
    path.write_text(HELPER.format(name=name, log=log, body=body))
    path.chmod(0o755)


@pytest.mark.mount
def test_docker_credential_helpers(tmp_path, rich, mounts):
    registry = Registry(tmp_path, htpasswd=make_htpasswd(tmp_path / "htpasswd", USER, PASSWORD))
    try:
        creds = f"{USER}:{PASSWORD}"
        registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1", creds=creds)
        lazyfs("convert", f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy",
               "--chunk-size", "64K", "--creds", creds)
        bindir, asked = tmp_path / "bin", tmp_path / "asked.log"
        bindir.mkdir()
        answer = json.dumps({"ServerURL": registry.host, "Username": USER, "Secret": PASSWORD})
        _helper(bindir, "fake", asked, f"""if [ "$server" = "{registry.host}" ]; then
  echo '{answer}'
else
  echo "credentials not found in native keychain"; exit 1
fi""")
        _helper(bindir, "broken", asked, 'echo "keyring locked" >&2; exit 1')
        _helper(bindir, "garbage", asked, "echo not-json")
        _helper(bindir, "token", asked, """echo '{"Username": "<token>", "Secret": "abc"}'""")
        conf = tmp_path / "docker"
        conf.mkdir()
        env = {**os.environ, "DOCKER_CONFIG": str(conf), "PATH": f"{bindir}:{os.environ['PATH']}"}
        ref = f"{registry.host}/app:1-lazy"

        def config(doc: dict) -> None:
            (conf / "config.json").write_text(json.dumps(doc))

        for doc in ({"credHelpers": {registry.host: "fake"}}, {"credsStore": "fake"},
                    # a per-registry helper wins over the store
                    {"credsStore": "broken", "credHelpers": {registry.host: "fake"}}):
            config(doc)
            info = json.loads(lazyfs("images", ref, "--json", env=env).stdout)
            assert info["lazy"] is True
        assert asked.read_text().splitlines()[-1] == registry.host  # the server, on stdin
        # a helper with nothing for this registry: the auths entries are used next
        auth = base64.b64encode(creds.encode()).decode()
        _helper(bindir, "fake-elsewhere", asked, 'echo "credentials not found in native keychain"; exit 1')
        config({"credsStore": "fake-elsewhere", "auths": {registry.host: {"auth": auth}}})
        assert json.loads(lazyfs("images", ref, "--json", env=env).stdout)["lazy"] is True
        # a mount (a background process) gets its credentials from the helper too
        config({"credsStore": "fake"})
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        lazyfs("mount", ref, str(mnt), "--cache", str(tmp_path / "cache"), "--no-prefetch",
               "--timeout", "10", "--log-file", str(tmp_path / "mnt.log"), env=env)
        mounts.points.append(mnt)  # unmounted at teardown
        assert treecompare.compare_tree(mnt, rich.expected) == []
        # every way a helper can go wrong: one line, a documented code, no secret
        for store, code, words in (("missing", 2, "docker-credential-missing"),
                                   ("broken", 4, "keyring locked"),
                                   ("garbage", 4, "docker-credential-garbage"),
                                   ("token", 4, "identity token")):
            config({"credsStore": store})
            done = lazyfs("images", ref, env=env, check=False)
            assert done.returncode == code, (store, done.stderr)
            assert done.stderr.count("\n") == 1 and done.stderr.startswith("lazyfs: error:"), done.stderr
            assert words in done.stderr and "abc" not in done.stderr
    finally:
        registry.stop()
