"""The demo: convert a real sample image, serve it, mount it lazily, run a program inside,
and show what was fetched against the image size.

Run it through ``bench/demo`` (which installs what it needs first). Everything happens
under a temporary directory on loopback and is torn down at the end; with ``--keep`` the
converted image and the cache stay there, and the demo prints the commands that serve and
mount them again by hand. The sample image is cached in ``/var/tmp/lazyfs-demo-images``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port, wait_port  # noqa: E402
from testkit import imagegen  # noqa: E402


def lazyfs(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lazyfs", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo: lazyfs {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def by_hand(work: Path) -> str:
    """The commands that serve and mount what --keep left in work, as the README shows them."""
    mnt = work / "mnt"
    return (f"lazyfs serve {work / 'images'} --listen 127.0.0.1:5000 &\n"
            f"lazyfs mount 127.0.0.1:5000/python:1 {mnt} --cache {work / 'cache'}\n"
            f"chroot {mnt} /usr/bin/python3 -c 'print(\"hello\")'\n"
            f"lazyfs status {mnt}\n"
            f"lazyfs umount {mnt}; kill %1\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the image and its cache behind, to mount by hand")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lazyfs-demo-"))
    cache_images = Path("/var/tmp/lazyfs-demo-images")
    server = mnt = None
    try:
        print("1. building a sample image from this machine's python3 (two layers) ...")
        tar = imagegen.build_python_image(work / "python.tar", cache_dir=cache_images)
        print(f"   {tar.name}: {human(tar.stat().st_size)} docker-archive")

        print("2. converting it into a lazyfs image ...")
        t = time.monotonic()
        out = lazyfs("convert", f"docker-archive:{tar}", f"oci:{work / 'images' / 'python'}:1")
        print("   " + out.stdout.splitlines()[0] + f" ({time.monotonic() - t:.1f}s)")

        print("3. serving it over the OCI distribution API on 127.0.0.1 ...")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "lazyfs", "serve", str(work / "images"),
                                   "--listen", f"127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)

        print("4. mounting it lazily (no prefetch, so only what is read is fetched) ...")
        mnt = work / "mnt"
        mnt.mkdir()
        t = time.monotonic()
        lazyfs("mount", f"127.0.0.1:{port}/python:1", str(mnt), "--cache", str(work / "cache"),
               "--no-prefetch")
        print(f"   rootfs there after {time.monotonic() - t:.2f}s: {sorted(os.listdir(mnt))}")

        print("5. running a program inside it ...")
        code = "import json, sqlite3, ssl; print(json.dumps({'hello from': 'inside the image'}))"
        t = time.monotonic()
        run = subprocess.run(["chroot", str(mnt), "/usr/bin/python3", "-c", code],
                             capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t
        if run.returncode != 0:
            sys.exit(f"demo: the program failed: {run.stderr.strip()}")
        print(f"   $ chroot {mnt} /usr/bin/python3 -c \"{code}\"")
        print(f"   {run.stdout.strip()}   ({took:.2f}s, cold)")

        status = json.loads(lazyfs("status", str(mnt), "--json").stdout)
        fetched = status["bytes_by_source"]["origin"]
        image, cached = status["image"], status["prefetch"]
        print("6. what it cost (the image stores its files as lz4-compressed chunks):")
        print(f"   fetched  {human(fetched)} compressed: {fetched / image['stored_bytes']:.1%} "
              f"of the {human(image['stored_bytes'])} the image stores")
        print(f"   cached   {human(cached['cached_bytes'])} uncompressed: "
              f"{cached['cached_bytes'] / cached['total_bytes']:.1%} of the "
              f"{human(cached['total_bytes'])} in its {image['files']} files")
        print("7. `lazyfs status` of the mount: cached counts uncompressed bytes, fetched compressed ones")
        print(textwrap.indent(lazyfs("status", str(mnt)).stdout.rstrip(), "   "))
        if args.keep:
            print(f"kept {work}: the image, its cache and a mountpoint. To try lazyfs by hand:\n"
                  + textwrap.indent(by_hand(work), "   "))
        return 0
    finally:
        if mnt is not None and os.path.ismount(mnt):
            subprocess.run([sys.executable, "-m", "lazyfs", "umount", str(mnt)], capture_output=True)
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    raise SystemExit(main())
