"""Whether a process is still running: the one test every part of lazyfs uses (stale
pins, dead writers' temp files, waiting for a mount process to end)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie not yet reaped counts). A pid of 0 or
    below names a process group, not a process: it counts as alive, so that nothing is
    judged left behind by a dead process on its account."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
