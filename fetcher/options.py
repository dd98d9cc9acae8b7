"""How to talk to registries: one frozen object built from the command line and the
config file, handed to every client the process makes.

    RegistryOptions(...).client(ref)          a RegistryClient for ref's repository
    RegistryOptions(...).client(ref, push=True)
"""

from __future__ import annotations

import dataclasses

from .credentials import lookup
from .imageref import ImageRef
from .mirrors import MirroredClient
from .registry import RegistryClient, _is_loopback


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegistryOptions:
    """Everything about reaching registries that is not the image itself."""

    timeout: float = 30.0
    """Seconds one request may take (connect, and each wait for bytes)."""
    insecure_hosts: frozenset[str] = frozenset()
    """Registries (``host[:port]``) reached over plain HTTP; loopback always is."""
    ca_file: str | None = None
    """A PEM file of CAs trusted in addition to the system's store."""
    credentials: tuple[str, str] | None = None
    """User and password for every registry (``--creds``); None: look them up."""
    creds_file: str | None = None
    """A docker ``config.json``-style file to look credentials up in (``--creds-file``)."""
    mirrors: tuple[str, ...] = ()
    """Base URLs of blob mirrors, tried in order before the registry."""
    proxy: str | None = None
    """An HTTP proxy URL every request goes through."""

    def plain_http(self, registry: str) -> bool:
        return _is_loopback(registry) or registry in self.insecure_hosts

    def credentials_for(self, registry: str) -> tuple[str, str] | None:
        if self.credentials is not None:
            return self.credentials
        return lookup(registry, self.creds_file)

    def client(self, ref: ImageRef, *, push: bool = False) -> RegistryClient:
        return RegistryClient(
            ref, timeout=self.timeout, insecure=self.plain_http(ref.registry),
            credentials=self.credentials_for(ref.registry), push=push,
            ca_file=self.ca_file, proxy=self.proxy,
        )

    def reader(self, ref: ImageRef) -> RegistryClient | MirroredClient:
        """A client for reading ``ref``: blobs from the mirrors first, if there are any."""
        origin = self.client(ref)
        if not self.mirrors:
            return origin
        credentials = self.credentials_for(ref.registry)
        mirrors = []
        for url in self.mirrors:
            scheme, _, host = url.partition("://")
            mirror_ref = dataclasses.replace(ref, registry=host.rstrip("/"))
            mirrors.append(RegistryClient(
                mirror_ref, timeout=self.timeout, insecure=scheme == "http",
                credentials=credentials, ca_file=self.ca_file, proxy=self.proxy))
        return MirroredClient(origin, mirrors)
