"""Real mounts: convert an image, serve it on loopback, mount it with FUSE, use it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from blockindex.convert import convert
from blockindex.oci import Layout
from blockindex.reader import IndexReader
from lazyfs.process import wait_gone
from lazyfs.serve import make_server
from testkit import imagegen, treecompare

from .conftest import lazyfs

pytestmark = pytest.mark.mount




def ref(server, name: str = "rich:1") -> str:
    return f"127.0.0.1:{server.port}/{name}"


def index_of(root: Path, repo: str = "rich", tag: str = "1") -> IndexReader:
    layout = Layout(root / repo)
    manifest = json.loads(layout.read_blob(layout.resolve(tag)["digest"]))
    return IndexReader(layout.blob_path(manifest["layers"][0]["digest"]))


def test_mounted_tree_equals_the_merged_image(served, mounts):
    image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    assert treecompare.compare_tree(mnt, image.expected) == []
    with pytest.raises(OSError) as e:
        (mnt / "newfile").write_text("x")
    assert e.value.errno == errno.EROFS


def test_only_what_is_read_is_fetched(served, mounts):
    image, root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch", "--amplify", "0")
    before = len(server.requests)
    assert before >= 2  # the manifest and the index
    index = index_of(root)
    # read one small file: exactly its chunks' ranges are requested, nothing else
    small = next(p for p, e in image.expected.items() if e.kind == "file" and 0 < e.size < 4096)
    node = _lookup(index, small)
    (mnt / os.fsdecode(small)).read_bytes()
    ranges = [r for r in server.requests[before:]]
    [chunk] = index.chunks_of(node.ino)
    assert len(ranges) == 1
    method, path, rng, status = ranges[0][:4]
    assert path.endswith(chunk.blob.digest) and status == 206
    assert rng == f"bytes={chunk.offset}-{chunk.offset + chunk.stored_size - 1}"
    paths = [r[1] for r in server.requests[:before]]
    assert any("/manifests/" in p for p in paths)
    assert sum("/blobs/" in p for p in paths) == 1  # the index, and no chunk blob
    st = mounts.status(mnt)
    assert st["bytes_by_source"]["origin"] == chunk.stored_size
    assert st["prefetch"]["state"] == "off"


def test_a_miss_fetches_the_files_after_it_in_one_request(served, mounts):
    image, root, server = served
    window = 64 << 10
    mnt, _ = mounts.mount(ref(server), "--no-prefetch", "--amplify", "512K")  # first: 64 KiB
    index = index_of(root)
    owner = {}  # a file of one chunk, of each chunk
    for path, e in image.expected.items():
        if e.kind == "file" and len(cs := index.chunks_of(_lookup(index, path).ino)) == 1:
            owner.setdefault(cs[0].digest, path)
    small, chunk, after = next(
        (p, c, after) for p, e in sorted(image.expected.items()) if e.kind == "file" and 0 < e.size < 4096
        for c in index.chunks_of(_lookup(index, p).ino)
        if len(after := index.chunks_after(c, window - c.stored_size)) >= 2)
    before = len(server.requests)
    assert sha256((mnt / os.fsdecode(small)).read_bytes()) == image.expected[small].sha256
    # one request: the file's chunk and the chunks after it in its blob, within the window
    [(_, path, rng, status)] = server.requests[before:]
    end = after[-1].offset + after[-1].stored_size
    assert path.endswith(chunk.blob.digest) and status == 206
    assert rng == f"bytes={chunk.offset}-{end - 1}" and end - chunk.offset <= window
    # the files whose chunks came along are read from the node cache: no request
    others = [owner[c.digest] for c in after if c.digest in owner]
    assert others
    for other in others:
        assert sha256((mnt / os.fsdecode(other)).read_bytes()) == image.expected[other].sha256
    assert len(server.requests) == before + 1
    assert mounts.status(mnt)["fetch"]["neighbours"] == len(after), server.requests[before:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lookup(index: IndexReader, path: bytes):
    node = index.attr(1)
    for part in path.split(b"/"):
        node = index.lookup(node.ino, part)
    return node


def test_prefetch_completes_then_works_without_the_server(served, mounts, tmp_path):
    image, _root, server = served
    mnt, _ = mounts.mount(ref(server))
    st = mounts.wait_complete(mnt)
    assert st["prefetch"]["cached_bytes"] == st["prefetch"]["total_bytes"] > 0
    server.close()
    assert treecompare.compare_tree(mnt, image.expected) == []
    lazyfs("umount", str(mnt))
    mounts.points.remove(mnt)
    # the server is gone: a fresh mount falls back to the cache by itself ...
    mnt2, _ = mounts.mount(ref(server), name="again")
    assert treecompare.compare_tree(mnt2, image.expected) == []
    assert "trying the cache" in mounts.log("again")
    # ... and --offline never tries the network
    mnt3, _ = mounts.mount(ref(server), "--offline", name="offline")
    assert mounts.status(mnt3)["offline"] is True
    assert treecompare.compare_tree(mnt3, image.expected) == []


def test_altered_chunk_is_eio_and_not_cached(served, mounts):
    image, root, server = served
    index = index_of(root)
    big = max((p for p, e in image.expected.items() if e.kind == "file"),
              key=lambda p: image.expected[p].size)
    node = _lookup(index, big)
    chunk = index.chunks_of(node.ino)[0]
    altered_chunk_is_eio_and_not_cached(mounts, root, server, big, chunk)


def test_index_that_does_not_match_its_digest_is_refused(served, mounts):
    _image, root, server = served
    layout = Layout(root / "rich")
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    index_blob = layout.blob_path(manifest["layers"][0]["digest"])
    index_blob.write_bytes(index_blob.read_bytes() + b"tampered")
    mnt, done = mounts.mount(ref(server), check=False)
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("lazyfs: error:") and "Traceback" not in done.stderr
    assert not os.path.ismount(mnt)


def test_a_real_program_runs_inside(tmp_path, mounts):
    cache = Path(os.environ.get("LAZYFS_TEST_CACHE", "/var/tmp/lazyfs-test-images"))
    tar = imagegen.build_python_image(tmp_path / "python.tar", cache_dir=cache)
    convert(f"docker-archive:{tar}", f"oci:{tmp_path / 'images' / 'python'}:1")
    server = make_server(tmp_path / "images", "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(ref(server, "python:1"), "--no-prefetch")
        out = subprocess.run(
            ["chroot", str(mnt), "/usr/bin/python3", "-c",
             "import json, sqlite3; print(json.dumps({'hello': 'lazyfs'}))"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"hello": "lazyfs"}
        st = mounts.status(mnt)
        # a few percent of the image, not all of it
        assert 0 < st["bytes_by_source"]["origin"] < st["image"]["stored_bytes"] / 2
    finally:
        server.close()


# -- what a user gets wrong ------------------------------------------------------------

def test_mount_errors_are_one_line_with_documented_codes(served, mounts, tmp_path):
    _image, root, server = served
    cases = [
        ([ref(server), str(tmp_path / "missing")], 5, "does not exist"),
        ([ref(server, "nosuch:1"), None], 4, "nosuch"),
        ([ref(server, "rich:nosuchtag"), None], 4, "nosuchtag"),
        (["127.0.0.1:1/rich:1", None], 4, "127.0.0.1:1"),
        (["not a ref!", None], 2, ""),
    ]
    for i, (args, code, words) in enumerate(cases):
        mnt = tmp_path / f"m{i}"
        mnt.mkdir()
        argv = [args[0], args[1] or str(mnt)]
        done = lazyfs("mount", *argv, "--cache", str(tmp_path / "c"), "--timeout", "5",
                      check=False)
        assert done.returncode == code, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("lazyfs: error:"), done.stderr
        assert words in done.stderr
        assert not os.path.ismount(mnt)


def test_busy_mountpoint_and_status_of_a_plain_dir(served, mounts, tmp_path):
    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    again = lazyfs("mount", ref(server), str(mnt), "--cache", str(tmp_path / "c"), check=False)
    assert again.returncode == 5 and "busy" in again.stderr
    plain = lazyfs("status", str(tmp_path), check=False)
    assert plain.returncode == 5 and "not a lazyfs mount" in plain.stderr


def test_non_lazy_image_is_refused(tmp_path, mounts):
    layout = Layout(tmp_path / "images" / "plain")
    layout.init()
    config = layout.write_blob(b"{}", "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config, "layers": []}
    desc = layout.write_blob(json.dumps(manifest).encode(), manifest["mediaType"])
    layout.tag(desc, "1")
    server = make_server(tmp_path / "images", "127.0.0.1", 0)
    server.start()
    try:
        mnt, done = mounts.mount(ref(server, "plain:1"), check=False)
        assert done.returncode == 3 and "not a lazyfs image" in done.stderr
    finally:
        server.close()


def test_file_over_4_gib_with_holes(tmp_path, mounts):
    image = imagegen.build_big_sparse_image(tmp_path / "big.tar")
    convert(f"tar:{image.path}", f"oci:{tmp_path / 'images' / 'big'}:1")
    server = make_server(tmp_path / "images", "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(ref(server, "big:1"), "--no-prefetch")
        path = mnt / "sparse" / "big.img"
        assert path.stat().st_size == image.expected[b"sparse/big.img"].size > 1 << 32
        with open(path, "rb") as f:
            for off, data in imagegen._big_sparse_pieces():
                f.seek(off)
                assert f.read(len(data)) == data
            f.seek((1 << 32) - 10)  # across the 4 GiB line: a hole
            assert f.read(20) == bytes(20)
            f.seek(path.stat().st_size - 5)
            assert f.read(100) == bytes(5)
        # two stored chunks, nothing else: holes are never fetched
        assert mounts.status(mnt)["image"]["chunks"] == 2
    finally:
        server.close()


def test_killed_mount_process_is_reported_and_cleaned_up(served, mounts, tmp_path):
    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    pid = mounts.status(mnt)["pid"]
    os.kill(pid, 9)
    _wait_gone(pid)
    # a reader of a dead mount gets an error at once, never a wait
    with pytest.raises(OSError) as err:
        os.listdir(mnt)
    assert err.value.errno == errno.ENOTCONN
    again = lazyfs("mount", ref(server), str(mnt), "--cache", str(tmp_path / "c"), check=False)
    assert again.returncode == 5 and "process has died" in again.stderr, again.stderr
    done = lazyfs("umount", str(mnt))
    assert "had died" in done.stdout
    assert not os.path.ismount(mnt)
    mounts.points.remove(mnt)
    # and the mountpoint is usable again
    mounts.mount(ref(server), "--no-prefetch")


def test_a_stopped_mount_process_is_reported_and_detached_without_hanging(served, mounts, tmp_path):
    """A mount whose process is alive but answers nothing (here SIGSTOPped: a wedged one
    looks the same) must not hang the commands that ask it: status says so within its
    --timeout, umount detaches it, and the mountpoint is usable again."""
    import signal
    import time

    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    pid = mounts.status(mnt)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = lazyfs("status", str(mnt), "--timeout", "1", check=False, timeout=30)
        assert done.returncode == 5, done.stderr
        assert done.stderr.count("\n") == 1 and "does not answer within 1s" in done.stderr, done.stderr
        assert time.monotonic() - started < 15  # not the kernel's forever
        again = lazyfs("mount", ref(server), str(mnt), "--cache", str(tmp_path / "c"), check=False,
                       timeout=60)
        assert again.returncode == 5 and "does not answer" in again.stderr, again.stderr
        done = lazyfs("umount", str(mnt), timeout=60)
        assert "did not answer" in done.stdout and "still running" in done.stdout, done.stdout
        assert not os.path.ismount(mnt)
        mounts.points.remove(mnt)
        mounts.mount(ref(server), "--no-prefetch")  # the mountpoint is usable again
    finally:
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    assert wait_gone(pid, 10), f"process {pid} is still running"


def test_sigterm_unmounts_cleanly(served, mounts):
    _image, _root, server = served
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    pid = mounts.status(mnt)["pid"]
    os.kill(pid, 15)
    _wait_gone(pid)
    assert not os.path.ismount(mnt)
    mounts.points.remove(mnt)


def test_the_mount_process_is_detached_from_its_caller(served, mounts, tmp_path):
    """`lazyfs mount` forks its mount process: that process must keep none of the caller's
    descriptors (a pipe held open would hang a shell's `$(...)` or a supervisor reading the
    command's output), read nothing from its terminal, and lead a session of its own."""
    import select
    import sys

    _image, _root, server = served
    mnt = tmp_path / "detached"
    mnt.mkdir()
    r, w = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lazyfs", "mount", ref(server), str(mnt), "--no-prefetch",
             "--cache", str(tmp_path / "cache"), "--log-file", str(tmp_path / "detached.log")],
            capture_output=True, text=True, timeout=60, pass_fds=(w,),
            cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        mounts.points.append(mnt)
        os.close(w)
        w = -1
        readable, _, _ = select.select([r], [], [], 10)
        assert readable and os.read(r, 1) == b"", "the mount process kept the caller's pipe open"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    pid = mounts.status(mnt)["pid"]
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    assert os.path.samefile(f"/proc/{pid}/fd/2", tmp_path / "detached.log")
    assert sorted(os.listdir(mnt)) != []


