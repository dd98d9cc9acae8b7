"""``lazyfs pull`` with a stopwatch: where the seconds of a lazy pull go.

The child side runs as ``python3 bench/pull_phases.py OUT.json ARGS...``: it is
``python3 -m lazyfs ARGS...`` (the same ``lazyfs.cli.main``, the same code path) with
timers wrapped around the pull's steps, and writes what they saw to ``OUT.json``. The
imports a pull makes (``lazyfs.cli``, the containerd client with grpc, and trio + httpx,
which the registry step imports on first use) are made up front so they are timed apart.

``timed_pull`` is the parent's side: it starts the child, times it from spawn to exit and
splits that into

    interpreter_s       spawn until the first line of the script runs (exec, site)
    imports_s           the imports above
    cli_s               argument parsing and logging set-up, until the pull begins
    registry_s          manifest and config from the registry (``registry_manifest_s``,
                        ``registry_config_s``; the rest is trio's start and the HTTP client's
                        set-up and close)
    containerd_connect_s  the gRPC channel to containerd and the lease
    content_store_s     the manifest and config written into containerd's content store
    snapshot_prepare_s  the layers' snapshots prepared through the snapshotter, which starts
                        the image's mount (its parts: ``prepare_parts``)
    image_create_s      the image record
    exit_s              from the pull's return until the process is gone (interpreter exit)

``prepare_parts`` splits the snapshot step with the other processes' clocks: the registry's
access log (the mount process opening the image: manifest, index, referrers) and the mount
process's own log line ``mounted ...``:

    to_first_request_s    containerd and the snapshotter passing the request on, the
                          (spare) mount process starting, until its first registry answer
    mount_registry_s      first to last registry answer of the mount process
    index_open_and_fuse_s last answer to the ``mounted`` log line (index opened, FUSE init)
    mounted_to_reply_s    from the mount's ``mounted`` to the step's end: negative when the
                          snapshotter answered before the mount was up (it does for
                          ``lazyfs pull``, and a container's start waits for the mount)
"""

from __future__ import annotations

import time

T_SCRIPT = time.monotonic()

import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
T0_ENV = "LAZYFS_BENCH_SPAWNED"
"""The parent's ``time.monotonic()`` just before it started this process."""


# -- the child ------------------------------------------------------------------------------

def _child(out: Path, argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    t_imports = time.monotonic()
    import trio  # noqa: F401 - imported here so that the registry step does not time it

    import fetcher.registry
    import lazyfs.cli
    from lazyfs.snapshotter import client
    t_imported = time.monotonic()

    spans: dict[str, float] = defaultdict(float)
    firsts: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.monotonic()
            firsts.setdefault(name, t)
            try:
                return fn(*a, **kw)
            finally:
                spans[name] += time.monotonic() - t
        return wrapper

    def atimed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.monotonic()
            try:
                return await fn(*a, **kw)
            finally:
                spans[name] += time.monotonic() - t
        return wrapper

    # cmd_pull imports ``pull`` from the module when it runs, so it finds the wrapped one
    client.pull = timed("pull_s", client.pull)  # type: ignore[method-assign]
    client._fetch = timed("registry_s", client._fetch)  # type: ignore[attr-defined]
    client._write = timed("content_store_s", client._write)  # type: ignore[attr-defined]
    client._prepare_remote = timed("snapshot_prepare_s", client._prepare_remote)  # type: ignore[attr-defined]
    client._create_image = timed("image_create_s", client._create_image)  # type: ignore[attr-defined]
    registry = fetcher.registry.RegistryClient
    registry.get_manifest = atimed("registry_manifest_s", registry.get_manifest)  # type: ignore[method-assign]
    registry.read_blob = atimed("registry_config_s", registry.read_blob)  # type: ignore[method-assign]

    code = lazyfs.cli.main(argv)
    out.write_text(json.dumps({
        "code": code, "t_script": T_SCRIPT, "t_imports": t_imports, "t_imported": t_imported,
        "t_main_done": time.monotonic(), "spans": spans, "firsts": firsts,
        "wall_minus_monotonic": time.time() - time.monotonic(),
    }))
    return code


# -- the parent -----------------------------------------------------------------------------

def timed_pull(address: Path, ref: str, out: Path) -> dict[str, Any]:
    """``lazyfs pull --address ADDRESS REF``, timed end to end and by step (seconds)."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), "pull",
                           "--address", str(address), ref],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, T0_ENV: repr(t0)})
    t_end = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"lazyfs pull exited {done.returncode}: {done.stderr.strip()}")
    seen = json.loads(out.read_text())
    spans = seen["spans"]
    steps = {
        "interpreter_s": seen["t_script"] - t0,
        "imports_s": seen["t_imported"] - seen["t_imports"],
        "cli_s": seen["firsts"]["pull_s"] - seen["t_imported"],
        "registry_s": spans["registry_s"],
        "registry_manifest_s": spans["registry_manifest_s"],
        "registry_config_s": spans["registry_config_s"],
        "containerd_connect_s": spans["pull_s"] - spans["registry_s"] - spans["content_store_s"]
        - spans["snapshot_prepare_s"] - spans["image_create_s"],
        "content_store_s": spans["content_store_s"],
        "snapshot_prepare_s": spans["snapshot_prepare_s"],
        "image_create_s": spans["image_create_s"],
        "exit_s": t_end - seen["t_main_done"],
    }
    prepare_start = seen["firsts"]["snapshot_prepare_s"] + seen["wall_minus_monotonic"]
    return {"pull_s": t_end - t0, "steps": steps,
            "prepare_window": (prepare_start, prepare_start + spans["snapshot_prepare_s"])}


def prepare_parts(window: tuple[float, float], answers: list[float],
                  mounted: float | None) -> dict[str, float]:
    """The image's mount from the snapshot step's start (``window``), split by the
    registry's answers (wall-clock times, in order) until the mount process's ``mounted``
    time. The snapshotter brings the mount of a ``lazyfs pull`` up in the background, so
    it may end after the step: ``mounted_to_reply_s`` is then negative (the pull's answer
    came that long before the mount)."""
    start, end = window
    inside = [t for t in answers if mounted is not None and start <= t <= mounted]
    if not inside or mounted is None:
        return {}
    return {"to_first_request_s": inside[0] - start, "mount_registry_s": inside[-1] - inside[0],
            "index_open_and_fuse_s": max(0.0, mounted - inside[-1]),
            "mounted_to_reply_s": end - mounted}


def mounted_time(log: Path) -> float | None:
    """Wall-clock time of the ``mounted`` line of a mount process's log (its logging's
    ``asctime``: local time, milliseconds)."""
    for line in log.read_text(errors="replace").splitlines():
        if " lazyfs.mount: mounted " in line:
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


if __name__ == "__main__":
    raise SystemExit(_child(Path(sys.argv[1]), sys.argv[2:]))
