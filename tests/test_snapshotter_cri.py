"""The Kubernetes path: containerd's CRI plugin pulls a lazy image through the lazyfs
snapshotter (labels on, ``snapshotter = "lazyfs"``), runs a pod sandbox and a container in
it, and the container's output is read back from its CRI log, as kubelet would.

The pod uses the host's network (no CNI plugin needed); its sandbox image is an ordinary
image made from this machine's ``sleep``, pulled through CRI from the same test registry
(Debian's docker-registry) and unpacked by the same snapshotter the usual way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from blockindex.convert import convert
from blockindex.oci import Layout
from lazyfs.mountinfo import STATUS_XATTR
from lazyfs.process import wait_gone
from testkit import containerdkit as kit
from testkit import imagegen
from testkit.registryd import Registry, make_htpasswd, needs_registry
from testkit.waiting import wait_until

from .conftest import lazyfs

PASSWORD = "Pw-9f3c-private"

pytestmark = [pytest.mark.mount, pytest.mark.timeout(600)]  # containerd: steps of up to 120 s each

cri = pytest.importorskip("cri_api.v1.api_pb2", reason="needs PyPI's container-runtime-interface-api")
cri_grpc = pytest.importorskip("cri_api.v1.api_pb2_grpc")


@dataclasses.dataclass
class CriNode:
    tmp: Path
    sock: Path
    server: object
    ref: str
    manifest: dict
    runtime: object
    images: object
    keychain_images: object
    """The image service as kubelet sees it with ``--image-service-endpoint`` pointed at
    the snapshotter's ``--cri-keychain`` socket."""

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def chunk_blob_requests(self) -> list:
        blobs = {layer["digest"] for layer in self.manifest["layers"][1:]}
        return [r for r in self.server.requests()  # downloads: not the push's HEADs and PUTs
                if r[0] == "GET" and any(r[1].endswith(b) for b in blobs)]


@pytest.fixture(scope="module")
def node():
    tools = ("containerd", "runc", "containerd-shim-runc-v2")
    if os.geteuid() != 0 or not all(shutil.which(c) for c in tools):
        pytest.skip("needs root, containerd and runc (tests/setup.sh installs them)")

    tmp = Path(tempfile.mkdtemp(prefix="lzcri-"))  # short: unix socket paths are limited
    procs = kit.Procs()
    server = None
    try:
        image = imagegen.build_python_image(tmp / "python.tar", cache_dir=_python_cache())
        convert(f"docker-archive:{image}", f"oci:{tmp / 'images' / 'python'}:1")
        kit.build_pause_image(tmp / "images" / "pause")
        server = kit.registry_with(tmp, tmp / "images")
        layout = Layout(tmp / "images" / "python")
        manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
        registry = f"127.0.0.1:{server.port}"
        snap_sock = tmp / "s.sock"
        kit.start_snapshotter(procs, snap_sock, tmp / "lazyfs", tmp / "snapshotter.log",
                              "--no-prefetch", "--timeout", "10",
                              "--cri-keychain", str(tmp / "k.sock"), "--containerd", str(tmp / "c.sock"))
        config = kit.containerd_config(tmp, tmp / "c.sock", snap_sock, sandbox_image=f"{registry}/pause:1")
        _proc, sock = kit.start_containerd(procs, tmp, config)
        channel = grpc.insecure_channel(f"unix://{sock}")
        runtime = cri_grpc.RuntimeServiceStub(channel)
        def answers() -> bool:
            try:
                runtime.Version(cri.VersionRequest(), timeout=5)
            except grpc.RpcError:
                return False
            return True

        # the CRI plugin answers once it has initialized
        wait_until(answers, 60, "CRI answering", interval=0.5,
                   detail=lambda: (tmp / "containerd.log").read_text()[-3000:])
        keychain = grpc.insecure_channel(f"unix://{tmp / 'k.sock'}")
        yield CriNode(tmp, sock, server, f"{registry}/python:1", manifest, runtime,
                      cri_grpc.ImageServiceStub(channel), cri_grpc.ImageServiceStub(keychain))
        keychain.close()
        channel.close()
    finally:
        kit.teardown(tmp, procs)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _python_cache() -> Path:
    from .test_imagegen import _python_cache as cache

    return cache()


def _host_network() -> object:
    return cri.NamespaceOption(network=cri.NODE)