def test_an_image_with_the_media_types_of_earlier_versions_still_mounts(served, mounts):
    """Images converted before the layer media types moved into the OCI layer family
    (``application/vnd.lazyfs.*``) keep mounting and describing."""
    from blockindex import format as fmt
    from blockindex.oci import MEDIA_TYPE_OCI_MANIFEST, canonical_json

    image, root, server = served
    layout = Layout(root / "rich")
    manifest = json.loads(layout.read_blob(layout.resolve("1")["digest"]))
    assert manifest["layers"][0]["mediaType"] == fmt.MEDIA_TYPE_INDEX
    legacy = {fmt.MEDIA_TYPE_INDEX: fmt.LEGACY_MEDIA_TYPE_INDEX,
              fmt.MEDIA_TYPE_CHUNKS: fmt.LEGACY_MEDIA_TYPE_CHUNKS}
    for layer in manifest["layers"]:
        layer["mediaType"] = legacy[layer["mediaType"]]
    layout.tag(layout.write_blob(canonical_json(manifest), MEDIA_TYPE_OCI_MANIFEST), "old")
    mnt, _ = mounts.mount(ref(server, "rich:old"), "--no-prefetch")
    assert treecompare.compare_tree(mnt, image.expected) == []
    info = json.loads(lazyfs("images", ref(server, "rich:old"), "--json").stdout)
    assert info["lazy"] and info["index"] == manifest["layers"][0]["digest"]


