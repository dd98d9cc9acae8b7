"""The CRI keychain (``lazyfs snapshotter --cri-keychain``): kubelet's image service in
front of containerd's keeps each pull's credentials for the image's lazy mount.

Here against a stand-in for containerd (a gRPC server that records what reaches it), with
requests made by PyPI's CRI stubs as kubelet's would be; ``tests/test_snapshotter_cri.py``
runs it with containerd and a registry that needs a password."""

from __future__ import annotations

import base64
import json
import stat
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from lazyfs.snapshotter.filesystem import LazyFileSystem
from lazyfs.snapshotter.keychain import ImageServiceProxy, Keychain

cri = pytest.importorskip("cri_api.v1.api_pb2", reason="needs PyPI's container-runtime-interface-api")
cri_grpc = pytest.importorskip("cri_api.v1.api_pb2_grpc")

REF = "registry.example:5000/team/app:1-lazy"


def pull(image: str, **auth: str) -> bytes:
    req = cri.PullImageRequest(image=cri.ImageSpec(image=image),
                               sandbox_config=cri.PodSandboxConfig(hostname="pod"))
    if auth:
        req.auth.CopyFrom(cri.AuthConfig(**auth))
    return req.SerializeToString()


def test_a_pull_with_a_user_and_password_is_kept_for_its_repository():
    k = Keychain()
    said = k.remember(pull(REF, username="alice", password="s3cret"))
    assert "s3cret" not in said and "alice" not in said
    assert k.lookup(REF) == ("registry.example:5000", "alice", "s3cret")
    # the repository, whatever the tag or digest; not another repository on the same host
    assert k.lookup("registry.example:5000/team/app@sha256:" + "a" * 64)[1:] == ("alice", "s3cret")
    assert k.lookup("registry.example:5000/team/other:1") is None


def test_docker_auth_field_is_decoded_and_tokens_are_not_kept():
    k = Keychain()
    k.remember(pull("reg.example/app:1", auth=base64.b64encode(b"bob:pa:ss").decode()))
    assert k.lookup("reg.example/app:2") == ("reg.example", "bob", "pa:ss")
    for auth in ({"identity_token": "Zq9tokenX"}, {"registry_token": "Zq9tokenX"}, {"auth": "!!Zq9tokenX"}):
        said = k.remember(pull("reg.example/tokens:1", **auth))
        assert "Zq9tokenX" not in said and k.lookup("reg.example/tokens:1") is None, said
    assert "without credentials" in k.remember(pull("reg.example/anon:1"))
    assert k.lookup("reg.example/anon:1") is None


def test_credentials_named_for_another_server_are_not_kept():
    k = Keychain()
    for server in ("https://registry.example:5000", "registry.example:5000", "https://registry.example:5000/v2/"):
        k = Keychain()
        k.remember(pull(REF, username="alice", password="s3cret", server_address=server))
        assert k.lookup(REF) is not None, server
    for server in ("https://elsewhere.example", "registry.example:5001", "https://registry.example"):
        k = Keychain()
        said = k.remember(pull(REF, username="alice", password="s3cret", server_address=server))
        assert k.lookup(REF) is None and "another server" in said, server
    k.remember(pull("python:3", username="u", password="p", server_address="https://index.docker.io/v1/"))
    assert k.lookup("docker.io/library/python:3") == ("docker.io", "u", "p")


def test_docker_hub_names_are_normalized():
    k = Keychain()
    k.remember(pull("python:3", username="u", password="p"))
    assert k.lookup("docker.io/library/python@sha256:" + "b" * 64) == ("docker.io", "u", "p")


def test_the_oldest_credentials_go_first_past_the_limit():
    k = Keychain(max_entries=2)
    for name in ("a", "b", "c"):
        k.add(f"reg.example/{name}:1", name, "pw")
    assert k.lookup("reg.example/a:1") is None
    assert k.lookup("reg.example/c:1") == ("reg.example", "c", "pw")


