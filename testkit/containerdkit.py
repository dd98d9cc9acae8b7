"""Real containerd for tests and benchmarks: processes stopped by pid, containerd's config
with the lazyfs proxy plugin (and, when asked, the CRI plugin), the lazyfs snapshotter,
``ctr``, and a pause image made from this machine's own ``sleep``.

Everything lives under one temporary directory per user (short: unix socket paths are
limited to 108 bytes), so several of these run side by side on one machine.
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from blockindex.oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json

from . import hostpython
from .waiting import stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Procs:
    """Processes a test starts, stopped by pid at teardown (TERM, then KILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        f = open(log, "ab")  # noqa: SIM115 - the child holds it
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        f.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        stop_process(p, 15, sig)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def wait_socket(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    wait_until(path.exists, timeout, f"{path} appearing", alive=proc, detail=lambda: log.read_text()[-3000:])


_BASE = """version = 2
root = "{tmp}/containerd/root"
state = "{tmp}/containerd/state"
{disabled}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[proxy_plugins.lazyfs]
  type = "snapshot"
  address = "{snap_sock}"
"""

# The Kubernetes settings: CRI prepares image layers through the lazyfs snapshotter and
# passes it the image's labels. restrict_oom_score_adj because a test may not lower its
# containers' oom_score_adj below its own; CNI dirs under the test's directory (pods here
# use the host's network, which needs no CNI plugin).
_CRI = """[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazyfs"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{tmp}/cni/bin"
    conf_dir = "{tmp}/cni/net.d"
"""


def containerd_config(tmp: Path, sock: Path, snap_sock: Path, *, sandbox_image: str | None = None) -> str:
    """containerd's config.toml; with ``sandbox_image``, the CRI plugin is on."""
    disabled = "" if sandbox_image else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    text = _BASE.format(tmp=tmp, sock=sock, snap_sock=snap_sock, disabled=disabled)
    if sandbox_image:
        text += _CRI.format(tmp=tmp, sandbox_image=sandbox_image)
    return text


def start_containerd(procs: Procs, tmp: Path, config_text: str) -> tuple[subprocess.Popen, Path]:
    """containerd with ``config_text``; its socket is ``tmp/c.sock``."""
    config = tmp / "config.toml"
    config.write_text(config_text)
    log = tmp / "containerd.log"
    proc = procs.start(["containerd", "--config", str(config)], log)
    wait_socket(tmp / "c.sock", proc, log)
    return proc, tmp / "c.sock"


def start_snapshotter(procs: Procs, sock: Path, root: Path, log: Path, *extra: str) -> subprocess.Popen:
    """The snapshotter, once it serves: its socket appears after it has restored its mounts
    (a socket left by a killed one is removed first, so it cannot be taken for the new one)."""
    sock.unlink(missing_ok=True)
    proc = procs.start([sys.executable, "-m", "lazyfs", "-v", "snapshotter", "--address", str(sock),
                        "--root", str(root), *extra], log, cwd=ROOT)
    wait_socket(sock, proc, log)
    return proc


def snapshots_stub(sock: Path) -> tuple[Any, Any]:
    """A channel to the snapshotter at ``sock``, once ready, and a Snapshots stub on it:
    containerd's side of the API, played by a test."""
    import grpc

    from lazyfs.snapshotter.server import pb_grpc

    channel = grpc.insecure_channel(f"unix://{sock}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, pb_grpc.SnapshotsStub(channel)


def pull_remote(stub: Any, ref: str, digest: str, layers: list[str]) -> None:
    """What ``lazyfs pull`` (or CRI) asks of the snapshotter: each layer prepared with the
    remote-snapshot labels, and each answered as already there."""
    import grpc
    import pytest

    from lazyfs.snapshotter.client import chain_ids
    from lazyfs.snapshotter.labels import LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_TARGET
    from lazyfs.snapshotter.server import pb

    parent = ""
    for layer, chain in zip(layers, chain_ids(layers), strict=True):
        labels = {LABEL_TARGET: chain, LABEL_IMAGE_REF: ref, LABEL_MANIFEST: digest, LABEL_LAYER: layer}
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazyfs", key=f"extract-{chain}",
                                                   parent=parent, labels=labels), timeout=120)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        parent = chain


def ctr(sock: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["ctr", "-a", str(sock), *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def shim_pids(tmp: Path) -> list[int]:
    """containerd shims serving the containerd under ``tmp`` (they outlive containerd)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and str(tmp).encode() in cmdline:
            pids.append(int(d.name))
    return pids


def teardown(tmp: Path, procs: Procs) -> None:
    """Stop what was started under ``tmp``: shims (by pid), processes, then every mount."""
    from lazyfs.process import wait_gone

    procs.stop_all()
    for pid in shim_pids(tmp):
        wait_gone(pid, 5, kill=True)
    for mnt in sorted((m.split()[1] for m in Path("/proc/mounts").read_text().splitlines()
                       if m.split()[1].startswith(str(tmp))), reverse=True):
        if "/mounts/" in mnt:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def oci_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def build_pause_image(layout_dir: Path, tag: str = "1") -> str:
    """An ordinary one-layer OCI image whose entrypoint is this machine's ``sleep
    infinity`` (with its shared libraries): a pod sandbox image without a download.
    Returns the manifest digest."""
    entries: dict[str, hostpython.HostEntry] = {}
    sleep = "/bin/sleep"
    hostpython.add_host_path(sleep, entries)
    for lib in sorted(hostpython.ldd([os.path.realpath(sleep)])):
        hostpython.add_host_path(lib, entries)
    tar = hostpython.host_layer_tar(entries, {})
    layout = Layout(layout_dir)
    layout.init()
    layer = layout.write_blob(tar, "application/vnd.oci.image.layer.v1.tar")
    config = layout.write_blob(canonical_json({
        "architecture": oci_arch(), "os": "linux",
        "config": {"Entrypoint": [sleep, "infinity"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }), MEDIA_TYPE_OCI_CONFIG)
    manifest = layout.write_blob(canonical_json({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST, "config": config, "layers": [layer],
    }), MEDIA_TYPE_OCI_MANIFEST)
    layout.tag(manifest, tag)
    return str(manifest["digest"])


def registry_with(tmp: Path, images: Path) -> Any:
    """Debian's docker-registry on loopback, holding every OCI layout under ``images``
    (``images/NAME`` tagged ``1``) as ``NAME:1``, pushed by lazyfs's own push: the
    origin a node pulls from. Its ``requests()`` are (method, uri, status) from its
    access log; ``stop()`` ends it. Skips the test without docker-registry."""
    import shutil

    import pytest

    from fetcher.imageref import ImageRef
    from fetcher.options import RegistryOptions
    from fetcher.push import push_image

    from .registryd import Registry

    if not shutil.which("docker-registry"):
        pytest.skip("needs docker-registry (tests/setup.sh installs it)")
    registry = Registry(tmp, name="origin")
    try:
        for layout_dir in sorted(p for p in images.iterdir() if p.is_dir()):
            layout = Layout(layout_dir)
            digest = layout.resolve("1")["digest"]
            ref = ImageRef.parse(f"{registry.host}/{layout_dir.name}:1")
            push_image(layout, digest, ref, RegistryOptions())
    except BaseException:
        registry.stop()
        raise
    return registry
