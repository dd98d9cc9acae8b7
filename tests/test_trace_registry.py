"""A trace attached to an image as an OCI referrer in Debian's docker-registry (no
referrers API: the referrers tag schema) is found and used by a mount on another cache;
a bad one is ignored, never fatal."""

from __future__ import annotations

import json
import time

import pytest
import trio

from cache.trace import TRACE_MEDIA_TYPE
from fetcher.imageref import ImageRef
from fetcher.options import RegistryOptions
from fetcher.referrers import push_referrer, referrers_tag
from fetcher.registry import resolve_image_manifest
from testkit.registryd import Registry, needs_registry
from testkit.waiting import wait_until

from .conftest import lazyfs
from .test_trace_mount import make_rootfs, read_all

pytestmark = [needs_registry, pytest.mark.mount]


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path, name="registry-trace")
    yield r
    r.stop()


def _referrers_index(registry: Registry, digest: str) -> dict:
    async def get() -> dict:
        ref = ImageRef.parse(f"{registry.host}/app:1")
        async with RegistryOptions().client(ref) as client:
            return (await client.get_manifest(referrers_tag(digest))).json()
    return trio.run(get)


def test_pushed_trace_is_found_and_used_on_another_cache(registry, mounts, tmp_path):
    rootfs = tmp_path / "rootfs"
    work = make_rootfs(rootfs)
    ref = f"{registry.host}/app:1"
    lazyfs("convert", f"dir:{rootfs}", f"docker://{ref}", "--chunk-size", "64K")

    cache1 = tmp_path / "cache1"
    mnt, _ = mounts.mount(ref, "--no-prefetch", "--record", cache=cache1, name="one")
    read_all(mnt, rootfs, work)
    lazyfs("umount", str(mnt))
    mounts.points.remove(mnt)
    recorded = json.loads(lazyfs("trace", "show", ref, "--cache", str(cache1), "--json").stdout)

    before = len(registry.requests())
    out = lazyfs("trace", "push", ref, "--cache", str(cache1)).stdout
    digest = recorded["manifest"]
    assert digest in out
    pushed = registry.requests()[before:]
    # no OCI-Subject answer to the artifact's PUT: the client keeps the referrers tag itself
    assert any(m == "PUT" and "/manifests/sha256:" in u and s == 201 for m, u, s in pushed)
    assert any(m == "PUT" and u.endswith(f"/manifests/{referrers_tag(digest)}") and s == 201
               for m, u, s in pushed)
    lazyfs("trace", "push", ref, "--cache", str(cache1))  # again: the newer one replaces it
    index = _referrers_index(registry, digest)
    assert [d["artifactType"] for d in index["manifests"]] == [TRACE_MEDIA_TYPE]

    # another node (a cache with no trace) finds it in the registry and fetches its order first
    cache2 = tmp_path / "cache2"
    before = len(registry.requests())
    mnt2, _ = mounts.mount(ref, "--prefetch", "trace", cache=cache2, name="two")
    wait_until(lambda: mounts.status(mnt2)["trace"]["lead_state"] == "done", 60, "the learned order")
    looked = registry.requests()[before:]
    assert any(m == "GET" and "/referrers/" in u and s == 404 for m, u, s in looked)  # the API first
    assert any(m == "GET" and u.endswith(f"/manifests/{referrers_tag(digest)}") and s == 200
               for m, u, s in looked)
    read_all(mnt2, rootfs, work)
    st = mounts.status(mnt2)
    assert st["trace"]["lead_source"] == "registry"
    assert st["trace"]["lead_chunks"] == recorded["chunks"]
    assert st["trace"]["lead_misses"] == 0 and st["reads"]["chunk_misses"] == 0
    assert (cache2 / "traces" / (digest.removeprefix("sha256:") + ".json")).exists()  # seeds the local one

    # a bad trace in the registry is logged and ignored: the mount works, in blob order
    async def push_bad() -> None:
        image = ImageRef.parse(ref)
        async with RegistryOptions().client(image, push=True) as client:
            manifest = await resolve_image_manifest(client, image)
            await push_referrer(client, manifest, TRACE_MEDIA_TYPE, b'{"not": "a trace"}')
    trio.run(push_bad)
    cache3 = tmp_path / "cache3"
    mnt3, _ = mounts.mount(ref, "--prefetch", "trace", cache=cache3, name="three")
    wait_until(lambda: mounts.status(mnt3)["trace"]["lead_state"] == "done", 60, "the learned order")
    read_all(mnt3, rootfs, work[:3])
    assert mounts.status(mnt3)["trace"]["lead_source"] is None
    assert "trace referrer" in mounts.log("three") and "ignored" in mounts.log("three")