def test_a_pod_runs_from_a_lazy_image_pulled_through_cri(node):
    pulled = node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=node.ref)), timeout=120)
    assert pulled.image_ref
    assert node.chunk_blob_requests() == [], "CRI's pull downloaded a chunk blob"
    assert "remote snapshot" in node.log("snapshotter")
    logs = node.tmp / "pods" / "lazy"
    sandbox_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="lazy", namespace="default", uid="lazy-uid", attempt=0),
        log_directory=str(logs),  # no hostname: a host-network pod shares the host's UTS namespace
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=_host_network())))
    sandbox = node.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=sandbox_config),
                                         timeout=120).pod_sandbox_id
    try:
        assert node.chunk_blob_requests() == [], "a chunk blob was downloaded before the container started"
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="py", attempt=0), image=cri.ImageSpec(image=node.ref),
            command=["/usr/bin/python3"], args=["-c", "import sys; print('hello from', sys.version_info[0])"],
            log_path="py.log",
            linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                namespace_options=_host_network())))
        cid = node.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox, config=config, sandbox_config=sandbox_config), timeout=120).container_id
        node.runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
        status = wait_until(
            lambda: (s := node.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status)
            .state == cri.CONTAINER_EXITED and s, 120, "the container exiting", interval=0.2)
        assert status.exit_code == 0, (status.reason, status.message, (logs / "py.log").read_text())
        # CRI's log format: "<time> <stream> <F|P> <text>" per line
        lines = [line.split(" ", 3) for line in (logs / "py.log").read_text().splitlines()]
        assert [(s, text) for _t, s, _tag, text in lines] == [("stdout", "hello from 3")]
        assert node.chunk_blob_requests(), "the container read its files through the lazy mount"
    finally:
        node.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
        node.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)


def test_removing_the_image_through_cri_unmounts_it(node):
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=node.ref)), timeout=120)
    mounts = [p for p in (node.tmp / "lazyfs" / "mounts").iterdir() if os.path.ismount(p)]
    assert len(mounts) == 1
    pid = json.loads(os.getxattr(mounts[0], STATUS_XATTR))["pid"]
    node.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=node.ref)), timeout=60)
    wait_until(lambda: not os.path.ismount(mounts[0]), 30, "the image unmounted", interval=0.2,
               detail=lambda: node.log("snapshotter")[-3000:])
    # the mount process is gone, not left as a zombie child of the snapshotter
    assert wait_gone(pid, 15), Path(f"/proc/{pid}/status").read_text()[:200]


@needs_registry
def test_a_private_lazy_image_is_mounted_with_the_credentials_kubelet_pulled_it_with(node):
    """A registry that wants a password, which the node has not got: kubelet's pull
    through the keychain socket carries the pod's pull secret, containerd gets the pull
    unchanged, and the lazy mount made for it uses the same credentials. The same image
    pulled from containerd directly (no keychain) cannot be mounted lazily."""
    tmp = node.tmp / "private"
    rootfs = tmp / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    files = {"etc/motd": b"hello from a private image\n", "data.bin": os.urandom(300_000)}
    for rel, data in files.items():
        (rootfs / rel).write_bytes(data)
    registry = Registry(tmp, htpasswd=make_htpasswd(tmp / "htpasswd", "puller", PASSWORD))
    try:
        for repo in ("private/app", "private/other"):  # different layers: containerd unpacks both
            (rootfs / "which").write_text(repo)
            lazyfs("convert", f"dir:{rootfs}", f"docker://{registry.host}/{repo}:1", "--creds",
                   f"puller:{PASSWORD}")
        (rootfs / "which").unlink()
        auth = cri.AuthConfig(username="puller", password=PASSWORD, server_address=f"https://{registry.host}")
        ref = f"{registry.host}/private/app:1"
        node.keychain_images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref), auth=auth),
                                       timeout=120)
        status = node.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30)
        assert status.image.id, "containerd did not get the pull the keychain passed on"
        mnt = _mount_of(node, f"{registry.host}/private/app")
        chunk_reads_before = len(registry.blob_reads())
        for rel, data in files.items():
            assert (mnt / rel).read_bytes() == data
        assert len(registry.blob_reads()) > chunk_reads_before, "the files came through the mount"
        creds = node.tmp / "lazyfs" / "creds" / f"{mnt.name}.json"
        assert creds.stat().st_mode & 0o077 == 0

        other = f"{registry.host}/private/other:1"
        try:  # containerd has the credentials; the snapshotter does not
            node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=other), auth=auth),
                                  timeout=120)
        except grpc.RpcError:
            pass  # containerd may fail to unpack what it then downloads: not our concern here
        refused = [x for x in node.log("snapshotter").splitlines()
                   if f"cannot mount {registry.host}/private/other" in x]
        assert refused and "requires a user name and password" in refused[0], node.log("snapshotter")[-2000:]
        for path in [node.tmp / "snapshotter.log", *(node.tmp / "lazyfs" / "logs").iterdir()]:
            assert PASSWORD not in path.read_text(errors="replace"), f"the password is in {path}"
    finally:
        registry.stop()


def _mount_of(node: CriNode, repository: str) -> Path:
    for p in (node.tmp / "lazyfs" / "mounts").iterdir():
        if os.path.ismount(p) and json.loads(os.getxattr(p, STATUS_XATTR))["ref"].startswith(repository):
            return p
    raise AssertionError(f"no lazy mount of {repository}:\n{node.log('snapshotter')[-3000:]}")
