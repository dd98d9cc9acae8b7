"""The one interface every origin of blob bytes implements."""

from __future__ import annotations

from typing import Protocol


class BlobSource(Protocol):
    """Something that serves byte ranges of content-addressed blobs (a registry, an
    HTTP store, a peer). Implementations raise only ``fetcher.errors.FetchError``s and
    bound every wait by a deadline of their own."""

    async def read_range(self, digest: str, offset: int, length: int) -> bytes | bytearray:
        """Exactly ``length`` bytes of blob ``digest`` starting at ``offset``."""
        ...

    def blame(self, digest: str, offset: int, length: int) -> bool:
        """The range ``read_range`` sent lately held bytes that failed verification. True if
        another sender sent them (a mirror, now skipped: see ``mirrors.py``), so that
        reading the range again reaches the next source; False if there is none to ask."""
        ...
