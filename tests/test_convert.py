"""convert(): real inputs built with tarfile, results checked through IndexReader."""

from __future__ import annotations

import json
import os
import stat
import struct
import tarfile
from pathlib import Path

import pytest

from blockindex.convert import convert
from blockindex.errors import ImageError, UnsafeImageError
from blockindex.format import ARTIFACT_ANNOTATION, MEDIA_TYPE_CHUNKS, MEDIA_TYPE_INDEX
from blockindex.oci import Layout, canonical_json

from .imagekit import CONFIG, Image, d, docker_archive, entry, make_tar, oci_layout

CS = 4096
CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service+ep
BIG = os.urandom(3 * CS) + bytes(CS) + b"tail"  # 3 chunks, a hole, a short last chunk


def two_layers() -> list[bytes]:
    lower = make_tar([
        d("etc"), entry("etc/keep", b"keep"), entry("etc/gone", b"gone"),
        d("opq"), entry("opq/old", b"old"), d("opq/sub"), entry("opq/sub/deep", b"deep"),
        d("bin"), entry("bin/tool", BIG),
        entry("orig", b"linked content"), entry("hl", type=tarfile.LNKTYPE, linkname="orig"),
    ])
    upper = make_tar([
        entry("etc/.wh.gone"),
        d("opq", mode=0o700), entry("opq/.wh..wh..opq"), entry("opq/new", b"new"),
        d("usr"), entry("usr/tool-copy", BIG),
        entry(".wh.orig"),
    ], compress="gzip")
    return [lower, upper]


def test_docker_archive_merges_layers(tmp_path: Path) -> None:
    src = docker_archive(tmp_path / "img.tar", two_layers())
    res = convert(f"docker-archive:{src}", f"oci:{tmp_path}/out", chunk_size=CS)
    img = Image(tmp_path / "out", res.index_digest)
    assert img.names("etc") == [b"keep"]
    assert img.names("opq") == [b"new"]
    assert img.path("opq").mode == stat.S_IFDIR | 0o700
    assert img.read("bin/tool") == BIG == img.read("usr/tool-copy")
    # The whiteout of the link's target leaves the link with the content (as docker does).
    assert not img.exists("orig")
    assert img.read("hl") == b"linked content" and img.path("hl").nlink == 1
    # Dedupe: BIG's 3 random chunks + tail stored once; plus keep, new, hl. Whited-out
    # files' chunks stay in their layer's blob (so that blob is the same in every image
    # built on that layer) but the index does not list them.
    assert res.chunks == 4 + 3 == img.r.totals()["chunks"]
    assert res.files == 5
    assert res.image_bytes == 2 * len(BIG) + len(b"keep" b"new" b"linked content")
    assert res.stored_bytes == sum(b.size for b in img.r.blobs())
    # The manifest: index first, then chunk blobs, one per source layer here (the upper
    # layer's BIG copy is deduped, but it brings "new"); tagged latest. The config is the
    # original one with diff_ids naming the lazy layers (containerd pairs them one to one).
    lay = Layout(tmp_path / "out")
    desc = lay.resolve("latest")
    assert desc["digest"] == res.manifest_digest
    manifest = json.loads(lay.read_blob(res.manifest_digest))
    config = json.loads(lay.read_blob(manifest["config"]["digest"]))
    original = json.loads(CONFIG)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [m["digest"] for m in manifest["layers"]]}
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in original.items() if k != "rootfs"}
    assert [m["mediaType"] for m in manifest["layers"]] == [MEDIA_TYPE_INDEX, *[MEDIA_TYPE_CHUNKS] * 2]
    assert manifest["annotations"] == {ARTIFACT_ANNOTATION: "1", "io.lazyfs.chunk-size": str(CS)}
    assert lay.read_blob(res.manifest_digest) == canonical_json(manifest)


