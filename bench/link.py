"""A realistic link between a node and its origin, on one machine.

The origin (``bench/origin.py``) runs in its own network namespace, reached from the host
over a veth pair. ``tbf`` on both ends caps the bandwidth; the round trip is slept by the
origin before every response, because ``netem`` is missing from this kernel. Names (netns,
veths) and the /30 subnet carry this process's id, so runs beside each other do not collide,
and ``close()`` (also on Ctrl-C: ``with Link(...)``) deletes the namespace, which takes both
veth ends with it.

    with Link(PROFILES["default"]) as link:
        origin = link.start_origin(images_dir, {"rootfs": rootfs_dir})
        ... mount f"{link.peer_ip}:{origin.oci}/repo:1" ...
        link.rx_bytes()   # bytes the host has received over the link so far
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    """What the link looks like from the node."""

    name: str
    mbit: float
    """Bandwidth cap in Mbit/s, each direction (``tc tbf``)."""
    rtt_ms: float
    """Round trip in milliseconds, slept by the origin before each response."""

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8


PROFILES = {
    "default": Profile(name="default", mbit=1000, rtt_ms=2),
    "wan": Profile(name="wan", mbit=100, rtt_ms=30),
}


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


@dataclasses.dataclass
class Origin:
    proc: subprocess.Popen
    oci: int
    """Port of the OCI distribution server (lazyfs serve)."""
    files: int
    """Port of the plain HTTP file server."""


class Link:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        tag = os.getpid() % 100000
        self.netns = f"lazyfs-bench-{os.getpid()}"
        self.host_if = f"lzb{tag}h"
        self.peer_if = f"lzb{tag}n"
        self.host_ip, self.peer_ip = self._subnet(tag)
        self.origins: list[Origin] = []
        self._up = False

    @staticmethod
    def _subnet(tag: int) -> tuple[str, str]:
        """A /30 in 10.240.0.0/12 that no interface of the host uses yet."""
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        for i in range(4096):
            n = (tag + i * 7919) % (1 << 18)
            base = (10 << 24) | (240 << 16) | (n << 2)
            host = f"{base >> 24}.{(base >> 16) & 255}.{(base >> 8) & 255}.{(base & 255) + 1}"
            peer = host.rsplit(".", 1)[0] + f".{(base & 255) + 2}"
            if f" {host}/" not in used and f" {peer}/" not in used:
                return host, peer
        raise RuntimeError("no free /30 in 10.240.0.0/12")

    def __enter__(self) -> Link:
        try:
            self.open()
        except BaseException:
            self.close()  # whatever part of the link was made
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._up = True
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _ip("link", "set", self.peer_if, "netns", self.netns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.netns, "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if)
        _ip("-n", self.netns, "link", "set", self.peer_if, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        rate = f"{self.profile.mbit}mbit"
        # burst: at least 64 KiB and 2 ms of traffic; queue: 50 ms before tbf drops
        burst = str(max(64 << 10, int(self.profile.bytes_per_s / 500)))
        for prefix in ([], ["-n", self.netns]):
            dev = self.peer_if if prefix else self.host_if
            _tc(*prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                "burst", burst, "latency", "50ms")
        # the veth's offloads make 64 KiB "packets": keep them, tbf's burst covers them

    def start_origin(self, images: Path, trees: dict[str, Path]) -> Origin:
        """The origin in the namespace: OCI layouts under ``images``, and each tree as
        plain HTTP under ``/NAME/``."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, str(ROOT / "bench" / "origin.py"),
             "--host", self.peer_ip, "--images", str(images),
             *[f"--tree={name}={path}" for name, path in trees.items()],
             "--rtt", str(self.profile.rtt_ms / 1000)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("{"):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the origin did not start (exit {proc.poll()})")
        ports = json.loads(line)
        origin = Origin(proc, ports["oci"], ports["files"])
        self.origins.append(origin)
        return origin

    def rx_bytes(self) -> int:
        """Bytes the host received over the link (everything the origin sent, headers too)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())

    def describe(self) -> dict[str, object]:
        return {"profile": self.profile.name, "mbit": self.profile.mbit,
                "rtt_ms": self.profile.rtt_ms,
                "how": "veth into a network namespace; tc tbf both ways caps the rate; the "
                       "origin sleeps the round trip before each response (netem is missing "
                       "from this kernel)"}

    def close(self) -> None:
        for origin in self.origins:
            if origin.proc.poll() is None:
                if origin.proc.stdin:
                    origin.proc.stdin.close()
                try:
                    origin.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    origin.proc.kill()
                    origin.proc.wait()
        self.origins.clear()
        if self._up:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
            self._up = False
