"""Files written whole or not at all: a temporary file beside the target, renamed into
place. The temporary files of writers that died are swept by name (``PID`` inside it).

Temp files live in their target's own directory, never in a common tmp/: a rename across
directories takes the filesystem's rename lock, which overlayfs holds while it copies a
directory up from a lazyfs lower layer and asks this very mount for its attributes (see
``cache.store``).
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from .pids import alive

TEMP_PREFIX = ".tmp."
"""Names starting with a dot are never entries: listings skip them."""


def temp_path(path: str | Path) -> str:
    """Where ``write_atomic`` writes ``path`` before renaming it: the same directory (see
    the module docstring for why), a name unique per writer thread without mkstemp's
    cost, ending in ``.PID.TID`` so that a sweep can tell a dead writer's."""
    parent, name = os.path.split(path)
    return f"{parent}/{TEMP_PREFIX}{name}.{os.getpid()}.{threading.get_ident()}"


def write_atomic(path: str | Path, parts: list[bytes | memoryview]) -> None:
    """Write ``parts`` to ``path`` whole or not at all: into a temp file in ``path``'s own
    directory (created if needed), then renamed into place. Raises OSError."""
    tmp = temp_path(path)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = os.writev(fd, parts)
            if written != sum(map(len, parts)):
                raise OSError(errno.EIO, f"short write ({written} bytes)")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sweep_dead_temps(dirs: list[Path]) -> int:
    """Remove the temp files of writers whose process is gone from ``dirs``; their count."""
    swept = 0
    for directory in dirs:
        try:
            names = [n for n in os.listdir(directory) if not n.startswith(".probe-")]
        except OSError:
            continue
        for name in names:
            parts = name.rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or alive(int(parts[1])):
                continue
            if not name.startswith(TEMP_PREFIX):
                continue
            try:
                os.unlink(directory / name)
                swept += 1
            except OSError:
                pass
    return swept


