"""The README's demo (bench/demo.py): its figures say what they count, its status block has
a heading, and --keep leaves an image and a cache that mount again by hand."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lazyfs.serve import make_server

from .conftest import ROOT

pytestmark = [pytest.mark.mount, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")]


def test_demo_says_what_it_counts_and_keeps_what_it_made(tmp_path, mounts):
    done = subprocess.run([sys.executable, "bench/demo.py", "--keep"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()

    fetched = next(line for line in lines if line.strip().startswith("fetched "))
    size, pct = r"[\d.]+ \w?i?B", r"[\d.]+%"
    assert re.fullmatch(rf" +fetched +{size} compressed: {pct} of the {size} the image stores", fetched)
    cached = next(line for line in lines if line.strip().startswith("cached "))
    assert re.fullmatch(rf" +cached +{size} uncompressed: {pct} of the {size} in its \d+ files", cached)
    # `lazyfs status` comes under a heading that says what its two figures count
    at = next(i for i, line in enumerate(lines) if "python:1  at " in line)
    assert "cached counts uncompressed bytes, fetched compressed ones" in lines[at - 1]

    [work] = [p for p in tmp_path.iterdir() if p.name.startswith("lazyfs-demo-")]
    assert f"kept {work}:" in done.stdout
    assert f"lazyfs mount 127.0.0.1:5000/python:1 {work / 'mnt'} --cache {work / 'cache'}" in done.stdout
    # what the printed commands do, on a free port: the program's chunks come from the kept cache
    server = make_server(work / "images", "127.0.0.1", 0)
    server.start()
    try:
        mnt, _ = mounts.mount(f"127.0.0.1:{server.port}/python:1", "--no-prefetch", cache=work / "cache")
        ran = subprocess.run(["chroot", str(mnt), "/usr/bin/python3", "-c", "print('hello')"],
                             capture_output=True, text=True, timeout=120)
        assert ran.stdout == "hello\n", ran.stderr
        st = mounts.status(mnt)
        assert st["bytes_by_source"]["cache"] > 0
    finally:
        server.close()
