"""Debian's docker-registry (the CNCF distribution code) run by a test: loopback, its
own storage and config in a tmp dir, optional htpasswd auth and TLS, its access log kept
so tests can count requests, stopped by pid."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from .waiting import listening, stop_process, wait_until

needs_registry = pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="needs docker-registry and skopeo",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, tmp: Path, *, htpasswd: Path | None = None,
                 tls: tuple[Path, Path] | None = None, name: str = "registry") -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.log_path = self.dir / "access.log"
        lines = [
            "version: 0.1",
            "log: {level: info, formatter: text}",
            f"storage: {{filesystem: {{rootdirectory: {self.dir / 'data'}}}, delete: {{enabled: true}}}}",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if tls:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: lazyfs-test", f"    path: {htpasswd}"]
        config = self.dir / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=self._log, stderr=self._log)
        try:
            wait_until(lambda: listening(self.port), 15, "docker-registry listening", alive=self.proc)
        except AssertionError as exc:
            text = self.log()[-2000:]
            self.stop()
            raise RuntimeError(f"{exc}: {text}") from None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, uri, status) of every request in the access log so far."""
        return [(m[1], m[2], int(m[3])) for m in
                re.finditer(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)', self.log())]

    def blob_uploads(self) -> list[str]:
        """The digests of blob uploads completed (PUT ...?digest=D answered 201)."""
        return [re.search(r"digest=(sha256(?::|%3A)[0-9a-f]{64})", uri)[1].replace("%3A", ":")
                for method, uri, status in self.requests()
                if method == "PUT" and "/blobs/uploads/" in uri and "digest=" in uri and status == 201]

    def blob_mounts(self) -> list[str]:
        """The digests of cross-repository mounts done (POST ...?mount=D&from=R answered 201)."""
        return [re.search(r"mount=(sha256(?::|%3A)[0-9a-f]{64})", uri)[1].replace("%3A", ":")
                for method, uri, status in self.requests()
                if method == "POST" and "mount=" in uri and status == 201]

    def blob_reads(self) -> list[str]:
        return [uri for method, uri, status in self.requests()
                if method == "GET" and "/blobs/sha256" in uri]

    def blob_file(self, digest: str) -> Path:
        """Where the registry stores blob ``digest`` (to alter it under a test's feet)."""
        hexd = digest.removeprefix("sha256:")
        return self.dir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def skopeo_copy(self, src: str, repo_tag: str, creds: str | None = None) -> None:
        argv = ["skopeo", "copy", "--quiet", f"--dest-tls-verify={'true' if self.tls else 'false'}"]
        if self.tls:
            certdir = self.dir / "skopeo-certs"
            certdir.mkdir(exist_ok=True)
            shutil.copy(self.tls[0].parent / "ca.pem", certdir / "ca.crt")
            argv.append(f"--dest-cert-dir={certdir}")
        if creds:
            argv.append(f"--dest-creds={creds}")
        argv += [src, f"docker://{self.host}/{repo_tag}"]
        subprocess.run(argv, check=True, timeout=120, capture_output=True)


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    """A bcrypt htpasswd file (docker-registry accepts only bcrypt)."""
    try:
        import bcrypt

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        path.write_text(f"{user}:{hashed}\n")
    except ImportError:
        if not shutil.which("htpasswd"):
            pytest.skip("needs python bcrypt or htpasswd (apache2-utils)")
        subprocess.run(["htpasswd", "-Bbn", "-C", "5", user, password], check=True,
                       stdout=open(path, "wb"))  # noqa: SIM115
    return path


def make_tls(dir: Path) -> tuple[Path, Path]:
    """A CA (ca.pem) and a server certificate for IP 127.0.0.1 signed by it."""
    dir.mkdir(parents=True, exist_ok=True)

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=dir)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lazyfs test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (dir / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return dir / "server.pem", dir / "server.key"


def get(url: str, *, creds: str | None = None, ca: Path | None = None) -> int:
    req = urllib.request.Request(url)
    if creds:
        req.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


__all__ = ["Registry", "make_htpasswd", "make_tls", "needs_registry", "free_port", "get", "os"]