def test_every_kind_of_metadata(tmp_path: Path) -> None:
    long_name = "n" * 255
    tar = make_tar([
        d(".", mode=0o750, uid=3, gid=4, mtime=7),
        d("dev"),
        entry("dev/null", type=tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        entry("dev/sda", type=tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
        entry("fifo", type=tarfile.FIFOTYPE, mode=0o600),
        entry("su", b"#!", mode=0o4755, uid=1000, gid=50),
        entry("sticky", type=tarfile.DIRTYPE, mode=0o1777),
        entry("abs", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        entry(b"caf\xe9", b"latin-1 name"),
        entry(long_name, b"long"),
        entry("ping", b"ping", mode=0o755, pax={
            "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.bin": b"\xff\x00\xfe".decode("utf-8", "surrogateescape"),
            "LIBARCHIVE.xattr.user.b64": "aGVsbG8",
            "mtime": "1700000000.123456789",
        }),
        entry("a", b"shared"), entry("b", type=tarfile.LNKTYPE, linkname="a"),
        entry("empty", b""),
    ])
    (tmp_path / "root.tar").write_bytes(tar)
    res = convert(f"tar:{tmp_path}/root.tar", f"oci:{tmp_path}/out:v1")
    img = Image(tmp_path / "out", res.index_digest)
    root = img.path("/")
    assert (root.ino, root.mode, root.uid, root.gid, root.mtime_ns) == (1, 0o40750, 3, 4, 7 * 10**9)
    assert root.nlink == 2 + 2  # dev, sticky
    null = img.path("dev/null")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(img.path("dev/sda").mode) and img.path("dev/sda").rdev == os.makedev(8, 0)
    assert img.path("fifo").mode == stat.S_IFIFO | 0o600
    su = img.path("su")
    assert (su.mode, su.uid, su.gid) == (stat.S_IFREG | 0o4755, 1000, 50)
    assert img.path("sticky").mode == stat.S_IFDIR | 0o1777
    assert img.r.readlink(img.path("abs").ino) == b"/etc/passwd"
    assert img.path("abs").size == len(b"/etc/passwd")
    assert img.read(b"caf\xe9") == b"latin-1 name"
    assert img.read(long_name) == b"long"
    ping = img.path("ping")
    assert img.r.xattrs(ping.ino) == {
        b"security.capability": CAP, b"user.bin": b"\xff\x00\xfe", b"user.b64": b"hello"}
    assert ping.mtime_ns == 1700000000_123456789
    a, b = img.path("a"), img.path("b")
    assert a.ino == b.ino and a.nlink == 2
    assert img.path("empty").size == 0 and img.r.chunks_of(img.path("empty").ino) == []
    # Children are in name-byte order with positions 0..n-1.
    kids = list(img.r.children(1))
    assert [k[0] for k in kids] == list(range(len(kids)))
    assert [k[1] for k in kids] == sorted(k[1] for k in kids)
    assert Layout(tmp_path / "out").resolve("v1")["digest"] == res.manifest_digest


def test_zero_chunks_are_holes_and_big_files_read_back(tmp_path: Path) -> None:
    data = os.urandom(CS * 5 + 100)
    tar = make_tar([entry("zeros", bytes(CS * 10 + 1)), entry("big", BIG), entry("rand", data)],
                   compress="zstd")
    (tmp_path / "root.tar.zst").write_bytes(tar)
    res = convert(f"tar:{tmp_path}/root.tar.zst", f"oci:{tmp_path}/out", chunk_size=CS,
                  blob_limit=3 * CS)
    img = Image(tmp_path / "out", res.index_digest)
    zeros = img.path("zeros")
    assert zeros.size == CS * 10 + 1 and img.r.chunks_of(zeros.ino) == []
    assert img.read("zeros") == bytes(CS * 10 + 1)
    assert img.read("rand") == data and img.read("big") == BIG
    spans = img.r.chunks(img.path("big").ino, 0, len(BIG))
    assert [s.chunk is None for s in spans] == [False, False, False, True, False]
    # Small blob limit: several blobs, no chunk straddles one.
    assert res.blobs == len(img.r.blobs()) > 2
    for c in img.r.all_chunks():
        assert c.offset + c.stored_size <= c.blob.size


def test_compressible_chunks_use_lz4_and_random_ones_stay_raw(tmp_path: Path) -> None:
    tar = make_tar([entry("text", b"abc" * CS), entry("rand", os.urandom(CS))])
    (tmp_path / "r.tar").write_bytes(tar)
    res = convert(f"tar:{tmp_path}/r.tar", f"oci:{tmp_path}/out", chunk_size=CS)
    img = Image(tmp_path / "out", res.index_digest)
    assert {c.codec for c in img.r.chunks_of(img.path("text").ino)} == {1}
    assert {c.codec for c in img.r.chunks_of(img.path("rand").ino)} == {0}
    assert img.read("text") == b"abc" * CS


def test_conversion_is_deterministic(tmp_path: Path) -> None:
    src = docker_archive(tmp_path / "img.tar", two_layers())
    r1 = convert(f"docker-archive:{src}", f"oci:{tmp_path}/one", chunk_size=CS)
    r2 = convert(f"docker-archive:{src}", f"oci:{tmp_path}/two", chunk_size=CS)
    assert r1 == r2

    def files(root: Path) -> dict[Path, bytes]:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_dir_source_matches_tar_source(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc" / "sub").mkdir(parents=True)
    (root / "etc" / "conf").write_bytes(b"conf" * 3000)
    (root / "bin").mkdir()
    (root / "bin" / "sh").write_bytes(BIG)
    (root / "bin" / "sh").chmod(0o4755)
    os.link(root / "bin" / "sh", root / "bin" / "ash")
    os.symlink("/bin/sh", root / "bin" / "rsh")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / b"caf\xe9".decode("utf-8", "surrogateescape")).write_bytes(b"x")
    with open(root / "sparse", "wb") as f:
        f.truncate(CS * 8)
    for p in [*root.rglob("*"), root]:
        os.utime(p, ns=(0, 1_000_000_000), follow_symlinks=False)
        os.lchown(p, 0, 0)
    with tarfile.open(tmp_path / "root.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(root, arcname=".")
    r_dir = convert(f"dir:{root}", f"oci:{tmp_path}/a", chunk_size=CS)
    r_tar = convert(f"tar:{tmp_path}/root.tar", f"oci:{tmp_path}/b", chunk_size=CS)
    a, b = Image(tmp_path / "a", r_dir.index_digest), Image(tmp_path / "b", r_tar.index_digest)
    assert a.dump() == b.dump()
    assert r_dir == r_tar
    assert a.path("bin/sh").ino == a.path("bin/ash").ino and a.path("bin/sh").nlink == 2


def test_dir_source_keeps_xattrs_and_skips_disk_holes(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    huge = root / "huge"
    with open(huge, "wb") as f:
        f.truncate(5 << 30)  # over 4 GiB, all hole: SEEK_DATA skips it without reading
        f.seek(3 << 30)
        f.write(b"data in the middle")
    os.setxattr(root / "huge", "security.capability", CAP)
    res = convert(f"dir:{root}", f"oci:{tmp_path}/out")
    img = Image(tmp_path / "out", res.index_digest)
    node = img.path("huge")
    assert node.size == 5 << 30 and res.image_bytes == 5 << 30
    assert len(img.r.chunks_of(node.ino)) == 1
    assert img.r.xattrs(node.ino)[b"security.capability"] == CAP
    span = img.r.chunks(node.ino, 3 << 30, 18)
    assert span[0].chunk is not None


def test_oci_layout_with_nested_index_picks_linux_amd64(tmp_path: Path) -> None:
    lay, amd = oci_layout(tmp_path / "src", [make_tar([entry("arch", b"amd64")], compress="zstd")])
    _, arm = oci_layout(tmp_path / "src", [make_tar([entry("arch", b"arm64")])])
    inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{**arm, "platform": {"os": "linux", "architecture": "arm64"}},
                           {**amd, "platform": {"os": "linux", "architecture": "amd64"}}]}
    idesc = lay.write_blob(json.dumps(inner).encode(), inner["mediaType"])
    lay.tag(idesc, "multi")
    res = convert(f"oci:{tmp_path}/src:multi", f"oci:{tmp_path}/out", chunk_size=CS)
    assert Image(tmp_path / "out", res.index_digest).read("arch") == b"amd64"


def test_tag_is_replaced_not_duplicated(tmp_path: Path) -> None:
    for content in (b"one", b"two"):
        (tmp_path / "r.tar").write_bytes(make_tar([entry("f", content)]))
        res = convert(f"tar:{tmp_path}/r.tar", f"oci:{tmp_path}/out:t")
    lay = Layout(tmp_path / "out")
    assert len(lay.index()["manifests"]) == 1
    assert lay.resolve("t")["digest"] == res.manifest_digest
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# -- bad input -----------------------------------------------------------------------------


def _convert_tar(tmp_path: Path, data: bytes, name: str = "bad.tar") -> None:
    (tmp_path / name).write_bytes(data)
    convert(f"tar:{tmp_path}/{name}", f"oci:{tmp_path}/out")


@pytest.mark.parametrize("scheme", ["tar", "dir", "oci", "docker-archive"])
def test_missing_source(tmp_path: Path, scheme: str) -> None:
    with pytest.raises(ImageError, match="nothere"):
        convert(f"{scheme}:{tmp_path}/nothere", f"oci:{tmp_path}/out")


def test_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="expected one of docker-archive:, oci:, dir:, tar:"):
        convert(f"http://{tmp_path}", f"oci:{tmp_path}/out")
    with pytest.raises(ImageError, match="expected oci:DIR"):
        convert(f"dir:{tmp_path}", f"dir:{tmp_path}/out")


def test_the_format_builds_from_local_sources_only(tmp_path: Path) -> None:
    # registries are reached above the format (lazyfs.convert): here a registry
    # reference is an unknown scheme, refused without any network request
    (tmp_path / "root").mkdir()
    with pytest.raises(ImageError, match="unknown source 'docker://127.0.0.1:1/app:1'"):
        convert("docker://127.0.0.1:1/app:1", f"oci:{tmp_path}/out")
    with pytest.raises(ImageError, match="unknown destination 'docker://127.0.0.1:1/app:1'"):
        convert(f"dir:{tmp_path}/root", "docker://127.0.0.1:1/app:1")


def test_convert_names_registries_among_the_forms_and_checks_them_first(tmp_path: Path) -> None:
    from lazyfs.convert import convert as convert_anywhere

    with pytest.raises(ImageError, match="expected one of docker-archive:, oci:, dir:, tar:, docker://"):
        convert_anywhere(f"http://{tmp_path}", f"oci:{tmp_path}/out")
    with pytest.raises(ImageError, match="expected docker://HOST/REPO"):
        convert_anywhere("docker:app", f"oci:{tmp_path}/out")
    # nothing listens on port 1: a bad destination or chunk size is reported before a pull
    with pytest.raises(ImageError, match="expected oci:DIR.* or docker://"):
        convert_anywhere("docker://127.0.0.1:1/app:1", f"dir:{tmp_path}/out")
    with pytest.raises(ImageError, match="needs a tag and no digest"):
        convert_anywhere("docker://127.0.0.1:1/app:1", "docker://127.0.0.1:1/app@sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="power of two"):
        convert_anywhere("docker://127.0.0.1:1/app:1", f"oci:{tmp_path}/out", chunk_size=3000)


def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"bad.tar: corrupt or truncated tar \(invalid header"):
        _convert_tar(tmp_path, b"this is not a tar file" * 100)


def test_truncated_gzip(tmp_path: Path) -> None:
    data = make_tar([entry("f", os.urandom(100_000))], compress="gzip")
    with pytest.raises(ImageError, match="bad.tar: corrupt or truncated") as info:
        _convert_tar(tmp_path, data[: len(data) // 2])
    assert isinstance(info.value.__cause__, EOFError)


def test_corrupt_gzip(tmp_path: Path) -> None:
    data = bytearray(make_tar([entry("f", b"x" * 100_000)], compress="gzip"))
    data[40:60] = b"\xff" * 20
    with pytest.raises(ImageError, match="corrupt"):
        _convert_tar(tmp_path, bytes(data))


def test_entry_climbing_out_is_unsafe(tmp_path: Path) -> None:
    with pytest.raises(UnsafeImageError, match=r"'../etc/passwd' climbs out"):
        _convert_tar(tmp_path, make_tar([entry("../etc/passwd", b"root::0:0")]))
    assert not (tmp_path.parent / "etc").exists()


def test_hard_link_out_of_tree_is_unsafe_but_absolute_symlink_is_fine(tmp_path: Path) -> None:
    _convert_tar(tmp_path, make_tar([entry("s", type=tarfile.SYMTYPE, linkname="/../../etc")]))
    with pytest.raises(UnsafeImageError, match="hard link target"):
        _convert_tar(tmp_path, make_tar([entry("h", type=tarfile.LNKTYPE, linkname="../x")]))
    with pytest.raises(UnsafeImageError, match="not in the image"):
        _convert_tar(tmp_path, make_tar([entry("h", type=tarfile.LNKTYPE, linkname="later"),
                                         entry("later", b"x")]))


def test_absurd_size_is_unsafe(tmp_path: Path) -> None:
    ti, _ = entry("huge")
    ti.size = 1 << 50
    raw = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(UnsafeImageError, match="absurd size"):
        _convert_tar(tmp_path, raw + bytes(1024))


def test_malformed_docker_archive(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(make_tar([entry("manifest.json", b"{not json")]))
    with pytest.raises(ImageError, match=r"manifest.json: malformed JSON"):
        convert(f"docker-archive:{bad}", f"oci:{tmp_path}/out")
    bad.write_bytes(make_tar([entry("manifest.json", json.dumps(
        [{"Config": "c.json", "Layers": ["l.tar"]}]).encode())]))
    with pytest.raises(ImageError, match="'c.json' is missing"):
        convert(f"docker-archive:{bad}", f"oci:{tmp_path}/out")
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(ImageError, match="not a docker-archive tar"):
        convert(f"docker-archive:{bad}", f"oci:{tmp_path}/out")


def test_oci_layer_that_does_not_match_its_digest(tmp_path: Path) -> None:
    lay, mdesc = oci_layout(tmp_path / "src", [make_tar([entry("f", b"good")])])
    lay.tag(mdesc, "latest")
    manifest = json.loads(lay.read_blob(mdesc["digest"]))
    path = lay.blob_path(manifest["layers"][0]["digest"])
    path.write_bytes(make_tar([entry("f", b"evil")]))
    with pytest.raises(ImageError, match="does not match its digest"):
        convert(f"oci:{tmp_path}/src", f"oci:{tmp_path}/out")



def test_docker_archive_picks_image_by_tag_and_reads_gzipped_archive(tmp_path: Path) -> None:
    src = tmp_path / "two.tar"
    a = make_tar([entry("which", b"a")])
    b = make_tar([entry("which", b"b")])
    files = [("config.json", CONFIG), ("a.tar", a), ("b.tar", b), ("manifest.json", json.dumps([
        {"Config": "config.json", "RepoTags": ["app:1"], "Layers": ["a.tar"]},
        {"Config": "config.json", "RepoTags": ["app:2"], "Layers": ["b.tar"]},
    ]).encode())]
    src.write_bytes(make_tar([entry(n, data) for n, data in files], compress="gzip"))
    res = convert(f"docker-archive:{src}:2", f"oci:{tmp_path}/out")
    assert Image(tmp_path / "out", res.index_digest).read("which") == b"b"
    with pytest.raises(ImageError, match="holds 2 images"):
        convert(f"docker-archive:{src}", f"oci:{tmp_path}/out")
    with pytest.raises(ImageError, match="no image tagged '3'"):
        convert(f"docker-archive:{src}:3", f"oci:{tmp_path}/out")


def test_lazy_config_names_the_lazy_layers_and_keeps_the_source_diff_ids() -> None:
    from blockindex.convert import lazy_config

    original = json.dumps({"os": "linux", "config": {"Cmd": ["sh"]},
                           "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]}}).encode()
    layers = [{"digest": "sha256:11"}, {"digest": "sha256:22"}, {"digest": "sha256:33"}]
    config, source = lazy_config(original, layers)
    assert json.loads(config) == {"os": "linux", "config": {"Cmd": ["sh"]}, "rootfs": {
        "type": "layers", "diff_ids": ["sha256:11", "sha256:22", "sha256:33"]}}
    assert source == ["sha256:aa", "sha256:bb"]
    assert config == canonical_json(json.loads(config))
    with pytest.raises(ImageError, match="not a JSON object"):
        lazy_config(b"[]", layers)
