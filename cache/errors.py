"""Errors of the local cache.

    CacheError              the cache directory cannot be used (missing, not writable, full)
"""

from __future__ import annotations


class CacheError(Exception):
    """The cache directory cannot be created, written or read; the message says why."""
