"""Registry credentials from docker's ``config.json``.

Looked up in ``--creds-file FILE`` if given, else ``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``: ``{"auths": {"HOST": {"auth": base64("user:pass")}}}`` (or
``username`` and ``password`` fields). Docker Hub is also found under its historical key
``https://index.docker.io/v1/``. Credential helpers (``credsStore``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from .errors import AuthError
from .imageref import DOCKER_HUB


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
    auths = doc.get("auths") if isinstance(doc, dict) else None
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
