"""Scenario 7: other lazy filesystems from Debian packages, on the same files over the same
link: ``rclone mount`` of an HTTP remote with ``--vfs-cache-mode full``, and ``httpdirfs``
with its cache. Both read the image's tree as a plain HTTP directory tree from the origin's
web server (symlinks resolved there, since HTTP has none).

For each: readiness (the same two programs, from the mount command to done, fresh cache,
page cache dropped), the bytes that crossed the link for it, and sequential reads of the
throughput scenario's file, cold (fresh cache) and warm (remounted on the filled cache,
page cache dropped). Whatever cannot run here is reported with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.context import Bench, fresh_cold, run_programs, stats
from bench.harness import log, read_all


def _argv(tool: str, url: str, mnt: Path, cache: Path) -> list[str]:
    if tool == "rclone":
        # executable bits: an HTTP remote has no modes, rclone gives every file these
        return ["rclone", "mount", ":http:", str(mnt), "--http-url", url, "--vfs-cache-mode", "full",
                "--cache-dir", str(cache), "--read-only", "--file-perms", "0755",
                "--dir-perms", "0755"]
    return ["httpdirfs", "-f", "--cache", "--cache-location", str(cache), url, str(mnt)]


class _Mount:
    """One FUSE mount by an outside tool, started in the foreground, stopped by its pid."""

    def __init__(self, b: Bench, tool: str, url: str, cache: Path) -> None:
        self.mnt = b.h.fresh(f"{tool}-mnt")
        cache.mkdir(exist_ok=True)
        self.log = open(str(self.mnt) + ".log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(_argv(tool, url, self.mnt, cache), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        b.h.procs.append(self.proc)
        b.h.mounts[self.mnt] = None
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(b)
                raise RuntimeError(f"{tool} did not mount: {Path(self.log.name).read_text()[-300:]}")
            time.sleep(0.005)

    def stop(self, b: Bench) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        b.h.mounts.pop(self.mnt, None)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _tool(b: Bench, tool: str) -> dict[str, Any]:
    if shutil.which(tool) is None:
        return {"status": f"not available: `{tool}` is not installed (apt-get install {tool})"}
    p = b.params
    out: dict[str, Any] = {"status": "ok"}
    ready: list[dict[str, float]] = []
    why_not: str | None = None
    for i in range(p.runs):
        log(f"{tool} readiness run {i + 1}/{p.runs}")
        cache = b.h.fresh(f"{tool}-cache")
        fresh_cold(b)
        rx0 = b.link.rx_bytes()
        t0 = time.perf_counter()
        m = _Mount(b, tool, b.files_url("rootfs/"), cache)
        t_mount = time.perf_counter() - t0
        try:
            row = run_programs(m.mnt, t0)
        except RuntimeError as exc:
            why_not = str(exc)
            m.stop(b)
            break
        row["mount_s"] = t_mount
        row["link_bytes"] = b.link.rx_bytes() - rx0
        ready.append(row)
        m.stop(b)
        shutil.rmtree(cache)
    if why_not is not None:
        mode = _mode_of_sh(b, tool)
        out["readiness"] = {"status": f"cannot run programs: {why_not} (/bin/sh is presented "
                            f"with mode {mode:o}{'' if mode & 0o111 else ': no execute bit'})"}
    else:
        out["readiness"] = {k: stats([float(r[k]) for r in ready]) for k in ready[0]}

    seq_cold, seq_warm, seq_bytes = [], [], []
    size = p.seq_bytes
    for i in range(p.runs):
        log(f"{tool} sequential read run {i + 1}/{p.runs}")
        cache = b.h.fresh(f"{tool}-cache")
        for label in ("cold", "warm"):
            m = _Mount(b, tool, b.files_url("seq/"), cache)
            fresh_cold(b)
            rx0 = b.link.rx_bytes()
            t = time.perf_counter()
            n = read_all(m.mnt / "data" / "big")
            took = time.perf_counter() - t
            if n != size:
                raise RuntimeError(f"{tool}: read {n} bytes of {size}")
            (seq_cold if label == "cold" else seq_warm).append(size / took)
            if label == "cold":
                seq_bytes.append(float(b.link.rx_bytes() - rx0))
            m.stop(b)
        shutil.rmtree(cache)
    out["seq_bytes_per_s"] = {"cold": stats(seq_cold), "warm": stats(seq_warm)}
    out["seq_cold_link_bytes"] = stats(seq_bytes)
    return out


def _mode_of_sh(b: Bench, tool: str) -> int:
    """Mount once more to read /bin/sh's mode (for the report of why programs cannot run)."""
    m = _Mount(b, tool, b.files_url("rootfs/"), b.h.fresh(f"{tool}-cache"))
    try:
        return os.stat(m.mnt / "bin" / "sh").st_mode & 0o7777
    finally:
        m.stop(b)


def scenario(b: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool in ("rclone", "httpdirfs"):
        try:
            out[tool] = _tool(b, tool)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            out[tool] = {"status": f"failed: {exc}"}
    return out
