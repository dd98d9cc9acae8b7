"""convert from and push to a real registry (Debian's docker-registry, fed by skopeo),
then mount from it."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest

from blockindex.oci import MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, Layout, canonical_json
from lazyfs.convert import convert
from testkit import imagegen, tarwriter, treecompare
from testkit.registryd import needs_registry

from .conftest import lazyfs

pytestmark = [needs_registry]
CS = 64 << 10


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regrich")
    return imagegen.build_rich_image(tmp / "rich.tar")


def _second_image(path, tag: str) -> None:
    """An image on the rich image's base layer with a different top layer."""
    tars = [tarwriter.write_tar(layer) for layer in imagegen.rich_layers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = b"version two\n" * 1000
        ti = tarfile.TarInfo("v2.txt")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    tarwriter.write_docker_archive(path, [tars[0], buf.getvalue()], gzip_layers={1}, repo_tag=tag)


@pytest.mark.mount
def test_convert_from_registry_push_back_and_mount(registry, rich, mounts):
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    done = lazyfs("convert", f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy",
                  "--chunk-size", "64K")
    assert "pushed:" in done.stdout
    mnt, _ = mounts.mount(f"{registry.host}/app:1-lazy", "--no-prefetch")
    assert treecompare.compare_tree(mnt, rich.expected) == []
    # the original config (entrypoint, env) is kept
    info = json.loads(lazyfs("images", f"{registry.host}/app:1-lazy", "--json").stdout)
    assert info["lazy"] is True and info["files"] == sum(
        1 for e in rich.expected.values() if e.kind == "file" and e.link_group is None) + len(
        {e.link_group for e in rich.expected.values() if e.link_group})
    assert info["config"]["config"]["Cmd"] == ["/bin/sh"]


def test_shared_base_layer_uploads_no_blob_twice(registry, rich, tmp_path):
    _second_image(tmp_path / "two.tar", "app:2")
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    registry.skopeo_copy(f"docker-archive:{tmp_path / 'two.tar'}", "app:2")
    before = len(registry.blob_uploads())
    r1 = convert(f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-lazy", chunk_size=CS)
    r2 = convert(f"docker://{registry.host}/app:2", f"docker://{registry.host}/app:2-lazy", chunk_size=CS)
    uploads = registry.blob_uploads()[before:]
    assert len(uploads) == len(set(uploads)) == r1.pushed.uploaded + r2.pushed.uploaded
    # nothing of app:1-lazy was there (its config names the lazy layers, so it is new too);
    # app:2 shares the base layer's chunk blob, which is not uploaded again
    assert r1.pushed.present == 0 and r2.pushed.present >= 1
    # converting the same image again uploads nothing at all
    r3 = convert(f"docker://{registry.host}/app:1", f"docker://{registry.host}/app:1-again", chunk_size=CS)
    assert r3.pushed.uploaded == 0 and r3.manifest_digest == r1.manifest_digest
    assert registry.blob_uploads()[before:] == uploads


def test_second_repository_mounts_known_blobs_instead_of_uploading(registry, rich, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # this test's own blob record
    _second_image(tmp_path / "two.tar", "app:2")
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    registry.skopeo_copy(f"docker-archive:{tmp_path / 'two.tar'}", "app:2")
    host = registry.host
    uploads0, mounts0 = len(registry.blob_uploads()), len(registry.blob_mounts())
    r1 = convert(f"docker://{host}/app:1", f"docker://{host}/lazy-a:1", chunk_size=CS)
    assert r1.pushed.mounted == 0 and r1.pushed.uploaded == r1.blobs + 2  # + config and index
    uploads1 = registry.blob_uploads()[uploads0:]
    # app:2 into another repository: the chunk blob of the shared base layer is mounted
    # from lazy-a, the rest (its own top layer, index, config) uploaded
    r2 = convert(f"docker://{host}/app:2", f"docker://{host}/lazy-b:2", chunk_size=CS)
    uploads2 = registry.blob_uploads()[uploads0 + len(uploads1):]
    mounts2 = registry.blob_mounts()[mounts0:]
    assert r2.pushed.mounted == len(mounts2) >= 1 and r2.pushed.uploaded == len(uploads2) >= 1
    assert set(mounts2) <= set(uploads1) and not set(uploads2) & set(uploads1)
    # the same image into a third repository: every blob mounted, not one uploaded
    r3 = convert(f"docker://{host}/app:1", f"docker://{host}/lazy-c:1", chunk_size=CS)
    assert r3.pushed.uploaded == 0 and r3.pushed.mounted == r1.pushed.uploaded
    assert len(registry.blob_uploads()) == uploads0 + len(uploads1) + len(uploads2)
    assert sorted(registry.blob_mounts()[mounts0 + len(mounts2):]) == sorted(uploads1)
    # and the result reads back as the same image
    assert r3.manifest_digest == r1.manifest_digest
    info = json.loads(lazyfs("images", f"{host}/lazy-c:1", "--json").stdout)
    assert info["lazy"] is True and info["digest"] == r1.manifest_digest


def test_zstd_layers_and_image_index_with_platform(registry, rich, tmp_path):
    # zstd layers, pushed by skopeo in an OCI manifest
    registry.skopeo_copy(f"docker-archive:{rich.path}", "z:1")
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                    "--dest-compress-format=zstd", "--format=oci",
                    f"docker://{registry.host}/z:1", f"docker://{registry.host}/z:zstd"],
                   check=True, timeout=120, capture_output=True)
    zres = convert(f"docker://{registry.host}/z:zstd", f"oci:{tmp_path / 'z'}:1", chunk_size=CS)
    gres = convert(f"docker-archive:{rich.path}", f"oci:{tmp_path / 'g'}:1", chunk_size=CS)
    assert zres.index_digest == gres.index_digest
    # an image index with two platforms: the host's by default, --platform to choose
    lay = Layout(tmp_path / "multi")
    lay.init()
    layer = lay.write_blob(tarwriter.write_tar(imagegen.rich_layers()[0]),
                           "application/vnd.oci.image.layer.v1.tar")
    descs = []
    for arch in ("amd64", "arm64"):
        config = lay.write_blob(canonical_json({"architecture": arch, "os": "linux",
                                                "rootfs": {"type": "layers", "diff_ids": []}}),
                                "application/vnd.oci.image.config.v1+json")
        m = lay.write_blob(canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                                           "config": config, "layers": [layer]}), MEDIA_TYPE_OCI_MANIFEST)
        descs.append({**m, "platform": {"os": "linux", "architecture": arch}})
    index = lay.write_blob(canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX,
                                           "manifests": descs}), MEDIA_TYPE_OCI_INDEX)
    lay.tag(index, "1")
    subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false",
                    f"oci:{tmp_path / 'multi'}:1", f"docker://{registry.host}/multi:1"],
                   check=True, timeout=120, capture_output=True)
    convert(f"docker://{registry.host}/multi:1", f"oci:{tmp_path / 'arm'}:1", platform="linux/arm64")
    out = Layout(tmp_path / "arm")
    manifest = json.loads(out.read_blob(out.resolve("1")["digest"]))
    assert json.loads(out.read_blob(manifest["config"]["digest"]))["architecture"] == "arm64"
    done = lazyfs("convert", f"docker://{registry.host}/multi:1", f"oci:{tmp_path / 'x'}:1",
                  "--platform", "linux/s390x", check=False)
    assert done.returncode == 4 and "linux/s390x" in done.stderr


@pytest.mark.mount
def test_user_errors_against_a_registry(registry, rich, mounts, tmp_path):
    registry.skopeo_copy(f"docker-archive:{rich.path}", "app:1")
    cases = [
        (["convert", f"docker://{registry.host}/nosuch:1", f"oci:{tmp_path / 'o'}"], 4, "nosuch"),
        (["convert", f"docker://{registry.host}/App:1", f"oci:{tmp_path / 'o'}"], 2, "lowercase"),
        (["convert", "docker://127.0.0.1:1/app:1", f"oci:{tmp_path / 'o'}", "--timeout", "5"], 4,
         "127.0.0.1:1"),
        (["images", f"{registry.host}/nosuch:1"], 4, "nosuch"),
    ]
    for argv, code, words in cases:
        done = lazyfs(*argv, check=False)
        assert done.returncode == code, (argv, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("lazyfs: error:"), done.stderr
        assert words in done.stderr
    _mnt, done = mounts.mount(f"{registry.host}/app:1", check=False)
    assert done.returncode == 3 and "not a lazyfs image" in done.stderr
    info = json.loads(lazyfs("images", f"{registry.host}/app:1", "--json").stdout)
    assert info["lazy"] is False
