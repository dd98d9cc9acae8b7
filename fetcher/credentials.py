"""Registry credentials from docker's ``config.json``.

Looked up in ``--creds-file FILE`` if given, else ``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``, in docker's order:

1. ``credHelpers: {"HOST": "NAME"}``, then ``credsStore: "NAME"``: the credential helper
   ``docker-credential-NAME`` (found on ``PATH``) is run as ``docker-credential-NAME get``
   with the server (``HOST``; ``https://index.docker.io/v1/`` for Docker Hub) on stdin, and
   prints ``{"ServerURL": ..., "Username": ..., "Secret": ...}``. A helper that says it has
   no credentials for the server (``credentials not found``) falls through to 2.
2. ``auths: {"HOST": {"auth": base64("user:pass")}}`` (or ``username`` and ``password``
   fields). Docker Hub is also found under its historical key ``https://index.docker.io/v1/``.

A helper named in the file but missing from ``PATH`` is a configuration mistake
(``HelperMissingError``, exit code 2); a helper that fails, prints something other than
that JSON, returns an identity token (``Username: "<token>"``, which lazyfs cannot use) or
takes longer than ``HELPER_TIMEOUT`` is an ``AuthError`` (exit code 4). Neither message
repeats what the helper printed on stdout, where a secret may be.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from pathlib import Path

from .errors import AuthError, HelperMissingError
from .imageref import DOCKER_HUB

HELPER_TIMEOUT = 30.0
HUB_SERVER = "https://index.docker.io/v1/"


_helper_answers: dict[tuple[str, str], tuple[str, str] | None] = {}


def default_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def lookup(registry: str, creds_file: str | None = None) -> tuple[str, str] | None:
    """``(user, password)`` for ``registry``, or None if the file has none for it.
    AuthError (never echoing a secret) if a named file cannot be read or is malformed."""
    path = Path(creds_file) if creds_file else default_config_path()
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        if creds_file:
            raise AuthError(f"credentials file {path} does not exist") from None
        return None
    except (OSError, ValueError) as exc:
        raise AuthError(f"credentials file {path} cannot be read as JSON "
                        f"({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        return None
    helper = _helper_name(doc, registry)
    if helper is not None:
        found = run_helper(helper, HUB_SERVER if registry == DOCKER_HUB else registry, path)
        if found is not None:
            return found
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    for key in keys:
        entry = auths.get(key) or auths.get(key + "/")
        if isinstance(entry, dict):
            return _decode(entry, path, key)
    return None


def _helper_name(doc: dict, registry: str) -> str | None:
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        keys = [registry] + (["index.docker.io", HUB_SERVER] if registry == DOCKER_HUB else [])
        for key in keys:
            if isinstance(helpers.get(key), str) and helpers[key]:
                return helpers[key]
    store = doc.get("credsStore")
    return store if isinstance(store, str) and store else None


def run_helper(name: str, server: str, config: Path) -> tuple[str, str] | None:
    """``(user, secret)`` from ``docker-credential-NAME get``, None if it has none for
    ``server``; asked once per process."""
    key = (name, server)
    if key not in _helper_answers:
        _helper_answers[key] = _ask_helper(name, server, config)
    return _helper_answers[key]


def _ask_helper(name: str, server: str, config: Path) -> tuple[str, str] | None:
    program = f"docker-credential-{name}"
    if "/" in name or shutil.which(program) is None:
        raise HelperMissingError(f"credential helper {program} (named in {config}) is not on PATH")
    try:
        done = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {program} did not answer for {server} "
                        f"within {HELPER_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise AuthError(f"credential helper {program} cannot be run: {exc.strerror or exc}") from None
    if done.returncode != 0:
        said = (done.stdout + done.stderr).decode(errors="replace")
        if "credentials not found" in said.lower():
            return None
        first = said.strip().splitlines()[0][:200] if said.strip() else "no message"
        raise AuthError(f"credential helper {program} failed for {server} "
                        f"(exit status {done.returncode}: {first})")
    try:
        answer = json.loads(done.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {program} printed something other than "
                        "{\"Username\": ..., \"Secret\": ...} for " + server) from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise AuthError(f"credential helper {program} printed a malformed answer for {server}")
    if user == "<token>":
        raise AuthError(f"credential helper {program} gave an identity token for {server}, "
                        "which lazyfs cannot use; pass --creds USER:PASSWORD")
    return user, secret


def _decode(entry: dict, path: Path, key: str) -> tuple[str, str] | None:
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return entry["username"], entry["password"]
    auth = entry.get("auth")
    if not isinstance(auth, str) or not auth:
        return None
    try:
        user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        sep = ""
    if not sep:
        raise AuthError(f"credentials file {path}: the auth entry for {key} is not "
                        "base64 of user:password")
    return user, password


def parse_creds(text: str) -> tuple[str, str]:
    """``USER:PASS`` from the command line; ValueError (without the secret) otherwise."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError("--creds expects USER:PASSWORD")
    return user, password