def test_trace_push_without_a_trace_is_one_line(registry, tmp_path):
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    ref = f"{registry.host}/app:1"
    lazyfs("convert", f"dir:{rootfs}", f"docker://{ref}", "--chunk-size", "64K")
    (tmp_path / "empty").mkdir(mode=0o700)  # private, as lazyfs makes a cache: no warning
    done = lazyfs("trace", "push", ref, "--cache", str(tmp_path / "empty"), check=False)
    assert done.returncode == 3 and done.stderr.startswith("lazyfs: error: no trace of")
    assert "Traceback" not in done.stderr
    done = lazyfs("trace", "show", ref, "--cache", str(tmp_path / "empty"), check=False)
    assert done.returncode == 3 and "never mounted" in done.stderr
    done = lazyfs("trace", "show", "--cache", str(tmp_path / "empty"), check=False)
    assert done.returncode == 2


def test_a_node_with_a_trace_merges_runs_recorded_elsewhere_after_it_got_it(registry, mounts, tmp_path):
    """Node 2 got node 1's first run from the registry. Node 1 then records a second run
    and pushes again: node 2's next mount starts from its own trace at once and, a moment
    later, merges the new run into it; with --refresh-trace-after 0 it never asks."""
    rootfs = tmp_path / "rootfs"
    work = make_rootfs(rootfs)
    ref = f"{registry.host}/app:1"
    lazyfs("convert", f"dir:{rootfs}", f"docker://{ref}", "--chunk-size", "64K")
    cache1, cache2 = tmp_path / "cache1", tmp_path / "cache2"

    def record(name: str, files: list[str]) -> None:
        mnt, _ = mounts.mount(ref, "--no-prefetch", "--record", cache=cache1, name=name)
        read_all(mnt, rootfs, files)
        lazyfs("umount", str(mnt))
        mounts.points.remove(mnt)
        lazyfs("trace", "push", ref, "--cache", str(cache1))

    def runs(cache) -> int:
        return len(json.loads(lazyfs("trace", "show", ref, "--cache", str(cache), "--json").stdout)["runs"])

    record("one", work[:5])
    mnt2, _ = mounts.mount(ref, "--prefetch", "trace", cache=cache2, name="two")
    wait_until(lambda: mounts.status(mnt2)["trace"]["lead_state"] == "done", 60, "the learned order")
    assert mounts.status(mnt2)["trace"]["lead_source"] == "registry"
    lazyfs("umount", str(mnt2))
    mounts.points.remove(mnt2)
    assert runs(cache2) == 1

    record("three", work[5:])
    assert runs(cache1) == 2
    # never: the trace stays as it was
    mnt4, _ = mounts.mount(ref, "--no-prefetch", "--record-window", "0", "--refresh-trace-after", "0",
                           cache=cache2, name="four")
    time.sleep(2)
    assert mounts.status(mnt4)["trace"]["refreshed"] is None and runs(cache2) == 1
    lazyfs("umount", str(mnt4))
    mounts.points.remove(mnt4)
    # soon after the start: the run recorded since is merged in, for the next mount
    mnt5, _ = mounts.mount(ref, "--prefetch", "trace", "--record-window", "0", "--refresh-trace-after", "1",
                           cache=cache2, name="five")
    st = wait_until(lambda: (t := mounts.status(mnt5)["trace"])["lead_state"] == "done" and t, 60, "the lead")
    assert st["lead_source"] == "local" and len(st["lead_runs"]) == 1  # its own trace, at once
    wait_until(lambda: mounts.status(mnt5)["trace"]["refreshed"], 60, "the refresh")
    assert mounts.status(mnt5)["trace"]["refreshed"] == "1 new runs from registry"
    assert runs(cache2) == 2
    assert "merged 1 runs of the trace" in mounts.log("five")
