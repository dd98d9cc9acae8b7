"""A mount process started before it is needed: ``python -m lazyfs.spare READY_FD``.

Half of a mount's start is Python starting and importing what a mount runs on (about
0.3 s on a small machine). A spare does that ahead of time, then waits for one line on
its standard input: ``{"argv": [...], "log_file": "..."}``, the arguments of ``lazyfs
mount`` (image and mountpoint first). It then becomes that mount, ``--foreground``, and
says "ok" or "error CODE MESSAGE" on its ready pipe as a mount does. End of input (its
starter stopped, or died) ends it quietly, having mounted nothing.

The snapshotter keeps one spare (``LazyFileSystem(spare=True)``), so the image mount a
pull or a pod waits on has started already.
"""

from __future__ import annotations

import json
import os
import sys
import threading

#: the imports run at this much lower priority, so that a spare does not take the CPU from
#: the container whose mount has just made room for it
SPARE_NICE = 10


def _import_for_mount() -> None:
    """Import what a mount runs on, in a thread of its own at lower priority (nice is per
    thread on Linux: the mount itself, on the main thread, keeps its priority)."""
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + SPARE_NICE, 19))
    import trio  # noqa: F401 - the point of a spare: imported before the request comes

    from . import mount  # noqa: F401


def main(argv: list[str]) -> int:
    ready_fd = int(argv[0])
    imports = threading.Thread(target=_import_for_mount, name="spare-imports")
    imports.start()
    line = sys.stdin.buffer.readline()
    imports.join()
    if not line.strip():
        return 0
    try:
        request = json.loads(line)
        args = [str(a) for a in request["argv"]]
        log_file = str(request["log_file"])
    except (ValueError, KeyError, TypeError):
        os.write(ready_fd, b"error 2 spare mount process: malformed request\n")
        return 2
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        os.write(ready_fd, f"error 4 cannot write log file {log_file}: {exc.strerror}\n".encode())
        return 4
    null = os.open(os.devnull, os.O_RDONLY)
    for target, source in ((0, null), (1, fd), (2, fd)):
        os.dup2(source, target)
    os.close(null)
    os.close(fd)
    from . import cli

    return cli.main(["mount", *args, "--foreground", "--ready-fd", str(ready_fd), "--log-file", log_file])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