def test_a_registry_that_answers_byte_by_byte_fails_the_mount_within_its_deadline(mounts):
    """Each wait for a byte is shorter than --timeout, so only the mount's own deadline on
    the manifest ends it: one line and exit 4, not a mount that never becomes ready."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            while not stop.wait(0.2):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        _mnt, done = mounts.mount(f"127.0.0.1:{port}/app:1", "--timeout", "1", "--foreground",
                                  check=False)
    finally:
        stop.set()
        listener.close()
    assert done.returncode == 4, done.stderr
    assert "did not arrive within 3 s" in done.stderr and done.stderr.count("\n") == 1, done.stderr


def altered_chunk_is_eio_and_not_cached(mounts, root: Path, server, path: bytes, chunk) -> None:
    """Alter one byte of ``chunk`` in its blob, then a read of ``path`` (whose chunk it is)
    through a fresh mount is EIO, logged with the chunk, counted, and nothing is cached."""
    blob = Layout(root / "rich").blob_path(chunk.blob.digest)
    data = bytearray(blob.read_bytes())
    data[chunk.offset + chunk.stored_size // 2] ^= 0x55
    blob.write_bytes(data)
    mnt, _ = mounts.mount(ref(server), "--no-prefetch")
    with pytest.raises(OSError) as e:
        (mnt / os.fsdecode(path)).read_bytes()
    assert e.value.errno == errno.EIO
    assert chunk.hexdigest in mounts.log()
    assert not (mounts.tmp / "cache" / "chunks" / chunk.hexdigest[:2] / chunk.hexdigest).exists()
    assert mounts.status(mnt)["fetch"]["integrity_failures"] >= 1