class Upstream:
    """containerd's image service, played by a test: records (method, raw request) and
    answers with canned bytes, or fails with NOT_FOUND for RemoveImage."""

    def __init__(self, sock: Path) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.many = False
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[self])
        self.server.add_insecure_port(f"unix://{sock}")
        self.server.start()

    def service(self, details):
        method = details.method

        def answer(request: bytes, context) -> bytes:
            self.calls.append((method, request))
            if method.endswith("/RemoveImage"):
                context.abort(grpc.StatusCode.NOT_FOUND, "no such image")
            if method.endswith("/PullImage"):
                return cri.PullImageResponse(image_ref="sha256:" + "c" * 64).SerializeToString()
            if method.endswith("/ListImages") and self.many:
                return cri.ListImagesResponse(images=[cri.Image(id=f"sha256:{i:064x}", repo_tags=[
                    f"registry.example/team/image-{i}:tag"]) for i in range(60_000)]).SerializeToString()
            return cri.ListImagesResponse(images=[cri.Image(id="x")]).SerializeToString()

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture
def proxied():
    tmp = Path(tempfile.mkdtemp(prefix="lzkc-"))  # short: unix socket paths are limited
    upstream = Upstream(tmp / "c.sock")
    keychain = Keychain()
    proxy = ImageServiceProxy(keychain, tmp / "cri.sock", str(tmp / "c.sock")).start()
    channel = grpc.insecure_channel(f"unix://{tmp / 'cri.sock'}")
    yield keychain, upstream, channel, tmp
    channel.close()
    proxy.stop()
    upstream.server.stop(0)


def test_every_image_call_reaches_containerd_unchanged_and_pulls_leave_their_credentials(proxied):
    keychain, upstream, channel, tmp = proxied
    images = cri_grpc.ImageServiceStub(channel)
    raw = pull(REF, username="alice", password="s3cret")
    answer = images.PullImage(cri.PullImageRequest.FromString(raw), timeout=10)
    assert answer.image_ref == "sha256:" + "c" * 64
    assert upstream.calls == [("/runtime.v1.ImageService/PullImage", raw)]
    assert keychain.lookup(REF) == ("registry.example:5000", "alice", "s3cret")
    assert [i.id for i in images.ListImages(cri.ListImagesRequest(), timeout=10).images] == ["x"]
    with pytest.raises(grpc.RpcError) as err:  # containerd's error, as containerd said it
        images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=REF)), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no such image"
    with pytest.raises(grpc.RpcError) as err:  # the runtime service is not ours to serve
        cri_grpc.RuntimeServiceStub(channel).Version(cri.VersionRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stat.S_IMODE((tmp / "cri.sock").stat().st_mode) == 0o600


def test_answers_larger_than_grpcs_default_limit_pass_as_kubelet_allows(proxied):
    """kubelet and containerd allow 16 MiB messages; a node with many images answers
    ListImages with more than gRPC's default 4 MiB."""
    _, upstream, _, tmp = proxied
    upstream.many = True
    channel = grpc.insecure_channel(f"unix://{tmp / 'cri.sock'}",
                                    options=[("grpc.max_receive_message_length", 16 << 20)])
    try:
        images = cri_grpc.ImageServiceStub(channel).ListImages(cri.ListImagesRequest(), timeout=30).images
        assert len(images) == 60_000 and images[-1].id == f"sha256:{59_999:064x}"
    finally:
        channel.close()


def test_a_pull_that_containerd_does_not_answer_in_time_fails_with_its_deadline(proxied):
    _, upstream, channel, _ = proxied
    release = threading.Event()
    upstream.service = lambda details: grpc.unary_unary_rpc_method_handler(
        lambda request, context: (release.wait(30), b"")[1])
    try:
        with pytest.raises(grpc.RpcError) as err:
            cri_grpc.ImageServiceStub(channel).ImageFsInfo(cri.ImageFsInfoRequest(), timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()


def test_a_mount_gets_the_credentials_of_its_pull_in_a_file_of_its_own(tmp_path):
    keychain = Keychain()
    fs = LazyFileSystem(tmp_path, keychain=keychain)
    mnt = fs.mountpoint(REF)
    assert fs._creds_args(REF, mnt) == []  # nothing pulled with credentials: the node's own
    keychain.add(REF, "alice", "s3cret")
    args = fs._creds_args(REF, mnt)
    path = fs.creds_file(mnt)
    assert args == ["--creds-file", str(path)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"auths": {"registry.example:5000": {
        "username": "alice", "password": "s3cret"}}}
    # a snapshotter restarted (no keychain entries) remounts with the file it left
    assert LazyFileSystem(tmp_path, keychain=Keychain())._creds_args(REF, mnt) == args
    fs.unmount(mnt)  # nothing mounted there: the file goes all the same
    assert not path.exists()
